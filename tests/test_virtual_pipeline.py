"""Virtual pipeline stages (``parallel.virtual_pipeline_size``): interleaved 1F1B gives the same run.

A 4-layer model at PP=2 with 2 model chunks per stage (one layer per chunk; rank 0 holds layers 1
and 3, rank 1 layers 2 and 4) trains 5 steps through Megatron-Core's interleaved schedule with the
per-step losses, validation loss, final logical weights and per-layer kurtosis of the single-process
run, for AdamW and for OSP (Muon + SSNorm + EmbProj), to float32 tolerance; so does TP=2 x PP=2 x V=2
with the owner-sharded optimizer (``distributed_optimizer=true``). The checkpoint the PP=2 x V=2 run
saves resumes at PP=2 x V=2, at PP=2 without chunks and in one process with the same next-step
loss, and its HF export gives that model's logits. Recompute (selective, full) under V=2 changes no
loss. Settings that cannot work are refused naming the field.
"""

import numpy as np
import pytest
import torch

from megatron_osp.testing.distributed import run_distributed
from megatron_osp.testing.equivalence import SETTINGS, assert_same_training, run_record

STEPS, SAVED_AT = 6, 5  # train_steps sets the LR schedule; every run stops (or resumes) at step 5
VOCAB = 256  # the test preset's vocabulary
RECOMPUTE = {
    "selective": ["train.recompute=selective"],
    "full": ["train.recompute=full", "train.recompute_num_layers=1"],
}


def _base(corpus, optimizer, tp=1, pp=1, vp=1):
    extra = ["optimizer.muon_lr=0.02"] if optimizer == "muon" else [
        "model.normalization=rmsnorm", "model.embedding_projection=false"]
    return [
        "model.preset=test",
        "model.num_layers=4",
        f"data.paths=[{corpus}]",
        "data.eod_id=255",
        f"optimizer.name={optimizer}",
        f"parallel.tensor_parallel_size={tp}",
        f"parallel.pipeline_parallel_size={pp}",
        f"parallel.virtual_pipeline_size={vp}",
        f"train.train_steps={STEPS}",
        f"train.exit_at_step={SAVED_AT}",
        "train.warmup_steps=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.eval_batches=1",
        "train.log_interval=1",
        "train.save=false",
        "train.tensorboard=false",
        "train.progress_bar=false",
        *SETTINGS,
    ] + extra


def _logical_weights(trainer) -> dict:
    """This rank's logical (TP=1, PP=1) weights, from every model chunk, on the TP/DP leader only."""
    from megatron.core import parallel_state

    from megatron_osp.models.layout import gather_logical
    from megatron_osp.training.model_setup import core_chunks

    weights = {}
    for core in core_chunks(trainer.model_chunks):
        weights.update(gather_logical(core, dict(core.named_parameters())))
    leader = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    return {k: v.detach().float().clone() for k, v in weights.items()} if leader else {}


def _train(overrides, run_dir):
    """Train to step SAVED_AT (saving when the overrides say so); what the comparisons need."""
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    trainer = Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}"]), log=lambda *_: None)
    trainer.train()
    return trainer, {
        **run_record(trainer),
        "val_loss": trainer.evaluate(),
        "kurtosis": trainer.measure_kurtosis().to_dict(),
        "weights": _logical_weights(trainer),
        "chunks": len(trainer.model_chunks),
    }


def _resume(overrides, ckpt, run_dir) -> float:
    """Continue the checkpoint for its next step at this layout: that step's loss (NaN off the last stage)."""
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    config = load_config(None, overrides + [f"train.run_dir={run_dir}", f"train.load={ckpt}", "train.exit_at_step=0"])
    trainer = Trainer(config, log=lambda *_: None)
    assert trainer.step == SAVED_AT
    trainer.train()
    return trainer.history[-1]["loss"]


def _tokens():
    return torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(11))


