"""Whole-matrix ZeRO: every unit's fp32 master weight and optimizer state live on its owner only.

``optimizer.distributed_optimizer=true`` builds this instead of Megatron's FP32 / mixed-precision
wrappers. One step, on a pipeline stage with TP x DP domain D:
  1. gradients reach their owners during/after the backward pass (exchange.py; no all-reduce);
  2. the global gradient norm: each owner's sum of squares over its units, one all-reduce over all
     ranks (every unit has exactly one owner in the world), clipping as Megatron does;
  3. owners update their masters: AdamW (torch's, on the owned chunks), Muon (Nesterov momentum,
     Newton-Schulz batched by bucket and shape, the paper's scale, decoupled weight decay),
     muon_only vectors;
  4. owners send the new values back to every holder in the parameters' dtype (exchange.py).
With ``overlap_grad_reduce`` and ``early_newton_schulz`` (the default), step 3's Newton-Schulz for a
bucket runs as soon as the bucket's gradients are in, during the backward pass, on the unclipped
gradient and without touching the momentum. The step uses those results when the global norm does
not clip (the momentum is then advanced by the same operations), and computes them again when it
does: Newton-Schulz is scale-invariant but momentum + clipped gradient is not a multiple of
momentum + gradient. After a step that clipped, the next step does not try (clipping comes in runs:
the first steps of training, loss spikes). Either way the numbers are those of the step-time
computation.
The math is the single-process optimizers' (optimizer/muon.py, torch.optim.AdamW) on the same
fp32 values, so a run matches the single-process run to fp32 round-off whatever the layout.
Checkpoints save every unit's tensors under its layout-free key (see units.py), from its owner.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.optimizer.optimizer import MegatronOptimizer

from megatron_osp.optimizer.muon import advance_momentum, nesterov_directions, update_scale
from megatron_osp.optimizer.newton_schulz import newton_schulz
from megatron_osp.optimizer.zero.exchange import Exchange, view2d
from megatron_osp.optimizer.zero.units import ADAM, MUON, VECTOR

STATE_NAMES = {ADAM: ("exp_avg", "exp_avg_sq"), MUON: ("momentum",), VECTOR: ("momentum",)}


class _Holder:
    """What MegatronOptimizer calls ``self.optimizer``: the param groups the LR scheduler sets."""

    def __init__(self, param_groups):
        self.param_groups = param_groups
        self.state = {}


class ZeroOptimizer(MegatronOptimizer):
    def __init__(self, param_groups, units, exchange: Exchange, config, settings, *, world_group=None):
        super().__init__(_Holder(param_groups), config)
        self.units, self.exchange, self.settings = units, exchange, settings
        self.is_stub_optimizer = False
        self.world_group = world_group
        self.owned = exchange.owned
        self.masters: dict[str, torch.Tensor] = exchange.gather_to_owners(self._read_param)
        self.state_tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.adam_step = 0
        # On the parameters' device: NCCL all-reduces device tensors only (gloo takes CPU ones).
        self.device = exchange.params[0].device if exchange.params else torch.device("cpu")
        self._scale = torch.ones(1, device=self.device)
        # Owned Muon units, one Newton-Schulz batch per (bucket, shape), in a fixed order: the same
        # batches whether they run early or in the step, so both give bit-identical results.
        batches = defaultdict(list)
        for u in self.owned:
            if u.kind == MUON:
                batches[(exchange.bucket_of_param[u.param_index].index, u.shape)].append(u)
        self.ns_batches: dict[tuple, list] = dict(batches)
        self._early: dict[tuple, torch.Tensor] = {}  # batch key -> its scaled Newton-Schulz output
        self.early_ns = {"used": 0, "redone": 0}  # batches, over the run (clipping forces a redo)
        self._clipped = False  # did the last step clip? Then the next one does not run early NS
        if settings.overlap_grad_reduce and settings.early_newton_schulz:
            exchange.on_grads = self._early_newton_schulz

    # ------------------------------------------------------------------ Megatron's interface
    def _read_param(self, u, s):
        p = self.exchange.params[u.param_index]
        return view2d(p.detach())[s.local_sel_on(p.device)]

    def zero_grad(self, set_to_none: bool = True):
        self.exchange.begin_step()
        self._early.clear()

    def get_loss_scale(self):
        return self._scale

    def prepare_grads(self) -> bool:
        self.exchange.finish_grads()
        return False

    def step_with_ready_grads(self) -> bool:
        self._update(1.0)
        return True

    def reload_model_params(self, state_dict=None):
        self.exchange.finish_params()
        self.masters = self.exchange.gather_to_owners(self._read_param)

    def finish_param_sync(self):
        """Wait for (and apply) any parameter return still in flight (before reading the model)."""
        self.exchange.finish_params()

    def get_grad_norm(self):
        grads = self.exchange.grads
        local = torch.zeros(1, dtype=torch.float64, device=self.device)
        for u in self.owned:
            local += grads[u.key].double().square().sum()
        if dist.is_initialized():
            dist.all_reduce(local, group=self.world_group)
        return math.sqrt(float(local))

    @torch.no_grad()
    def step(self):
        self.prepare_grads()
        norm = self.get_grad_norm()
        coeff = 1.0
        if self.config.clip_grad > 0.0:
            c = self.config.clip_grad / (norm + 1.0e-6)
            coeff = c if c < 1.0 else 1.0
        self._clipped = coeff != 1.0
        self._update(coeff)
        return True, norm, None

    # ------------------------------------------------------------------ the update on owners
    def _state(self, u, device):
        st = self.state_tensors.get(u.key)
        if st is None:
            st = self.state_tensors[u.key] = {
                n: torch.zeros(u.shape, dtype=torch.float32, device=device) for n in STATE_NAMES[u.kind]
            }
        return st

    def _directions(self, moms, grads) -> list[torch.Tensor]:
        """Advance the momentum buffers ``moms`` in place; the Nesterov update directions (muon.py's)."""
        return nesterov_directions(moms, grads, self.settings.muon_momentum, nesterov=True)

    def _orthogonalize(self, batch, directions) -> torch.Tensor:
        """One batched Newton-Schulz over a batch's update directions, times the paper's scale."""
        dtype = torch.bfloat16 if directions[0].is_cuda else torch.float32
        stack = torch.stack([d.to(dtype) for d in directions])
        out = newton_schulz(stack, steps=self.settings.muon_ns_steps, coefficients=self.settings.muon_coefficients,
                            backend=self.settings.muon_ns_backend)
        return (out * update_scale(*batch[0].shape, self.settings.muon_lr_scale)).to(dtype)

    @torch.no_grad()
    def _early_newton_schulz(self, bucket):
        """Exchange.on_grads: orthogonalise this bucket's owned Muon batches on the unclipped
        gradients, reading the momentum without advancing it (the step decides whether to keep it)."""
        if self._clipped:  # clipping comes in runs (early training, spikes): a redo is likely
            return
        grads = self.exchange.grads
        for key, batch in self.ns_batches.items():
            if key[0] != bucket.index or any(u.key not in grads for u in batch):
                continue
            # On a copy of the momentum: the step advances the real one if it keeps these results.
            moms = [self._state(u, grads[u.key].device)["momentum"].clone() for u in batch]
            directions = self._directions(moms, [grads[u.key] for u in batch])
            self._early[key] = self._orthogonalize(batch, directions)
            if self.exchange.events is not None:
                self.exchange.events.append(("newton_schulz", bucket.index))

    def _update(self, clip_coeff: float):
        groups = self.param_groups
        grads = self.exchange.grads
        self.adam_step += 1  # the same on every rank (a checkpoint's common state)
        for u in self.owned:
            g = grads[u.key]
            if clip_coeff != 1.0:
                g.mul_(clip_coeff)
            group = groups[u.group]
            st = self._state(u, g.device)
            if u.kind == ADAM:
                self._adamw(self.masters[u.key], g, st, group)
            elif u.kind == VECTOR:
                d = self._directions([st["momentum"]], [g])[0]
                scale = update_scale(1, d.numel(), self.settings.muon_lr_scale)
                self._apply(u, d * (scale / (d.norm() + 1e-8)), group)
        for key, batch in self.ns_batches.items():
            early = self._early.pop(key, None)
            moms = [self._state(u, grads[u.key].device)["momentum"] for u in batch]
            if early is not None and clip_coeff == 1.0:
                for u, m in zip(batch, moms):  # advance the momentum as the early pass assumed
                    advance_momentum(m, grads[u.key], self.settings.muon_momentum)
                out = early
                self.early_ns["used"] += 1
            else:
                self.early_ns["redone"] += early is not None
                out = self._orthogonalize(batch, self._directions(moms, [grads[u.key] for u in batch]))
            for u, o in zip(batch, out):
                self._apply(u, o.float(), groups[u.group])
        self._early.clear()
        self.exchange.start_params(self.masters)

    def _apply(self, u, update, group):
        w = self.masters[u.key]
        if group["weight_decay"]:
            w.mul_(1 - group["lr"] * group["weight_decay"])
        w.add_(update, alpha=-group["lr"])

    def _adamw(self, w, g, st, group):
        """torch.optim.AdamW's single-tensor update (decoupled decay, bias correction)."""
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        step = float(self.adam_step)
        w.mul_(1 - lr * wd)
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = lr / (1 - b1**step)
        denom = (st["exp_avg_sq"].sqrt() / (1 - b2**step) ** 0.5).add_(eps)
        w.addcdiv_(st["exp_avg"], denom, value=-step_size)

    # ------------------------------------------------------------------ checkpoints
    def _state_dict_with(self, as_saved) -> dict:
        """Hyper-parameters and step (common) and every owned unit's tensors through ``as_saved``."""
        self.finish_param_sync()
        zero = {}
        for u in self.owned:
            master = self.masters[u.key]
            tensors = {"master": master, **self._state(u, master.device)}
            zero[u.key] = {n: as_saved(f"optimizer.zero.{n}.{u.key}", t) for n, t in tensors.items()}
        return {
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "adam_step": self.adam_step,
            "zero": zero,
        }

    def state_dict(self):
        return self._state_dict_with(lambda key, t: t.clone())

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False, metadata=None):
        return self._state_dict_with(lambda key, t: ShardedTensor.from_rank_offsets(key, t, replica_id=0))

    def load_state_dict(self, state_dict):
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer checkpoint has {len(saved_groups)} param groups, this run has "
                f"{len(self.param_groups)} (another optimizer.name?)"
            )
        for group, saved in zip(self.param_groups, saved_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
        self.adam_step = int(state_dict["adam_step"])
        zero = state_dict.get("zero")
        if zero is None:
            raise KeyError("the checkpoint's optimizer state was not saved with distributed_optimizer=true")
        for u in self.owned:
            if u.key not in zero:
                raise KeyError(f"optimizer checkpoint has no state for {u.key!r}")
            saved = zero[u.key]
            self.masters[u.key].copy_(saved["master"])
            for n, t in self._state(u, self.masters[u.key].device).items():
                t.copy_(saved[n])
        self._early.clear()
        self.exchange.start_params(self.masters)
        self.exchange.finish_params()


def stage_domain():
    """The TP x DP process group of this pipeline stage and each member's (tp, dp) coordinates."""
    if not dist.is_initialized():
        return None, [(0, 0)], 0
    group = parallel_state.get_tensor_and_data_parallel_group()
    world = dist.get_world_size(group)
    mine = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank())
    coords = [None] * world
    dist.all_gather_object(coords, mine, group=group)
    return group, [tuple(c) for c in coords], dist.get_rank(group)
