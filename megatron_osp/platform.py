"""Run the same Megatron-Core model on CPU (gloo) that runs on CUDA (nccl).

Megatron-Core 0.16.1 assumes CUDA in its forward and pipeline paths. On a machine without a GPU
(laptops, CI) five things break, and this module patches exactly those, nothing else:

1. ``torch.cuda.current_device()`` (rotary embedding, tensor-parallel layers, p2p buffers) now
   returns ``"cpu"``, a valid ``device=`` argument.
2. The CUDA RNG tracker (``tensor_parallel.get_cuda_rng_tracker().fork()`` around attention dropout
   and TP weight init) is replaced by :class:`CpuRNGStatesTracker`, which forks CPU generator states,
   so dropout stays reproducible per tensor-parallel rank.
3. Hard-coded ``device="cuda"`` in the pipeline schedules is rewritten to CPU by a
   ``TorchFunctionMode`` (:class:`_CudaToCpu`), and ``torch.cuda.synchronize`` becomes a no-op.
   The mode stays on inside backward passes, where activation recompute runs forward code again.
4. ``clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``; the
   optimizer's reference to it is replaced by :func:`_clip_grads_cpu`, the same scaling without the
   assertion. (The grad-norm computation itself runs on CPU once factories are rewritten.)
5. Activation recompute (``tensor_parallel.checkpoint``, used by ``train.recompute``) saves and
   restores the CUDA generator's state beside the CPU one and the tracker's. Its two helpers
   ``_get_cuda_rng_state``/``_set_cuda_rng_state`` are replaced by :func:`_no_cuda_rng_state` and
   :func:`_set_no_cuda_rng_state`: there is no CUDA generator, and the CPU generator (the one dropout
   draws from here) and the CPU tracker's states are already saved and restored by the same code, so
   a recomputed layer draws exactly the numbers its first forward drew.

On a CUDA machine :func:`setup_platform` patches nothing and returns ``"cuda"``. The decision is made
once per process: CPU mode when CUDA is unavailable or when ``MEGATRON_OSP_FORCE_CPU=1``.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE_DEVICE: str | None = None
_CUDA_TO_CPU_MODE: "TorchFunctionMode | None" = None


def cpu_mode_requested() -> bool:
    """CPU compatibility is needed when there is no usable GPU (or a test forces it)."""
    return os.environ.get("MEGATRON_OSP_FORCE_CPU") == "1" or not torch.cuda.is_available()


def device() -> torch.device:
    """The device tensors of this process live on (after :func:`setup_platform`)."""
    if _ACTIVE_DEVICE is None:
        return torch.device("cpu" if cpu_mode_requested() else "cuda", _local_cuda_index())
    if _ACTIVE_DEVICE == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _local_cuda_index() -> int | None:
    if cpu_mode_requested():
        return None
    return int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)


def is_cpu() -> bool:
    return setup_platform() == "cpu"


def distributed_backend() -> str:
    return "gloo" if is_cpu() else "nccl"


def setup_platform() -> str:
    """Pick the device once per process; on CPU install the compatibility patches. Idempotent."""
    global _ACTIVE_DEVICE
    if _ACTIVE_DEVICE is not None:
        return _ACTIVE_DEVICE
    if cpu_mode_requested():
        _install_cpu_patches()
        _ACTIVE_DEVICE = "cpu"
    else:
        torch.cuda.set_device(_local_cuda_index())
        _ACTIVE_DEVICE = "cuda"
    return _ACTIVE_DEVICE


class CpuRNGStatesTracker:
    """Named CPU generator states, with Megatron's ``CudaRNGStatesTracker`` interface.

    ``fork(name)`` swaps the process-wide CPU generator to the named state for the block and back
    afterwards, which is what the CUDA tracker does with the CUDA generator.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int):
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added to the tracker")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (and ``.cuda()``) in tensor factory calls to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and _is_cuda(dev):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _engine_with_cuda_to_cpu(run_backward):
    """``run_backward`` (autograd's engine entry) with the rewriting mode on.

    A mode is off while its own handler runs, and ``torch.autograd.backward`` is dispatched through
    the mode, so the engine would run the backward pass without it; with activation recompute the
    backward pass runs forward code again (e.g. Megatron's causal mask, ``device="cuda"``)."""

    def run(*args, **kwargs):
        with _CUDA_TO_CPU_MODE:
            return run_backward(*args, **kwargs)

    run.__wrapped__ = run_backward  # type: ignore[attr-defined]
    return run


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