def _pipeline_logits(trainer, tokens):
    """The interleaved model's logits for ``tokens`` (2 micro-batches of 2) on the last stage, else None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.shape[1]).expand(2, -1)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), positions, None)
        return output, lambda out: (torch.zeros(()), {"logits": out.detach().clone()})

    for chunk in trainer.model_chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(tokens.split(2)) for _ in trainer.model_chunks],
            model=trainer.model_chunks,
            num_microbatches=2,
            seq_length=tokens.shape[1],
            micro_batch_size=2,
            forward_only=True,
        )
    return torch.cat([o["logits"] for o in outputs])[..., :VOCAB] if outputs else None


def _vp_worker(rank, world, corpus, root):
    """PP=2 x V=2: AdamW, OSP (saved at step 5), recompute variants, and resumes of the checkpoint."""
    out = {}
    _, out["adam"] = _train(_base(corpus, "adam", pp=2, vp=2), f"{root}/vp_adam")
    trainer, out["muon"] = _train(_base(corpus, "muon", pp=2, vp=2) + ["train.save=true"], f"{root}/vp_muon")
    out["logits"] = _pipeline_logits(trainer, _tokens())
    for name, extra in RECOMPUTE.items():
        _, run = _train(_base(corpus, "adam", pp=2, vp=2) + extra, f"{root}/vp_adam_{name}")
        out[f"adam_{name}"] = run["losses"]
    ckpt = f"{root}/vp_muon/checkpoints"
    out["resume_vp2"] = _resume(_base(corpus, "muon", pp=2, vp=2), ckpt, f"{root}/resume_vp2")
    out["resume_pp2"] = _resume(_base(corpus, "muon", pp=2, vp=1), ckpt, f"{root}/resume_pp2")
    return out


def _single_worker(rank, world, corpus, root):
    """One process: the AdamW and OSP references, the PP=2 x V=2 checkpoint resumed, and its export."""
    from megatron_osp.convert.hf_export import export_checkpoint
    from megatron_osp.training.checkpoint import read_train_state

    out = {}
    for optimizer in ("adam", "muon"):
        _, out[optimizer] = _train(_base(corpus, optimizer), f"{root}/ref_{optimizer}")
    ckpt = f"{root}/vp_muon/checkpoints"
    out["layout"] = read_train_state(ckpt)["layout"]
    out["resume_1"] = _resume(_base(corpus, "muon"), ckpt, f"{root}/resume_1")
    export_checkpoint(ckpt, f"{root}/hf", log=lambda *_: None)
    return out


def _merge(results):
    """One run's view from its ranks: the last stage's losses and logits, every rank's weights."""
    merged = {}
    for r in results:
        for key, value in r.items():
            if isinstance(value, dict) and "weights" in value:
                run = merged.setdefault(key, {"weights": {}})
                run["weights"].update(value["weights"])
                if not np.isnan(value["losses"][0]):
                    run.update({k: v for k, v in value.items() if k != "weights"})
            elif isinstance(value, list) or isinstance(value, float):
                if not np.isnan(np.asarray(value, dtype=float)).any():
                    merged[key] = value
            elif value is not None:
                merged[key] = value
    return merged


