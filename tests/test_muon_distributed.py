"""Distributed Muon: TP=2, PP=2, DP=2 and TP=2 x DP=2 give the single-process optimizer steps.

The reference builds the OSP optimizer in this process (TP=PP=DP=1) on the "test" model, sets random
logical gradients and takes two steps (the second exercises momentum and a different clipping
factor; clip_grad is far below the gradient norm so clipping is always active). The parallel runs
load the same logical weights, set each rank's slice of the same gradients, take the same two steps
and send back their logical weights (models/layout.py), the grad norms, and which logical matrices
each rank ran Newton-Schulz on. fp32 on CPU, so the tolerance is fp32 round-off.
"""

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

TOL = dict(rtol=1e-5, atol=2e-6)
CLIP = 0.5
BASE = {"name": "muon", "lr": 3e-3, "muon_lr": 0.02, "clip_grad": CLIP, "weight_decay": 0.1}


def _model_cfg():
    from megatron_osp.models import get_preset

    # 4 heads in 2 query groups: the Q/K/V split differs from a plain row split of the shard.
    return get_preset("test", num_query_groups=2, embedding_projection=True)


def _grads(shapes, step):
    g = torch.Generator().manual_seed(100 + step)
    return {k: (1 + 2 * step) * torch.randn(*s, generator=g) for k, s in sorted(shapes.items())}


def _expected_keys(cfg, qkv_split, first_layer, num_layers, first, last, muon_only=False):
    keys = []
    for layer in range(first_layer, first_layer + num_layers):
        pre = f"decoder.layers.{layer}."
        nq = {"qkv": 3, "per_head": cfg.num_attention_heads + 2 * cfg.num_query_groups, "none": 1}[qkv_split]
        keys += [f"{pre}self_attention.linear_qkv.weight[{i}]" for i in range(nq)] if nq > 1 else [
            f"{pre}self_attention.linear_qkv.weight"
        ]
        keys += [f"{pre}self_attention.linear_proj.weight", f"{pre}mlp.linear_fc2.weight"]
        keys += [f"{pre}mlp.linear_fc1.weight[0]", f"{pre}mlp.linear_fc1.weight[1]"]
    if first:
        keys.append("embedding_projection.weight")
        if muon_only:
            keys.append("embedding.word_embeddings.weight")
    if last:
        keys.append("output_projection.weight")
        if muon_only:
            keys.append("output_layer.weight")
    return sorted(keys)


def _run_steps(model, settings, grads_by_step):
    from megatron_osp.models.layout import layer_offset, split_for_rank, to_global_name
    from megatron_osp.optimizer import get_osp_optimizer
    from megatron.core import parallel_state

    opt = get_osp_optimizer(settings, [model], log=None)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    offset = layer_offset(model)
    norms = []
    for grads in grads_by_step:
        for name, p in model.named_parameters():
            full = grads[to_global_name(name, offset)]
            p.grad = split_for_rank(full, p, name, model, tp_rank, tp_size).clone()
        ok, norm, _ = opt.step()
        assert ok
        norms.append(float(norm))
    muon = [o.optimizer for o in opt.chained_optimizers if type(o.optimizer).__name__ == "Muon"]
    return opt, norms, muon[0] if muon else None


def _reference(settings_kw):
    """Weights, gradients, and the single-process grad norms, weights after, NS call count."""
    from megatron_osp import parallel, platform
    from megatron_osp.models import build_gpt_model, transformer_config
    from megatron_osp.optimizer import OptimSettings

    parallel.init_distributed(1, 1)
    platform.seed_everything(1234)
    try:
        cfg = _model_cfg()
        model = build_gpt_model(cfg, transformer_config(cfg))
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        shapes = {n: p.shape for n, p in model.named_parameters()}
        grads = [_grads(shapes, s) for s in range(2)]
        _, norms, muon = _run_steps(model, OptimSettings(**settings_kw), grads)
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        return weights, grads, norms, after, muon.ns_calls
    finally:
        parallel.shutdown()


