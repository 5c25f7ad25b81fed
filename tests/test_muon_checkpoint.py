"""Muon momentum and Adam moments go through dist_checkpointing and reshard from TP=2 to TP=1.

A TP=2 world takes one Muon+AdamW step, saves model and optimizer with Megatron's
``dist_checkpointing`` (the optimizer's ``sharded_state_dict``, as Megatron's own optimizers do),
then takes a second step. A single process at TP=1 loads that checkpoint and takes the same second
step: its weights must equal the TP=2 run's, which needs the momentum and both Adam moments (and
Adam's step count) to have been resharded correctly.
"""

import torch

from megatron_osp.testing.distributed import run_distributed

SETTINGS = {"name": "muon", "lr": 3e-3, "muon_lr": 0.02, "clip_grad": 0.0, "weight_decay": 0.1}


def _model_cfg():
    from megatron_osp.models import get_preset

    return get_preset("test", num_query_groups=2, embedding_projection=True)


def _grads(shapes, step):
    g = torch.Generator().manual_seed(300 + step)
    return {k: torch.randn(*s, generator=g) for k, s in sorted(shapes.items())}


def _build(tp, extra=None):
    from megatron_osp import platform
    from megatron_osp.models import build_gpt_model, transformer_config
    from megatron_osp.optimizer import OptimSettings, get_osp_optimizer

    platform.seed_everything(1234)
    cfg = _model_cfg()
    model = build_gpt_model(cfg, transformer_config(cfg, tensor_parallel_size=tp))
    return model, get_osp_optimizer(OptimSettings(**SETTINGS, **(extra or {})), [model], log=None)


def _step(model, opt, grads):
    from megatron.core import parallel_state

    from megatron_osp.models.layout import split_for_rank

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    for name, p in model.named_parameters():
        p.grad = split_for_rank(grads[name], p, name, model, rank, size).clone()
    ok, _, _ = opt.step()
    assert ok


def _muon(opt):
    return [o.optimizer for o in opt.chained_optimizers if type(o.optimizer).__name__ == "Muon"][0]


def _load_fresh(ckpt, extra=None):
    """A new one-process model and optimizer with both loaded from ``ckpt``; returns them and Muon."""
    from megatron.core import dist_checkpointing

    model, opt = _build(1, extra)
    state = {"model": model.sharded_state_dict()}
    state["optimizer"] = opt.sharded_state_dict(dict(state), is_loading=True)
    loaded = dist_checkpointing.load(state, str(ckpt))
    model.load_state_dict(loaded["model"], strict=True)
    opt.load_state_dict(loaded["optimizer"])
    return model, opt, _muon(opt)


def _save_worker(rank, world_size, ckpt_dir, weights, grads, tp=2, extra=None):
    from megatron.core import dist_checkpointing

    from megatron_osp import parallel
    from megatron_osp.models.layout import gather_logical, load_logical_state_dict

    parallel.init_distributed(tp, 1)
    model, opt = _build(tp, extra)
    load_logical_state_dict(model, weights)
    _step(model, opt, grads[0])
    state = {"model": model.sharded_state_dict()}
    state["optimizer"] = opt.sharded_state_dict(dict(state))
    dist_checkpointing.save(state, ckpt_dir)
    _step(model, opt, grads[1])
    logical = gather_logical(model, dict(model.named_parameters()))
    muon = _muon(opt)
    return {
        "weights": {k: v.detach().clone() for k, v in logical.items()} if rank == 0 else None,
        "all_keys": sorted(b.key for b in muon.blocks),
    }


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_the_same_next_update(tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_osp import parallel

    parallel.init_distributed(1, 1)
    try:
        model, opt = _build(tp=1)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        shapes = {n: p.shape for n, p in model.named_parameters()}
        grads = [_grads(shapes, s) for s in range(2)]
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        tp2_after = run_distributed(_save_worker, 2, str(ckpt), weights, grads)[0]["weights"]

        # Fresh TP=1 model and optimizer (different weights until loaded), then load.
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        model, opt, muon = _load_fresh(ckpt)
        bufs = [muon.state[p]["momentum_buffer"] for g in muon.param_groups for p in g["params"]]
        assert all(b.abs().sum() > 0 for b in bufs), "momentum was not restored"

        _step(model, opt, grads[1])
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), tp2_after[name], rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")

        # Control: without the optimizer state the second step differs (so the check above can fail).
        model2, opt2 = _build(tp=1)
        state = {"model": model2.sharded_state_dict()}
        model2.load_state_dict(dist_checkpointing.load(state, str(ckpt))["model"], strict=True)
        _step(model2, opt2, grads[1])
        diff = max((a - b).abs().max().item() for a, b in zip(model2.parameters(), model.parameters()))
        assert diff > 1e-4
    finally:
        parallel.shutdown()