@pytest.fixture(scope="module")
def runs(toy_corpus, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vpp"))
    vp = _merge(run_distributed(_vp_worker, 2, toy_corpus, root, timeout=600))
    single = _merge(run_distributed(_single_worker, 1, toy_corpus, root, timeout=300))
    return {"root": root, "vp": vp, "single": single, "corpus": toy_corpus}


def _assert_same_run(ref, got):
    assert len(got["losses"]) == SAVED_AT
    assert_same_training(ref, got)
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=2e-5)
    assert got["kurtosis"]["names"] == ref["kurtosis"]["names"] == ["embedding"] + [f"layer_{k}" for k in range(1, 5)]
    np.testing.assert_allclose(got["kurtosis"]["values"], ref["kurtosis"]["values"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got["kurtosis"]["max_abs"], ref["kurtosis"]["max_abs"], rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_pp2_vp2_matches_single_process(runs, optimizer):
    got, ref = runs["vp"][optimizer], runs["single"][optimizer]
    assert got["chunks"] == 2 and ref["chunks"] == 1
    _assert_same_run(ref, got)


def test_vp2_checkpoint_resumes_at_other_layouts_and_exports(runs):
    from transformers import AutoModelForCausalLM

    vp, single = runs["vp"], runs["single"]
    assert single["layout"]["virtual_pipeline_size"] == 2 and single["layout"]["pipeline_parallel_size"] == 2
    next_loss = vp["resume_vp2"]
    assert next_loss == pytest.approx(single["resume_1"], rel=2e-5)
    assert next_loss == pytest.approx(vp["resume_pp2"], rel=2e-5)
    model = AutoModelForCausalLM.from_pretrained(f"{runs['root']}/hf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(_tokens()).logits
    reference = vp["logits"]
    assert reference.shape == logits.shape and reference.abs().max() > 0.1
    diff = (logits - reference).abs().max().item()
    assert diff <= 1e-4, f"max |HF - Megatron PP=2 x V=2| logits = {diff}"


def test_recompute_under_vp2_changes_no_loss(runs):
    vp = runs["vp"]
    for name in RECOMPUTE:
        assert vp[f"adam_{name}"] == vp["adam"]["losses"], name


ZERO = ["optimizer.distributed_optimizer=true", "optimizer.bucket_size=3000"]
OVERLAP = ["optimizer.overlap_grad_reduce=true", "optimizer.overlap_param_gather=true"]


def _zero_worker(rank, world, corpus, root):
    """PP=2 x V=2 x DP=2 with the distributed optimizer: Adam and OSP with overlap, OSP without;
    OSP's step-5 checkpoint resumed at PP=2 x V=2 x DP=2 and at DP=4 (step 6)."""
    out = {}
    for name, optimizer, extra in (("adam", "adam", OVERLAP), ("muon", "muon", OVERLAP + ["train.save=true"]),
                                   ("muon_sync", "muon", [])):
        _, out[name] = _train(_base(corpus, optimizer, pp=2, vp=2) + ZERO + extra, f"{root}/{name}")
    ckpt = f"{root}/muon/checkpoints"
    for name, layout in (("resume_vp", dict(pp=2, vp=2)), ("resume_dp4", {})):
        overrides = _base(corpus, "muon", **layout) + ZERO + OVERLAP + [f"train.load={ckpt}", "train.exit_at_step=0"]
        trainer, _ = _train(overrides, f"{root}/{name}")
        out[name] = [h["loss"] for h in trainer.history]
    return out


def test_pp2_vp2_dp2_distributed_optimizer_matches_single_process_and_resumes(runs, tmp_path):
    got = _merge(run_distributed(_zero_worker, 4, runs["corpus"], str(tmp_path), timeout=900))
    for optimizer in ("adam", "muon"):
        _assert_same_run(runs["single"][optimizer], got[optimizer])
    assert got["muon_sync"]["losses"] == got["muon"]["losses"]  # overlap on and off: identical
    for k, w in got["muon"]["weights"].items():
        assert torch.equal(got["muon_sync"]["weights"][k], w), k
    assert len(got["resume_vp"]) == len(got["resume_dp4"]) == 1  # step 6 only
    np.testing.assert_allclose(got["resume_dp4"], got["resume_vp"], rtol=2e-5)


def test_settings_that_cannot_work_name_the_field():
    from megatron_osp.training.config import load_config
    from megatron_osp.training.validation import ConfigError, check_world

    base = ["model.preset=test", "train.global_batch_size=8", "train.micro_batch_size=2"]
    with pytest.raises(ConfigError, match=r"parallel\.virtual_pipeline_size=0: must be >= 1"):
        load_config(None, base + ["parallel.virtual_pipeline_size=0"])
    with pytest.raises(ConfigError, match=r"parallel\.virtual_pipeline_size=2 needs "
                                          r"parallel\.pipeline_parallel_size > 1"):
        load_config(None, base + ["parallel.virtual_pipeline_size=2"])
    with pytest.raises(ConfigError, match=r"model\.num_layers=2 is not divisible by parallel\.pipeline_parallel_size=2 "
                                          r"x parallel\.virtual_pipeline_size=2"):
        load_config(None, base + ["parallel.pipeline_parallel_size=2", "parallel.virtual_pipeline_size=2"])
    with pytest.raises(ConfigError, match=r"train\.recompute_num_layers=2 is more than the 1 layers of a model chunk"):
        load_config(None, base + ["model.num_layers=4", "parallel.pipeline_parallel_size=2",
                                  "parallel.virtual_pipeline_size=2", "train.recompute=full",
                                  "train.recompute_num_layers=2"])
    good = load_config(None, base + ["model.num_layers=4", "parallel.pipeline_parallel_size=2",
                                     "parallel.virtual_pipeline_size=2"])
    check_world(good, 2)  # 4 micro-batches per step: a multiple of PP=2
    odd = load_config(None, ["model.preset=test", "model.num_layers=4", "parallel.pipeline_parallel_size=2",
                             "parallel.virtual_pipeline_size=2", "train.global_batch_size=6",
                             "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match=r"the 3 micro-batches per step .* must be a multiple of "
                                          r"parallel\.pipeline_parallel_size=2"):
        check_world(odd, 2)


def test_kurtosis_recorder_names_the_layers_of_several_chunks_globally():
    """Layers of two chunks (global 1, 3 on one rank; 2, 4 on the other) merge into model order."""
    from megatron_osp.metrics.kurtosis import HiddenStateRecorder, excess_kurtosis, merge_rank_reports

    class Layer(torch.nn.Module):
        def __init__(self, number, scale):
            super().__init__()
            self.layer_number, self.scale = number, scale

        def forward(self, hidden_states):
            out = hidden_states * self.scale
            out[..., 0] += 10.0 * self.layer_number  # a growing outlier channel
            return out, None

    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(0))
    ranks = [[Layer(1, 1.0), Layer(3, 2.0)], [Layer(2, 0.5), Layer(4, 3.0)]]
    reports = []
    for layers in ranks:
        with HiddenStateRecorder(layers, record_input=layers[0].layer_number == 1) as rec:
            for layer in layers:
                layer(x)
        reports.append(rec.report().to_dict())
    assert reports[0]["names"] == ["embedding", "layer_1", "layer_3"] and reports[1]["names"] == ["layer_2", "layer_4"]
    merged = merge_rank_reports(reports)
    assert merged.names == ["embedding", "layer_1", "layer_2", "layer_3", "layer_4"]
    expected = {layer.layer_number: excess_kurtosis(layer(x)[0]) for layers in ranks for layer in layers}
    assert merged.values[1:] == pytest.approx([expected[k] for k in range(1, 5)], rel=1e-12)
    assert merged.values[0] == pytest.approx(excess_kurtosis(x), rel=1e-12)