def _install_cpu_patches():
    """The five CPU patches described in the module docstring."""
    global _CUDA_TO_CPU_MODE
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # torch.cuda.manual_seed is lazy without CUDA and harmless; Megatron calls it while seeding.

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # `initialize_rng_tracker(force_reset=True)` would build a CUDA tracker again: route it here.
    _orig_init = mcore_random.initialize_rng_tracker

    def _initialize_cpu_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or not mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    _initialize_cpu_tracker.__wrapped__ = _orig_init  # type: ignore[attr-defined]
    mcore_random.initialize_rng_tracker = _initialize_cpu_tracker
    # Recompute's CheckpointFunction looks these up in its own module at call time.
    mcore_random._get_cuda_rng_state = _no_cuda_rng_state
    mcore_random._set_cuda_rng_state = _set_no_cuda_rng_state

    from megatron.core.optimizer import optimizer as mcore_optimizer

    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grads_cpu

    _CUDA_TO_CPU_MODE = _CudaToCpu()
    _CUDA_TO_CPU_MODE.__enter__()
    # torch.autograd.backward and torch.autograd.grad call the engine through this module global.
    torch.autograd._engine_run_backward = _engine_with_cuda_to_cpu(torch.autograd._engine_run_backward)


def _no_cuda_rng_state(*args, **kwargs) -> torch.Tensor:
    """Stands for the CUDA generator's state on CPU: there is none (an empty byte tensor)."""
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(new_state, *args, **kwargs) -> None:
    """Restoring the CUDA generator's state on CPU: nothing to restore."""


def _clip_grads_cpu(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
    """Scale gradients in place by max_norm / total_norm when that is below 1 (CPU tensors)."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def seed_everything(seed: int):
    """Seed Python, NumPy, torch and Megatron's per-TP-rank RNG states (CPU or CUDA)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    setup_platform()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Megatron-Core's DistributedOptimizer (and its bf16 optimizer) on CPU. Separate from the five
# patches above: installed by optimizer/megatron_reference.py when it builds Megatron's optimizer.
# ------------------------------------------------------------------------------------------------
_DISTOPT_PATCHED = False


def patch_megatron_distributed_optimizer_for_cpu() -> None:
    """Let Megatron-Core's DistributedOptimizer / Float16OptimizerWithFloat16Params take CPU params.

    Both constructors sort parameters by ``param.type()`` and accept only the CUDA type names
    (``distrib_optimizer.py`` ``_build_model_and_main_param_groups``: ``'torch.cuda.FloatTensor'``
    etc., else ``TypeError``; ``optimizer.py`` ``Float16OptimizerWithFloat16Params.__init__``
    likewise). While those constructors run, ``Tensor.type()`` without arguments names a CPU tensor
    by the CUDA name of its dtype (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``); the
    tensors themselves stay on CPU and ``.type(dtype)`` conversions are untouched. Idempotent.
    """
    global _DISTOPT_PATCHED
    if _DISTOPT_PATCHED:
        return
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    for cls in (distrib_optimizer.DistributedOptimizer, mcore_optimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    _DISTOPT_PATCHED = True


def _with_cuda_type_names(fn):
    def run(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


@contextlib.contextmanager
def _cuda_type_names():
    """``Tensor.type()`` (no arguments) reports CPU tensors under their CUDA type name."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            # The rewriting mode (_CudaToCpu) dispatches Tensor.type back here by name, so the
            # name may already have been rewritten once.
            name = original(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]
