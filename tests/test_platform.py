"""The CPU compatibility layer: what it patches on CPU, and that it patches nothing on CUDA."""

import torch

from megatron_osp.platform import CpuRNGStatesTracker
from megatron_osp.testing.distributed import run_distributed


def test_cpu_rng_tracker_forks_named_streams_and_restores_the_outer_one():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(0)
    outer_expected = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(3)
    outer = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    torch.testing.assert_close(outer, outer_expected)  # the default stream is untouched
    ref = torch.Generator().manual_seed(1234)
    torch.testing.assert_close(torch.cat([a, b]), torch.rand(6, generator=ref))  # the stream continues


def test_cpu_rng_tracker_rejects_duplicates_and_unknown_names():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    for bad in (lambda: tracker.add("b", 1), lambda: tracker.add("a", 2)):
        try:
            bad()
        except ValueError:
            continue
        raise AssertionError("duplicate seed/name accepted")
    try:
        with tracker.fork("missing"):
            pass
    except KeyError as e:
        assert "missing" in str(e)
    else:
        raise AssertionError("fork of an unknown state accepted")


def _cpu_patches(rank, world_size):
    from megatron.core import tensor_parallel

    from megatron_osp import platform

    assert platform.setup_platform() == "cpu"
    t = torch.zeros(2, device="cuda")  # rewritten to CPU by the function mode
    return {
        "current_device": torch.cuda.current_device(),
        "tensor_device": str(t.device),
        "tracker": type(tensor_parallel.get_cuda_rng_tracker()).__name__,
    }


def _cuda_path_untouched(rank, world_size):
    import os

    from megatron_osp import platform

    os.environ.pop("MEGATRON_OSP_FORCE_CPU")
    torch.cuda.is_available = lambda: True  # pretend to be a GPU machine
    torch.cuda.set_device = lambda *_: None
    original_current_device = torch.cuda.current_device
    device = platform.setup_platform()
    from megatron.core.tensor_parallel import random as mcore_random

    return {
        "device": device,
        "current_device_patched": torch.cuda.current_device is not original_current_device,
        "tracker_installed": isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, platform.CpuRNGStatesTracker),
        "function_mode": platform._CUDA_TO_CPU_MODE is not None,
    }


def test_cpu_mode_installs_the_patches():
    (out,) = run_distributed(_cpu_patches, 1)
    assert out == {"current_device": "cpu", "tensor_device": "cpu", "tracker": "CpuRNGStatesTracker"}


def test_cuda_mode_patches_nothing():
    (out,) = run_distributed(_cuda_path_untouched, 1)
    assert out == {
        "device": "cuda",
        "current_device_patched": False,
        "tracker_installed": False,
        "function_mode": False,
    }