def _worker(rank, world_size, tp, pp, cases, weights, grads):
    """Every settings variant of ``cases`` at one layout, in one spawned world (spawns are slow)."""
    from megatron.core import parallel_state

    from megatron_osp import parallel, platform
    from megatron_osp.models import build_gpt_model, transformer_config
    from megatron_osp.models.layout import gather_logical, layer_offset, load_logical_state_dict
    from megatron_osp.optimizer import OptimSettings

    parallel.init_distributed(tp, pp)
    out = []
    for settings_kw in cases:
        platform.seed_everything(1234)
        cfg = _model_cfg()
        model = build_gpt_model(cfg, transformer_config(cfg, tensor_parallel_size=tp, pipeline_parallel_size=pp))
        load_logical_state_dict(model, weights)
        opt, norms, muon = _run_steps(model, OptimSettings(**settings_kw), grads)
        logical = gather_logical(model, dict(model.named_parameters()))
        leader = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
        out.append({
            "weights": {k: v.detach().clone() for k, v in logical.items()} if leader else {},
            "norms": norms,
            "stage": parallel_state.get_pipeline_model_parallel_rank(),
            "first_layer": layer_offset(model),
            "num_layers": len(model.decoder.layers),
            "ns_keys": list(muon.last_ns_keys),
            "ns_calls": muon.ns_calls,
            "owned": sorted(b.key for b in muon.owned),
            "all_keys": sorted(b.key for b in muon.blocks),
        })
    return out


MUON_ONLY = {"name": "muon_only", "muon_qkv_split": "per_head", "muon_coefficients": "polar_express",
             "muon_lr_scale": "shape"}
LAYOUTS = {  # name: (tp, pp, world, settings variants run in the same world)
    "tp2": (2, 1, 2, [{}, MUON_ONLY]),
    "pp2": (1, 2, 2, [{}]),
    "dp2": (1, 1, 2, [{}]),
    "tp2dp2": (2, 1, 4, [{}]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_distributed_muon_steps_equal_single_process(layout):
    tp, pp, world, variants = LAYOUTS[layout]
    cases = [{**BASE, **extra} for extra in variants]
    weights = grads = None
    refs = []
    for kw in cases:
        weights, grads, *ref = _reference(kw)
        refs.append(ref)
    per_rank = run_distributed(_worker, world, tp, pp, cases, weights, grads)
    for i, (kw, ref) in enumerate(zip(cases, refs)):
        _check(kw, tp, pp, world, weights, *ref, [r[i] for r in per_rank])


def _check(kw, tp, pp, world, weights, ref_norms, ref_after, ref_ns_calls, results):
    got = {}
    for r in results:
        got.update(r["weights"])
        assert r["norms"] == pytest.approx(ref_norms, rel=1e-5)  # global norm across TP and PP
    assert ref_norms[0] > 10 * CLIP and ref_norms[1] > 10 * CLIP  # clipping was active
    assert sorted(got) == sorted(ref_after)
    for name, ref in ref_after.items():
        torch.testing.assert_close(got[name], ref, **TOL, msg=lambda m: f"{kw}: {name}: {m}")
        assert not torch.equal(ref, weights[name]), f"{name} did not move"

    # Ownership: per pipeline stage, every logical matrix is orthogonalised exactly once per step,
    # by its owner, and the split into logical matrices follows the config, not the shard.
    cfg = _model_cfg()
    qkv_split = kw.get("muon_qkv_split", "qkv")
    muon_only = kw["name"] == "muon_only"
    total = 0
    for stage in range(pp):
        ranks = [r for r in results if r["stage"] == stage]
        done = [k for r in ranks for k in r["ns_keys"]]
        assert len(done) == len(set(done)), "a logical matrix was orthogonalised twice in a step"
        first = ranks[0]
        expected = _expected_keys(
            cfg, qkv_split, first["first_layer"], first["num_layers"], stage == 0, stage == pp - 1, muon_only
        )
        assert sorted(done) == expected
        for r in ranks:
            assert r["all_keys"] == expected
            assert sorted(r["ns_keys"]) == r["owned"]  # NS only on matrices it owns
            assert r["ns_calls"] == 2 * len(r["owned"])
        if world // pp > 1:
            assert sum(1 for r in ranks if r["owned"]) > 1, "NS work was not spread over the domain"
        total += len(done)
    assert 2 * total == ref_ns_calls  # the single process ran NS on the same number of matrices
