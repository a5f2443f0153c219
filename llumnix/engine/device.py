"""The torch device a run asks for: whether it is there, what it and its NCCL are called, how many CPU threads torch
uses on it, and torch's deterministic kernels."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.utils.deterministic

from llumnix.machine import cpu_model


def check_device(device: str) -> str:
    """``device`` unchanged when torch can run on it; ValueError for a CUDA device on a machine without one."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here")
    return device


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and torch's thread count, for the provenance columns of a measurement."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({torch.get_num_threads()} torch threads)"


def nccl_version() -> str:
    """The NCCL version torch was built with ('' without CUDA or NCCL), for the provenance columns."""
    if not torch.cuda.is_available():
        return ""
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a build without NCCL
        return ""
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


@contextlib.contextmanager
def torch_threads(device: str, threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads when on CPU (restored afterwards). On a CPU shared with other
    jobs, several OpenMP threads spin-wait on each other and a 2 ms step can take 200 ms; one thread stays stable."""
    if device.startswith("cuda") or threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """torch's deterministic algorithms (warn-only, warnings silenced, uninitialised memory left alone), restored."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            torch.utils.deterministic.fill_uninitialized_memory = fill_before
