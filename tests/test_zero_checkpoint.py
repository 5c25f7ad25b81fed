"""A distributed-optimizer checkpoint resumes at other layouts, and its HF export is the model.

OSP (Muon + AdamW), bf16 off (fp32), optimizer.distributed_optimizer=true with overlap: trained at
TP=2 x DP=2 for 4 steps with a checkpoint at step 2. Resumed from step 2 at TP=1 x DP=2 and in one
process, steps 3 and 4 give the uninterrupted run's losses (rtol 2e-5: other layouts sum in another
order). Step 4's loss depends on the restored masters, Adam moments and Muon momentum: with the
optimizer state zeroed after the load it differs (the control). The step-4 checkpoint exported to
Hugging Face gives the Megatron model's logits within 1e-4 (fp32).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]
ZERO = ["optimizer.distributed_optimizer=true", "optimizer.overlap_grad_reduce=true",
        "optimizer.overlap_param_gather=true", "optimizer.bucket_size=4000"]


def _overrides(corpus, tp, run_dir, extra=()):
    return [
        "model.preset=test", f"data.paths=[{corpus}]", "data.eod_id=255", "optimizer.name=muon",
        "optimizer.muon_lr=0.02", f"parallel.tensor_parallel_size={tp}", "train.train_steps=4",
        "train.warmup_steps=1", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.log_interval=1", "train.tensorboard=false", "train.progress_bar=false",
        "train.eval_batches=1", "train.kurtosis_batches=1", f"train.run_dir={run_dir}", *ZERO, *extra,
    ]


def _train_worker(rank, world_size, cases):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    out = []
    for overrides, zero_state in cases:
        trainer = Trainer(load_config(None, overrides), log=lambda *_: None)
        if zero_state:
            for st in trainer.optimizer.state_tensors.values():
                for t in st.values():
                    t.zero_()
        trainer.train()
        out.append({h["step"]: h["loss"] for h in trainer.history})
    return out


def _export_worker(rank, world_size, ckpt, out_dir, tokens):
    spec = importlib.util.spec_from_file_location("convert_to_hf", REPO / "tools" / "convert_to_hf.py")
    to_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_hf)
    rc = to_hf.main([ckpt, out_dir])

    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import load_model_weights, read_run_config

    mc = read_run_config(ckpt).model
    model = build_gpt_model(mc, transformer_config(mc), seed=11)
    load_model_weights(ckpt, [model])
    with torch.no_grad():
        logits = model.eval()(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., : mc.vocab_size]
    return rc, logits


def _one_process_worker(rank, world_size, cases, ckpt, out_dir, tokens):
    """The one-process resume, then the export (one spawn for both)."""
    return _train_worker(rank, world_size, cases), _export_worker(rank, world_size, ckpt, out_dir, tokens)


def _losses(per_rank, i):
    return next(r[i] for r in per_rank if not np.isnan(next(iter(r[i].values()))))


@pytest.fixture(scope="module")
def resumed(toy_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_ckpt")
    save = _overrides(toy_corpus, 2, root / "tp2dp2", ["train.save_interval=2"])
    full = _losses(run_distributed(_train_worker, 4, [(save, False)], timeout=600), 0)
    ckpt = root / "tp2dp2" / "checkpoints"
    step2 = str(ckpt / "iter_0000002")
    load = [f"train.load={step2}", "train.save=false"]
    dp2 = run_distributed(_train_worker, 2, [(_overrides(toy_corpus, 1, root / "dp2", load), False),
                                            (_overrides(toy_corpus, 1, root / "dp2z", load), True)], timeout=600)
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))
    one, export = run_distributed(_one_process_worker, 1, [(_overrides(toy_corpus, 1, root / "one", load), False)],
                                  str(ckpt / "iter_0000004"), str(root / "hf"), tokens, timeout=600)[0]
    return {"full": full, "dp2": _losses(dp2, 0), "dp2_zeroed": _losses(dp2, 1), "one": _losses([one], 0),
            "export": export, "hf": root / "hf", "tokens": tokens, "step2": step2,
            "overrides": _overrides(toy_corpus, 1, root / "plain", load)}


@pytest.mark.parametrize("layout", ["dp2", "one"])
def test_resume_at_another_layout_continues_the_run(resumed, layout):
    got, full = resumed[layout], resumed["full"]
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose([got[3], got[4]], [full[3], full[4]], rtol=2e-5)


def test_zeroed_optimizer_state_changes_the_next_update(resumed):
    got, full = resumed["dp2_zeroed"], resumed["full"]
    assert got[3] == pytest.approx(full[3], rel=2e-5)  # same weights after the load...
    assert abs(got[4] - full[4]) > 1e-4  # ...but the step taken from them needs the state


def test_hf_export_of_the_distributed_optimizer_checkpoint_equals_the_model(resumed):
    from transformers import AutoModelForCausalLM

    rc, logits = resumed["export"]
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(str(resumed["hf"]), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(resumed["tokens"]).logits
    diff = (hf - logits).abs().max().item()
    assert diff <= 1e-4, f"max |HF - Megatron| logits = {diff}"
    assert logits.abs().max() > 0.1


def test_resuming_without_the_distributed_optimizer_is_refused_naming_the_field(resumed):
    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.resume_check import check_compatible
    from megatron_osp.training.config import load_config

    config = load_config(None, resumed["overrides"] + ["optimizer.distributed_optimizer=false",
                                                        "optimizer.overlap_grad_reduce=false",
                                                        "optimizer.overlap_param_gather=false"])
    with pytest.raises(CheckpointError, match=r"optimizer\.distributed_optimizer: checkpoint True, this run False"):
        check_compatible(resumed["step2"], config, resume=True)
    check_compatible(resumed["step2"], config, resume=False)  # its weights load either way
