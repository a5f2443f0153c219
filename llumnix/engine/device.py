"""The torch device a run asks for: whether it is there, what it is called, and how many CPU threads torch uses on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

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
