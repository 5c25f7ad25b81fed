"""Activation recompute (`train.recompute=none|selective|full`): same numbers, fewer saved activations.

Recompute must change memory, never results: 5 training steps with selective, full-uniform and
full-block recompute give the per-step losses, final weights and kurtosis reports of the run without
it, bit for bit (CPU, fp32, one thread), for the Adam baseline (RMSNorm, no EmbProj, with dropout so
the replayed random numbers are checked too) and for OSP (Muon, SSNorm, EmbProj), in one process and
at PP=2 on 2 gloo ranks. That it really recomputes is shown by counting forward calls in training
mode: full recompute runs each recomputed layer twice, selective runs core attention twice; and by
the bytes autograd saves for backward in one forward (none > selective and block > full uniform).
"""

import numpy as np
import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

STEPS = 5
LAYERS = 4  # two per stage at PP=2, so recompute_method=block with 1 layer leaves one layer alone

VARIANTS = {
    "none": [],
    "selective": ["train.recompute=selective"],
    "full_uniform": ["train.recompute=full", "train.recompute_method=uniform", "train.recompute_num_layers=1"],
    "full_uniform2": ["train.recompute=full", "train.recompute_num_layers=2"],
    "full_block": ["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=1"],
}
OPTIMIZERS = {
    "adam": ["optimizer.name=adam", "model.normalization=rmsnorm", "model.embedding_projection=false",
             "model.hidden_dropout=0.1", "model.attention_dropout=0.1"],
    "osp": ["optimizer.name=muon", "optimizer.muon_lr=0.02", "model.normalization=ssnorm",
            "model.embedding_projection=true"],
}


def _base(corpus, pp):
    return [
        "model.preset=test",
        f"model.num_layers={LAYERS}",
        f"data.paths=[{corpus}]",
        "data.eod_id=255",
        f"parallel.pipeline_parallel_size={pp}",
        f"train.train_steps={STEPS}",
        "train.warmup_steps=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_interval=1",
        "train.kurtosis_interval=2",
        "train.eval_batches=1",
        "train.save=false",
        "train.tensorboard=false",
        "train.progress_bar=false",
    ]


def _count_training_calls(core):
    """Forward hooks counting each layer's and each core attention's calls in training mode."""
    counts = {}

    def hook(name):
        def count(module, args, output):
            if module.training:
                counts[name] = counts.get(name, 0) + 1

        return count

    handles = []
    for layer in core.decoder.layers:
        n = layer.layer_number
        handles.append(layer.register_forward_hook(hook(f"layer_{n}")))
        handles.append(layer.self_attention.core_attention.register_forward_hook(hook(f"core_attn_{n}")))
    return counts, handles


def _saved_activation_bytes(trainer) -> int:
    """Bytes autograd keeps for the backward pass of one training-mode forward (parameters excluded):
    the activation memory recompute exists to cut. A fixed synthetic micro-batch, nothing trained."""
    cfg = trainer.config
    core = unwrap_model(trainer.model)
    params = {p.data_ptr() for p in core.parameters()}
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    tokens = (torch.arange(b * s).reshape(b, s) * 7) % 250
    positions = torch.arange(s).expand(b, s)
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    core.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        core(tokens, positions, None, labels=tokens)
    return total


def unwrap_model(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _variants_worker(rank, world_size, runs, run_root):
    """Train each (name, overrides) of ``runs`` in turn in this world; what each run leaves behind."""
    import json
    from pathlib import Path

    from megatron.core import parallel_state

    from megatron_osp.models.layout import gather_logical
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer, unwrap

    out = {}
    for name, overrides in runs:
        run_dir = Path(run_root) / name
        trainer = Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}"]), log=lambda *_: None)
        core = unwrap(trainer.model)
        saved = _saved_activation_bytes(trainer) if world_size == 1 else None
        counts, handles = _count_training_calls(core)
        summary = trainer.train()
        for h in handles:
            h.remove()
        kurtosis = run_dir / "kurtosis.json"
        out[name] = {
            "losses": [h["loss"] for h in trainer.history],
            "val_loss": summary["val_loss"],
            "kurtosis_history": summary["kurtosis_history"],
            "kurtosis": json.loads(kurtosis.read_text()) if kurtosis.exists() else None,
            "weights": {k: v.detach().clone() for k, v in gather_logical(core, dict(core.named_parameters())).items()},
            "counts": counts,
            "saved_bytes": saved,
            "recompute_granularity": trainer.tconfig.recompute_granularity,
            "last_stage": parallel_state.is_pipeline_last_stage(),
        }
    return out


def _run_all(corpus, tmp_path, world, pp):
    runs = [(f"{opt}_{var}", _base(corpus, pp) + OPTIMIZERS[opt] + VARIANTS[var]) for opt in OPTIMIZERS for var in VARIANTS]
    return run_distributed(_variants_worker, world, runs, str(tmp_path / f"pp{pp}"), timeout=240)


def _expected_counts(variant, counts_none, layers_in_stage):
    """A layer/core attention's training-mode forward calls with ``variant``: x2 where recomputed."""
    first = min(int(k.split("_")[-1]) for k in counts_none if k.startswith("layer_"))
    expected = {}
    for key, n in counts_none.items():
        index = int(key.split("_")[-1]) - first  # position within this stage
        whole_layer = variant.startswith("full") and (variant != "full_block" or index < 1)
        twice = whole_layer or (variant == "selective" and key.startswith("core_attn"))
        expected[key] = 2 * n if twice else n
    assert len([k for k in expected if k.startswith("layer_")]) == layers_in_stage
    return expected


