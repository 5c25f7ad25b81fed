"""AdamW whose moments are sharded over data-parallel ranks, one whole parameter per rank (ZeRO-1).

Used with ``optimizer.distributed_optimizer=true``. Gradients arrive all-reduced (DDP as usual);
each parameter gets one owner among the DP ranks (longest-processing-time packing on its size, the
same ``assign_owners`` Muon uses), only the owner keeps exp_avg / exp_avg_sq and updates it, and the
owners then broadcast the new values, packed, to the other DP ranks. Megatron-Core's
DistributedOptimizer is not used because it needs every parameter of DDP's sharded buffers in its
own param groups, which rules out Muon for the matrices (Megatron-Core's Muon refuses it too).
The fp32 master weights stay replicated; only the Adam moments are sharded. Checkpoints: see
sharded_state.py (the owner's moments are the main replica, whatever its DP rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_osp.optimizer.ownership import assign_owners


@dataclass
class _Item:
    key: str
    shape: tuple[int, int]
    owner: int = -1


class ShardedAdamW(torch.optim.AdamW):
    def __init__(self, params, *, group, **kwargs):
        super().__init__(params, **kwargs)
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._global_ranks = dist.get_process_group_ranks(group)
        flat = [p for g in self.param_groups for p in g["params"]]
        items = [_Item(f"param{i}", (1, p.numel())) for i, p in enumerate(flat)]
        self.elements_per_rank = assign_owners(items, self.world, cost=lambda it: it.shape[1])
        self.owners = [it.owner for it in items]

    def _flat(self):
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        flat = self._flat()
        hidden = []
        for p, owner in zip(flat, self.owners):  # torch's AdamW skips parameters without a grad
            if owner != self.rank and p.grad is not None:
                hidden.append((p, p.grad))
                p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for p, g in hidden:
                p.grad = g
        for r in range(self.world):
            mine = [p for p, owner in zip(flat, self.owners) if owner == r]
            if not mine:
                continue
            buf = torch.cat([p.detach().reshape(-1) for p in mine])
            dist.broadcast(buf, src=self._global_ranks[r], group=self.group)
            if r != self.rank:
                at = 0
                for p in mine:
                    p.copy_(buf[at : at + p.numel()].view_as(p))
                    at += p.numel()
        return loss

    def init_owned_state(self):
        """Adam moments for the parameters this rank owns (what a checkpoint load fills in)."""
        for p, owner in zip(self._flat(), self.owners):
            if owner == self.rank and not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p.data)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
