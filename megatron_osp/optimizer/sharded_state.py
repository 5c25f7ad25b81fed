"""Checkpointing optimizer state that lives on one owner rank (``distributed_optimizer=true``).

Megatron's wrappers save optimizer state shaped like each parameter shard, with the parameter's
replica ids, so DP rank 0 writes it. With owner-sharded state that breaks twice: Muon's momentum
is a logical matrix on its NS owner, not a shard; and an AdamW moment exists only on its owner,
which may be any DP rank. These wrappers add each owned logical matrix's momentum as a
``ShardedTensor`` of its own (key: the matrix's global name, so any TP/PP/DP layout with the same
QKV split finds it) and make the owner's Adam moments the main replica. Everything else is
Megatron's ``sharded_state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

from megatron_osp.optimizer.muon import Muon
from megatron_osp.optimizer.sharded_adamw import ShardedAdamW

MOMENTUM_KEY = "muon_owner_momentum"


def _checkpoint_key(block_key: str) -> str:
    return "optimizer.muon_momentum." + block_key.replace("[", ".block").replace("]", "")


def _as_main_replica(tree):
    """Owner-only tensors: the copy that exists is the one to write (DP part of replica_id -> 0)."""
    if isinstance(tree, ShardedTensor):
        rid = tree.replica_id
        tree.replica_id = (*rid[:-1], 0) if isinstance(rid, tuple) else 0
    elif isinstance(tree, dict):
        for v in tree.values():
            _as_main_replica(v)
    elif isinstance(tree, list):
        for v in tree:
            _as_main_replica(v)


class _OwnerStateMixin:
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        sd = super().sharded_state_dict(model_sharded_state_dict, is_loading, metadata)
        inner = self.optimizer
        if isinstance(inner, ShardedAdamW):
            _as_main_replica(sd.get("optimizer", sd).get("state", {}))
        if isinstance(inner, Muon) and inner.shard_state:
            sd[MOMENTUM_KEY] = {
                key: ShardedTensor.from_rank_offsets(_checkpoint_key(key), t, replica_id=0)
                for key, t in inner.owner_momentum_tensors().items()
            }
        return sd

    def load_state_dict(self, state_dict):
        owned = state_dict.pop(MOMENTUM_KEY, None)
        super().load_state_dict(state_dict)
        inner = self.optimizer
        if isinstance(inner, Muon) and inner.shard_state:
            if owned is None:
                raise KeyError(
                    "optimizer.distributed_optimizer=true: the checkpoint has no owner-sharded Muon "
                    "momentum (was it saved with distributed_optimizer=false?)"
                )
            for key, t in inner.owner_momentum_tensors().items():
                t.copy_(owned[key])


class OwnerStateFP32Optimizer(_OwnerStateMixin, FP32Optimizer):
    pass


class OwnerStateFloat16Optimizer(_OwnerStateMixin, Float16OptimizerWithFloat16Params):
    pass