def _check_world(results, pp):
    for rank, per_rank in enumerate(results):
        for opt in OPTIMIZERS:
            ref = per_rank[f"{opt}_none"]
            assert ref["recompute_granularity"] is None
            # Training happened and the counts saw it: one call per micro-batch per step without recompute.
            assert set(ref["counts"].values()) == {STEPS * 2}, ref["counts"]
            for var in VARIANTS:
                if var == "none":
                    continue
                got = per_rank[f"{opt}_{var}"]
                where = f"rank {rank} {opt} recompute={var}"
                assert got["recompute_granularity"] == ("selective" if var == "selective" else "full"), where
                assert got["counts"] == _expected_counts(var, ref["counts"], LAYERS // pp), where
                if ref["last_stage"]:
                    assert got["losses"] == ref["losses"], where
                    assert got["val_loss"] == ref["val_loss"], where
                    assert not np.isnan(got["losses"]).any(), where
                assert got["kurtosis_history"] == ref["kurtosis_history"], where
                assert len(got["kurtosis_history"]) == 3, where  # steps 2 and 4, and the end
                assert got["kurtosis"] == ref["kurtosis"], where
                assert sorted(got["weights"]) == sorted(ref["weights"]), where
                for name, w in ref["weights"].items():
                    torch.testing.assert_close(got["weights"][name], w, rtol=0, atol=0, msg=lambda m: f"{where} {name}: {m}")
    # The runs differ from each other (the comparison above can fail): Adam and OSP train differently.
    last = next(r for r in results if r["adam_none"]["last_stage"])
    assert last["adam_none"]["losses"] != last["osp_none"]["losses"]
    assert last["adam_none"]["losses"][0] != last["adam_none"]["losses"][-1]


def test_recompute_matches_no_recompute_single_process(toy_corpus, tmp_path):
    results = _run_all(toy_corpus, tmp_path, world=1, pp=1)
    _check_world(results, pp=1)
    assert results[0]["adam_none"]["kurtosis"] is not None  # the report was written and compared
    # Memory: selective drops at least each layer's attention probabilities (micro-batch 2 x 4 heads
    # x 32^2, fp32) from what the forward keeps for backward; full keeps only the layers' inputs.
    probs = LAYERS * 2 * 4 * 32 * 32 * 4
    for opt in OPTIMIZERS:
        saved = {var: results[0][f"{opt}_{var}"]["saved_bytes"] for var in VARIANTS}
        assert saved["none"] - saved["selective"] >= probs, (opt, saved)
        assert saved["full_uniform"] < saved["selective"] / 2, (opt, saved)
        assert saved["full_uniform2"] < saved["full_uniform"], (opt, saved)  # one input per 2 layers
        assert saved["full_uniform"] < saved["full_block"] < saved["none"], (opt, saved)  # block: 1 of 4 layers


def test_recompute_matches_no_recompute_pp2(toy_corpus, tmp_path):
    results = _run_all(toy_corpus, tmp_path, world=2, pp=2)
    _check_world(results, pp=2)
    # Each stage recomputed its own layers: stage 0 holds layers 1-2, stage 1 layers 3-4.
    assert sorted(results[0]["osp_full_block"]["counts"]) == ["core_attn_1", "core_attn_2", "layer_1", "layer_2"]
    assert sorted(results[1]["osp_full_block"]["counts"]) == ["core_attn_3", "core_attn_4", "layer_3", "layer_4"]


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.recompute=partial"], "train.recompute='partial': must be one of none, selective, full"),
        (["train.recompute=full", "train.recompute_method=layer"],
         "train.recompute_method='layer': must be one of uniform, block"),
        (["train.recompute=full", "train.recompute_num_layers=0"], "train.recompute_num_layers=0: must be >= 1"),
        (["train.recompute=selective", "train.recompute_num_layers=2"],
         "train.recompute_num_layers=2 is used only with train.recompute=full (train.recompute='selective')"),
        (["train.recompute_method=block"], "train.recompute_method='block' is used only with train.recompute=full"),
        (["model.num_layers=4", "parallel.pipeline_parallel_size=2", "train.recompute=full",
          "train.recompute_method=block", "train.recompute_num_layers=3"],
         "train.recompute_num_layers=3 is more than the 2 layers of a pipeline stage"),
        (["model.num_layers=6", "train.recompute=full", "train.recompute_num_layers=4"],
         "train.recompute_num_layers=4 does not divide the 6 layers of a pipeline stage"),
    ],
)
def test_bad_recompute_settings_are_refused_by_name(overrides, message):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.validation import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.preset=test"] + overrides)
    assert message in str(e.value)


def test_recompute_settings_reach_transformer_config():
    """train.recompute* become TransformerConfig fields in one call (what the Trainer builds)."""
    from megatron_osp.models.gpt import transformer_config
    from megatron_osp.models.presets import get_preset
    from megatron_osp.training.config import load_config

    model = get_preset("test", num_layers=4)
    none = transformer_config(model)
    assert (none.recompute_granularity, none.recompute_method, none.recompute_num_layers) == (None, None, None)
    sel = transformer_config(model, recompute="selective")
    assert (sel.recompute_granularity, sel.recompute_modules, sel.recompute_num_layers) == ("selective", ["core_attn"], None)
    t = load_config(None, ["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=2",
                           "model.num_layers=4"]).train
    full = transformer_config(model, recompute=t.recompute, recompute_method=t.recompute_method,
                              recompute_num_layers=t.recompute_num_layers)
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "block", 2)
    default = transformer_config(model, recompute="full")
    assert (default.recompute_method, default.recompute_num_layers) == ("uniform", 1)
    good = load_config(None, ["model.num_layers=6", "train.recompute=full", "train.recompute_num_layers=3"])
    assert good.train.recompute_num_layers == 3
