"""OSP's optimizers: Newton–Schulz, Muon, parameter routing and the builder."""

from megatron_osp.optimizer.builder import OptimSettings, get_osp_optimizer
from megatron_osp.optimizer.muon import Muon
from megatron_osp.optimizer.newton_schulz import newton_schulz
from megatron_osp.optimizer.routing import logical_blocks, route_parameters

__all__ = ["Muon", "OptimSettings", "get_osp_optimizer", "logical_blocks", "newton_schulz", "route_parameters"]
