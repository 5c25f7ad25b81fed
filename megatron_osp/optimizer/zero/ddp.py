"""Megatron DDP with its gradient all-reduce replaced by delivery to unit owners (exchange.py).

Megatron's ``DistributedDataParallel`` still provides what it is good at: the contiguous fp32
``main_grad`` buffers, the hooks that accumulate into them, ``no_sync`` for gradient accumulation.
``OwnerDDP`` adds one thing to its backward hook (tell the exchange that a parameter's last
micro-batch gradient is in) and turns ``start/finish_grad_sync`` into the exchange's. The forward
pre-hooks that wait for returned parameters are added by ``attach`` once the optimizer exists.
"""

from __future__ import annotations

from contextlib import contextmanager

from megatron.core.distributed import DistributedDataParallel


class OwnerDDP(DistributedDataParallel):
    exchange = None  # set by attach(); the hooks exist before it does
    _last_microbatch = True

    def _make_backward_post_hook(self, param):
        accumulate = super()._make_backward_post_hook(param)

        def hook(*unused):
            accumulate(*unused)
            if self.exchange is not None and self._last_microbatch:
                self.exchange.grad_ready(param)

        return hook

    @contextmanager
    def no_sync(self):
        self._last_microbatch = False
        try:
            with super().no_sync():
                yield
        finally:
            self._last_microbatch = True

    def start_grad_sync(self, *unused):
        pass  # buckets go when their gradients are in (or all at finish_grad_sync)

    def finish_grad_sync(self, force_all_reduce: bool = False):
        if self.exchange is not None:
            self.exchange.finish_grads()


def finalize_owner_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """``config.finalize_model_grads_func`` for OwnerDDP chunks: deliver every gradient to its owner.

    Megatron's finalize_model_grads would then all-reduce sequence-parallel norm gradients over TP
    and tied embeddings over PP; the exchange already sums the former at the owner, and the OSP
    model has no tied embeddings (checked when the optimizer is built).
    """
    if num_tokens is not None:
        raise ValueError("distributed_optimizer=true does not support per-token loss scaling")
    for chunk in model:
        chunk.finish_grad_sync()


def attach(chunks, exchange) -> list:
    """Connect the exchange to the chunks: gradient hooks, and a forward pre-hook on every module
    with parameters of its own that waits for their bucket's returned values."""
    handles = []
    for chunk in chunks:
        chunk.exchange = exchange
        for module in chunk.module.modules():
            if any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_pre_hook(lambda m, *_: exchange.wait_params_of(m)))
    return handles


@contextmanager
def events_recorded(exchange, events: list):
    """Record the exchange's issue/wait events into ``events`` (tests of the overlap order)."""
    exchange.events = events
    try:
        yield events
    finally:
        exchange.events = None
