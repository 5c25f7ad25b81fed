"""OSP's optimizers: Newton–Schulz, (distributed) Muon, parameter routing and the builder."""

from megatron_osp.optimizer.builder import OptimSettings, ddp_config, get_osp_optimizer
from megatron_osp.optimizer.muon import Muon, whole_matrix_blocks
from megatron_osp.optimizer.newton_schulz import newton_schulz
from megatron_osp.optimizer.ownership import assign_owners
from megatron_osp.optimizer.routing import logical_blocks, route_parameters

__all__ = [
    "Muon",
    "OptimSettings",
    "assign_owners",
    "ddp_config",
    "get_osp_optimizer",
    "logical_blocks",
    "newton_schulz",
    "route_parameters",
    "whole_matrix_blocks",
]
