"""Count the bytes this rank sends through torch.distributed while a block runs.

``CommCounter`` replaces the collectives and point-to-point calls of ``torch.distributed`` with
counting wrappers for the duration of a ``with`` block (both ``dist.all_reduce`` and
``torch.distributed.all_reduce`` callers are the same module attribute) and restores them on exit.
With ``aliases=True`` (the default) it also patches module-level names outside ``torch`` that are
bound to the same function objects, e.g. Megatron-Core's ``dist_reduce_scatter_func =
torch.distributed.reduce_scatter_tensor`` in ``param_and_grad_buffer.py``, which an attribute
patch alone would never see.

The byte model is the algorithmic ("bus bytes") convention NCCL's performance tests use, for one
rank of a group of ``n`` ranks (``N`` = the size in bytes named below; results are floored ints):

- ``all_reduce`` (N = the tensor): 2 (n-1)/n * N (a ring: reduce-scatter, then all-gather);
- ``reduce_scatter_tensor``, ``_reduce_scatter_base``, ``reduce_scatter_single`` (N = the full
  input) and ``reduce_scatter`` (N = all inputs together): (n-1)/n * N;
- ``all_gather_into_tensor``, ``_all_gather_base``, ``all_gather_single`` (N = the full output)
  and ``all_gather`` (N = all outputs together): (n-1)/n * N;
- ``all_to_all_single``, ``all_to_all``: exact, the bytes of every split addressed to another rank
  (this rank's own split is not sent);
- ``broadcast``, ``reduce`` (N = the tensor): (n-1)/n * N (a ring / pipelined chain; every rank
  counts the same, root or not);
- ``send``, ``isend``: N; ``recv``, ``irecv``: 0; ``batch_isend_irecv``: N summed over its isends.

A group of size 1 sends 0; a rank outside the ``group`` it is called with sends 0. Calls made
inside another counted call (a wrapper reached through an alias) are counted once, by the outer
one. Not counted: object collectives (``all_gather_object``, ``broadcast_object_list``, ...),
``scatter``/``gather``, ``all_reduce_coalesced``, and torch's functional collectives
(``torch.distributed._functional_collectives``), which do not go through these functions.

While a counter is active, ``dist.P2POp`` is a subclass that accepts the counting ``isend`` /
``irecv`` (torch checks the op by identity) and stores the original function.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections import defaultdict

import torch
import torch.distributed as dist

# Public names whose bytes are modelled, with the rule each one follows (see the table above).
_RULES = {
    "all_reduce": "all_reduce",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter": "reduce_scatter_list",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather_single": "all_gather",
    "all_gather": "all_gather_list",
    "all_to_all_single": "all_to_all_single",
    "all_to_all": "all_to_all",
    "broadcast": "ring",
    "reduce": "ring",
    "send": "send",
    "isend": "send",
    "recv": "recv",
    "irecv": "recv",
    "batch_isend_irecv": "batch",
}
_ALWAYS_ASYNC = {"isend", "irecv", "batch_isend_irecv"}

_local = threading.local()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_size_and_rank(group) -> tuple[int, int]:
    """(n, this rank's index in the group); index -1 when this rank is not a member."""
    if group is None:
        return dist.get_world_size(), dist.get_rank()
    return dist.get_world_size(group), dist.get_rank(group)


def _all_to_all_single_bytes(a, my_index: int) -> int:
    inp = a["input"]
    n = a["_n"]
    if inp.dim() == 0 or inp.shape[0] == 0:
        return 0
    row = _nbytes(inp) // inp.shape[0]
    splits = a.get("input_split_sizes") or [inp.shape[0] // n] * n
    return sum(int(s) * row for j, s in enumerate(splits) if j != my_index)


def _model_bytes(rule: str, a: dict, n: int, my_index: int) -> int:
    """Bytes this rank sends for one call, by the module docstring's model."""
    if rule == "recv":
        return 0
    if rule == "send":
        return _nbytes(a["tensor"])
    if rule == "batch":
        return sum(_nbytes(op.tensor) for op in a["p2p_op_list"] if _unwrap(op.op) is _ORIGINALS["isend"])
    if n <= 1 or my_index < 0:
        return 0
    if rule == "all_reduce":
        return 2 * (n - 1) * _nbytes(a["tensor"]) // n
    if rule == "reduce_scatter":
        return (n - 1) * _nbytes(a["input"]) // n
    if rule == "reduce_scatter_list":
        return (n - 1) * sum(_nbytes(t) for t in a["input_list"]) // n
    if rule == "all_gather":
        return (n - 1) * _nbytes(a["output_tensor"]) // n
    if rule == "all_gather_list":
        return (n - 1) * sum(_nbytes(t) for t in a["tensor_list"]) // n
    if rule == "ring":
        return (n - 1) * _nbytes(a["tensor"]) // n
    if rule == "all_to_all_single":
        return _all_to_all_single_bytes(dict(a, _n=n), my_index)
    if rule == "all_to_all":
        return sum(_nbytes(t) for j, t in enumerate(a["input_tensor_list"]) if j != my_index)
    raise AssertionError(f"no byte rule {rule!r}")


_ORIGINALS: dict[str, object] = {name: getattr(dist, name) for name in _RULES if hasattr(dist, name)}
_ORIGINAL_P2POP = dist.P2POp


def _unwrap(fn):
    return getattr(fn, "__comm_count_original__", fn)


class CommCounter:
    """Counts the bytes this rank sends through torch.distributed inside ``with CommCounter() as c``.

    ``c.bytes_sent``: total bytes; ``c.by_op``: op name -> bytes; ``c.calls``: one
    ``(op, bytes, group_size, async_op)`` per call, in order; ``c.reset()`` clears all three.
    Counters do not nest (a second one raises while the first is active).
    """

    _active: "CommCounter | None" = None

    def __init__(self, aliases: bool = True):
        self.aliases = aliases
        self._patched: list[tuple[object, str, object]] = []
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0
        self.by_op: dict[str, int] = defaultdict(int)
        self.calls: list[tuple[str, int, int, bool]] = []

    # ------------------------------------------------------------------ recording
    def _record(self, name: str, bound: dict) -> None:
        group = bound.get("group")
        if name == "batch_isend_irecv":
            ops = bound["p2p_op_list"]
            group = ops[0].group if ops else None
        n, my_index = _group_size_and_rank(group)
        nbytes = _model_bytes(_RULES[name], bound, n, my_index)
        async_op = name in _ALWAYS_ASYNC or bool(bound.get("async_op", False))
        self.bytes_sent += nbytes
        self.by_op[name] += nbytes
        self.calls.append((name, nbytes, n, async_op))

    def _wrap(self, name: str, original):
        sig = inspect.signature(original)

        @functools.wraps(original)
        def counting(*args, **kwargs):
            depth = getattr(_local, "depth", 0)
            if depth == 0:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                self._record(name, bound.arguments)
            _local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                _local.depth = depth

        counting.__comm_count_original__ = original  # type: ignore[attr-defined]
        return counting

    # ------------------------------------------------------------------ patching
    def __enter__(self) -> "CommCounter":
        if CommCounter._active is not None:
            raise RuntimeError("a CommCounter is already active; counters do not nest")
        wrappers = {id(orig): (orig, self._wrap(name, orig)) for name, orig in _ORIGINALS.items()}
        wrappers[id(_ORIGINAL_P2POP)] = (_ORIGINAL_P2POP, _CountingP2POp)
        targets = [dist]
        if self.aliases:
            targets += [m for name, m in list(sys.modules.items()) if m is not None and not _is_torch(name)]
        for module in targets:
            try:
                items = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in items:
                original, wrapper = wrappers.get(id(value), (None, None))
                if original is not None and original is value:
                    self._patched.append((module, attr, value))
                    setattr(module, attr, wrapper)
        CommCounter._active = self
        return self

    def __exit__(self, *exc) -> None:
        for module, attr, value in reversed(self._patched):
            setattr(module, attr, value)
        self._patched.clear()
        CommCounter._active = None


def _is_torch(module_name: str) -> bool:
    return module_name == "torch" or module_name.startswith("torch.")


class _CountingP2POp(_ORIGINAL_P2POP):
    """``dist.P2POp`` that accepts a counting isend/irecv and keeps the original function."""

    def __new__(cls, op, *args, **kwargs):
        return super().__new__(cls, _unwrap(op), *args, **kwargs)

    def __init__(self, op, *args, **kwargs):
        super().__init__(_unwrap(op), *args, **kwargs)
