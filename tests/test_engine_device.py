"""The device helpers of the engine's users: device check, provenance names, CPU thread count, deterministic mode."""

import pytest
import torch

from llumnix.engine.device import check_device, deterministic_kernels, device_name, nccl_version, torch_threads


def test_cpu_is_always_there_and_names_its_threads():
    assert check_device("cpu") == "cpu"
    with torch_threads("cpu", 1):
        assert device_name("cpu").endswith("(1 torch threads)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to refuse it")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no CUDA device"):
        check_device("cuda:0")


def test_torch_threads_restores_the_count_and_leaves_gpus_alone():
    before = torch.get_num_threads()
    with torch_threads("cpu", 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads("cuda", 1), torch_threads("cpu", None):
        assert torch.get_num_threads() == before


def test_deterministic_kernels_are_switched_on_and_back_off():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels():
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU machine has no NCCL to name")
def test_no_nccl_without_cuda():
    assert nccl_version() == ""
