"""A muon_only distributed-optimizer checkpoint saved before 2026-12-04 is refused clearly, before the build.

Since d3ed02d the embedding's and output layer's Muon matrix is the vocabulary's rows only
(optimizer/logical.vocab_rows), so the distributed optimizer's masters of those two parameters have
no padding rows. A checkpoint saved before held them with the padding rows (here 260 of 256), and
its resume failed inside dist_checkpointing ("Global shape mismatch"), reported as "failed reading
.metadata and the .distcp shards", like damage. The old layout is made here as the old code made
it: the saving process's vocab_rows gives no vocabulary rows, so the block is the whole padded matrix.
The resume is now refused by resume_check.check_compatible before the process groups, datasets and
model (exit 2, one line naming both parameters' rows); train.load_weights_only=true loads its weights.
Past that check (switched off here), any tensor of another global shape is named by the load
(checkpoint_shapes.check_shapes) before dist_checkpointing reads it, not reported as damage.
"""

import json
import math

from megatron_osp.testing.distributed import run_distributed
from test_checkpoint import _overrides

# vocab_size 256 (test preset) padded to a multiple of 5: 260 rows
_EXTRA = ["optimizer.distributed_optimizer=true", "model.make_vocab_size_divisible_by=5"]


def _save_old_layout(rank, world, corpus, run_dir):
    from megatron_osp.optimizer import logical
    from megatron_osp.training import loop
    from megatron_osp.training.checkpoint import newest_checkpoint
    from megatron_osp.training.checkpoint_shapes import saved_shapes
    from megatron_osp.training.config import load_config

    logical.vocab_rows = lambda name, model: None  # before d3ed02d: the block is every (padded) row
    args = _overrides(corpus, run_dir, optimizer="muon_only", steps=4) + _EXTRA + ["train.exit_at_step=2"]
    loop.Trainer(load_config(None, args), log=lambda *_: None).train()
    shapes = saved_shapes(newest_checkpoint(f"{run_dir}/checkpoints"))
    return {k: v for k, v in shapes.items() if k.startswith("optimizer.zero.master.") and "word_emb" in k}


def _resume_then_weights_only(rank, world, corpus, run_dir, new_run_dir, ckpt):
    import contextlib
    import io
    import os

    import torch.distributed as dist

    from megatron_osp.training import loop, model_setup, pretrain, resume_check

    dist.destroy_process_group()  # pretrain.main starts its own world of one, as from a shell
    os.environ.pop("MASTER_ADDR", None)
    build_datasets, build_chunks = loop.build_datasets, model_setup.build_chunks

    def built(*args, **kwargs):
        raise AssertionError("the datasets or the model were built before the refusal")

    loop.build_datasets = model_setup.build_chunks = built
    base = _overrides(corpus, run_dir, optimizer="muon_only", steps=4) + _EXTRA
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        resumed = pretrain.main(base)
    loop.build_datasets, model_setup.build_chunks = build_datasets, build_chunks
    # Past the early check, the load names the tensors of another shape before reading any
    resume_check.old_vocab_master_problem = lambda *args: None
    err_load = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err_load):
        at_load = pretrain.main(base)
    fresh = _overrides(corpus, new_run_dir, optimizer="muon_only", steps=2) + _EXTRA + ["train.exit_at_step=1",
        f"train.load={ckpt}", "train.load_weights_only=true"]
    err_fresh = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err_fresh):
        weights_only = pretrain.main(fresh)
    return resumed, err.getvalue(), (at_load, err_load.getvalue()), weights_only, err_fresh.getvalue()


def test_a_muon_only_checkpoint_with_padded_vocabulary_masters_is_refused_before_the_build(toy_corpus, tmp_path):
    run_dir = tmp_path / "run"
    master = run_distributed(_save_old_layout, 1, toy_corpus, str(run_dir))[0]
    assert [shape[0] for shape in master.values()] == [260], master  # the padded rows, as before d3ed02d
    ckpt = run_dir / "checkpoints" / "iter_0000002"
    rc, err, at_load, rc_weights, err_weights = run_distributed(
        _resume_then_weights_only, 1, toy_corpus, str(run_dir), str(tmp_path / "new"), str(ckpt))[0]
    assert rc == 2, err
    assert err.strip() == (
        f"error: checkpoint {ckpt} holds muon_only optimizer state of the vocabulary parameters with their "
        "padding rows (embedding.word_embeddings.weight 260 rows, output_layer.weight 260 rows; this code keeps "
        "the vocabulary's 256 rows): it was saved before 2026-12-04, when the embedding's and output layer's "
        "Muon matrix became the vocabulary's rows only, and its optimizer state cannot be continued; "
        "train.load_weights_only=true takes its weights with a fresh optimizer state (a new run from step 0: "
        f"train.load={ckpt} with another train.run_dir)"
    )
    shapes = "; ".join(f"optimizer.zero.{state}.{param} saved (260, 64), expected (256, 64)" for state, param in (
        ("master", "embedding.word_embeddings.weight"), ("master", "output_layer.weight"),
        ("momentum", "embedding.word_embeddings.weight")))
    assert at_load[0] == 2 and at_load[1].strip().splitlines()[-1] == (
        f"error: checkpoint {ckpt} holds state of another layout or version than this run builds: {shapes} (and 1 "
        "more). Its files match their checksums (saved so, not damaged since); nothing was loaded")
    assert rc_weights == 0, err_weights
    steps = [json.loads(line) for line in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1] and math.isfinite(steps[-1]["loss"])
