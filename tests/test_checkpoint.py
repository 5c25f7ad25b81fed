"""Checkpoints: exact resume, crash safety, resharding across TP/PP, SIGTERM, clear errors.

- Resume: a run stopped after 2 steps and resumed (in a fresh process) continues with losses
  bitwise equal to an uninterrupted run, for Adam (with dropout: RNG states) and for Muon;
  ``save_interval`` and ``keep_last`` leave the expected directories.
- A save killed half way leaves the previous checkpoint loadable and ``latest`` on it.
- Checkpoints saved at TP=2 and at PP=2 load at TP=1 with the same logits (float32 tolerance), and
  the TP=2 training state (optimizer included) continues at TP=1 like it does at TP=2.
- SIGTERM: the run finishes its step, saves and exits 0; the next run continues from there.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

STEPS = 4
STOP = 2
REPO = Path(__file__).resolve().parents[1]


def _overrides(corpus, run_dir, optimizer="adam", tp=1, pp=1, steps=STEPS):
    return [
        "model.preset=test",
        "model.normalization=ssnorm",
        "model.embedding_projection=true",
        f"data.paths=[{corpus}]",
        "data.eod_id=255",
        f"data.cache_dir={corpus}_index_cache",  # one index build for all runs
        f"optimizer.name={optimizer}",
        f"parallel.tensor_parallel_size={tp}",
        f"parallel.pipeline_parallel_size={pp}",
        f"train.train_steps={steps}",
        "train.warmup_steps=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.log_interval=1",
        "train.eval_batches=1",
        "train.tensorboard=false",
        "train.progress_bar=false",
        f"train.run_dir={run_dir}",
    ]


def _losses(trainer):
    return [h["loss"] for h in trainer.history]


def _train(overrides, log=lambda *_: None):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    trainer = Trainer(load_config(None, overrides), log=log)
    trainer.train()
    return trainer


# ------------------------------------------------------------------ workers (one process each)
# Split runs: Adam keeps only its newest checkpoint, Muon saves after every step and keeps all.
# Adam's runs use dropout, so their losses depend on the restored RNG states.
_DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
_SAVING = {"adam": ["train.keep_last=1"] + _DROPOUT, "muon": ["train.save_interval=1"]}


def _split(corpus, root, opt):
    return _overrides(corpus, f"{root}/{opt}_split", opt) + _SAVING[opt]


def _first_half_worker(rank, world, corpus, root):
    """Uninterrupted reference runs and the first halves of the split runs (Adam and Muon)."""
    out = {}
    # What an attempt killed before its first checkpoint leaves: the rerun starts fresh and must
    # not append to these lines (test_a_fresh_start_drops_the_metrics_of_an_attempt_without_checkpoint).
    Path(f"{root}/adam_ref").mkdir(parents=True)
    Path(f"{root}/adam_ref/metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in range(1, 7)))
    for opt in ("adam", "muon"):
        out[f"{opt}_ref"] = _losses(_train(_overrides(corpus, f"{root}/{opt}_ref", opt) + _SAVING[opt]))
        lines = out.setdefault("first_log", [])
        out[f"{opt}_first"] = _losses(_train(_split(corpus, root, opt) + [f"train.exit_at_step={STOP}"], log=lines.append))
    return out


def _second_half_worker(rank, world, corpus, root):
    """Resume both split runs (auto-resume from <run_dir>/checkpoints), then simulate killed saves."""
    from megatron_osp.training import checkpoint
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    out = {opt: _losses(_train(_split(corpus, root, opt))) for opt in ("adam", "muon")}
    out["muon_listing"] = sorted(p.name for p in Path(f"{root}/muon_split/checkpoints").iterdir())
    # The same command once more: nothing left to train; the summary still covers the logged steps.
    rerun = Trainer(load_config(None, _split(corpus, root, "muon")), log=lambda *_: None)
    summary = rerun.train()
    out["muon_rerun"] = (rerun.history, summary["steps"], summary["train_loss"])

    # A save killed after its shards are written but before it is published, and one killed while
    # dist_checkpointing is writing: neither may become the checkpoint that is loaded.

    run_dir = f"{root}/adam_split"
    trainer = Trainer(load_config(None, _split(corpus, root, "adam")), log=lambda *_: None)
    assert trainer.step == STEPS  # resumed from the end of the split run
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # what a later save would hold
    real_publish, real_save = checkpoint._publish, checkpoint._write_shards
    killed = []
    try:
        def dies_before_publish(*a, **k):
            raise KeyboardInterrupt("killed before publishing")

        def dies_while_writing(state, directory, **k):
            (Path(directory) / "common.pt").write_bytes(b"partial")
            raise KeyboardInterrupt("killed while writing shards")

        for step, patch in ((STEPS + 1, ("_publish", dies_before_publish)), (STEPS + 2, ("_write_shards", dies_while_writing))):
            setattr(checkpoint, *patch)
            trainer.step = step
            try:
                trainer.save()
            except KeyboardInterrupt as e:
                killed.append(str(e))
    finally:
        checkpoint._publish, checkpoint._write_shards = real_publish, real_save
    save_dir = Path(run_dir) / "checkpoints"
    out["killed"] = killed
    out["latest"] = (save_dir / "latest").read_text().strip()
    out["listing"] = sorted(p.name for p in save_dir.iterdir())
    fresh = Trainer(load_config(None, _overrides(corpus, run_dir, "adam")), log=lambda *_: None)
    out["reloaded_step"] = fresh.step
    out["reloaded_equal"] = all(
        torch.equal(p, weights[k]) for k, p in fresh.model.named_parameters()
    )
    return out


@pytest.fixture(scope="module")
def split_runs(toy_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    first = run_distributed(_first_half_worker, 1, toy_corpus, str(root))[0]
    second = run_distributed(_second_half_worker, 1, toy_corpus, str(root))[0]
    return first, second, root


def test_resume_is_bitwise_equal_and_killed_saves_are_never_loaded(split_runs):
    first, second, _ = split_runs
    for opt in ("adam", "muon"):
        assert len(first[f"{opt}_first"]) == STOP
        assert first[f"{opt}_first"] + second[opt] == first[f"{opt}_ref"], opt  # bitwise
        assert len(set(first[f"{opt}_ref"])) == STEPS  # the losses do change step to step
    history, steps, train_loss = second["muon_rerun"]
    assert history == [] and steps == STEPS
    assert train_loss == pytest.approx(np.mean(first["muon_ref"][-3:]), rel=1e-12)
    assert second["killed"] == ["killed before publishing", "killed while writing shards"]
    assert second["latest"] == "iter_0000004"
    # keep_last=1 pruned iter_0000002 once iter_0000004 was complete; the killed saves pruned nothing
    # and left only a temporary directory (the next save removes it).
    assert second["listing"] == [".run.lock", "iter_0000004", "iter_0000006.tmp", "latest"]
    assert second["muon_listing"] == [".run.lock"] + [f"iter_{i:07d}" for i in range(1, STEPS + 1)] + ["latest"]
    assert second["reloaded_step"] == STEPS and second["reloaded_equal"]


# ------------------------------------------------------------------ errors (no process group needed)
def test_not_a_checkpoint_and_missing_shard_are_named(tmp_path):
    from megatron_osp.training.checkpoint import CheckpointError, read_run_config, resolve_checkpoint

    with pytest.raises(CheckpointError, match=f"{tmp_path}.* is not a checkpoint"):
        read_run_config(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="iter_0000009, which does not exist"):
        resolve_checkpoint(tmp_path)


def test_missing_or_truncated_shard_is_named(split_runs, tmp_path):
    from megatron_osp.training.checkpoint import CheckpointError, read_run_config, resolve_checkpoint

    source = split_runs[2] / "adam_split" / "checkpoints"
    mask = os.umask(0)
    os.umask(mask)
    for small_file in (source / "latest", source / "iter_0000004" / "run_config.yaml"):
        assert small_file.stat().st_mode & 0o777 == 0o666 & ~mask, small_file
    config = read_run_config(source)  # follows latest
    assert config.optimizer.name == "adam" and config.model.normalization == "ssnorm"
    ckpt = tmp_path / "iter_0000004"
    shutil.copytree(source / "iter_0000004", ckpt)
    assert resolve_checkpoint(ckpt) == ckpt
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"shard {shard} is truncated"):
        resolve_checkpoint(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file {shard}"):
        read_run_config(ckpt)
    (ckpt / "train_state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing train_state.json"):
        resolve_checkpoint(ckpt)


# ------------------------------------------------------------------ other layouts
def _fixed_tokens():
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))


def _logits_through_schedule(trainer, tokens):
    """Full-vocabulary logits of ``tokens`` at any TP/PP layout (the last stage returns them)."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, positions, None)

        def gather(out):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(out)
            return torch.zeros(()), {"logits": full.detach().clone()}

        return output, gather

    trainer.model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=[trainer.model],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    return outputs[0]["logits"] if outputs else None


def _other_layouts_worker(rank, world, corpus, root):
    """At world size 2: TP=2 and PP=2 (Adam) and DP=2 (Muon) runs stopped after STOP steps."""
    from megatron.core import parallel_state

    out = {}
    for name, opt, tp, pp in (("tp2", "adam", 2, 1), ("pp2", "adam", 1, 2), ("dp2", "muon", 1, 1)):
        overrides = _overrides(corpus, f"{root}/{name}", opt, tp=tp, pp=pp)
        trainer = _train(overrides + [f"train.exit_at_step={STOP}"])
        logits = _logits_through_schedule(trainer, _fixed_tokens())
        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            out[f"{name}_logits"] = logits
        if name == "tp2":  # the same layout continues to the end (reference for the TP=1 resume)
            losses = _losses(_train(overrides))
            if parallel_state.is_pipeline_last_stage():
                out["tp2_continued"] = losses
    return out


def _load_at_tp1_worker(rank, world, corpus, root):
    """At TP=1: load_model_weights from the TP=2 and PP=2 checkpoints; resume TP=2 and DP=2 runs."""
    from megatron_osp import parallel, platform
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import load_model_weights, read_run_config, read_train_state, save_checkpoint
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer, unwrap

    parallel.init_distributed(1, 1)
    platform.seed_everything(0)  # Megatron's RNG tracker must exist for a forward pass
    out = {}
    for name in ("tp2", "pp2"):
        ckpt = f"{root}/{name}/checkpoints/iter_{STOP:07d}"
        config = read_run_config(ckpt)
        model = build_gpt_model(config.model, transformer_config(config.model), seed=99)  # other init
        state = load_model_weights(ckpt, [model])
        assert state["iteration"] == STOP and state["layout"]["tensor_parallel_size"] == (2 if name == "tp2" else 1)
        model.eval()
        tokens = _fixed_tokens()
        with torch.no_grad():
            out[f"{name}_logits"] = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        if name == "tp2":  # a weights-only checkpoint (what a converter writes) starts a new run
            save_checkpoint(f"{root}/weights_only", 7, [model], config)
            trainer = Trainer(load_config(None, _overrides(corpus, f"{root}/from_weights") + [f"train.load={root}/weights_only"]), log=lambda *_: None)
            out["weights_only"] = (
                trainer.step,
                read_train_state(f"{root}/weights_only")["contents"],
                all(torch.equal(p, q) for p, q in zip(unwrap(trainer.model).parameters(), model.parameters())),
            )
    # Full training state (Adam moments, Muon momentum, scheduler, data position) at another layout.
    out["tp2_resumed"] = _losses(
        _train(_overrides(corpus, f"{root}/tp2_at_tp1") + [f"train.load={root}/tp2/checkpoints/iter_{STOP:07d}"])
    )
    out["pp2_resumed"] = _losses(
        _train(_overrides(corpus, f"{root}/pp2_at_pp1") + [f"train.load={root}/pp2/checkpoints"])
    )
    dp2_at_dp1 = _overrides(corpus, f"{root}/dp2_at_dp1", "muon") + [f"train.load={root}/dp2/checkpoints"]
    out["dp2_resumed"] = _losses(_train(dp2_at_dp1))
    # The same command again (a requeued job): its own checkpoint wins over train.load.
    out["requeued_step"] = Trainer(load_config(None, dp2_at_dp1), log=lambda *_: None).step
    return out


def test_tp2_pp2_dp2_checkpoints_load_at_tp1(toy_corpus, split_runs, tmp_path):
    saved = {}
    for r in run_distributed(_other_layouts_worker, 2, toy_corpus, str(tmp_path)):
        saved.update(r)
    loaded = run_distributed(_load_at_tp1_worker, 1, toy_corpus, str(tmp_path))[0]
    for name in ("tp2", "pp2"):
        assert saved[f"{name}_logits"].shape == (2, 32, 256)
        torch.testing.assert_close(loaded[f"{name}_logits"], saved[f"{name}_logits"], rtol=1e-5, atol=1e-5)
    # TP=2 and PP=2 states continued at TP=1, PP=1 follow the TP=2 run's own continuation (the
    # same logical run: same seed, data and optimizer; float32 tolerance).
    np.testing.assert_allclose(loaded["tp2_resumed"], saved["tp2_continued"], rtol=2e-5)
    np.testing.assert_allclose(loaded["pp2_resumed"], saved["tp2_continued"], rtol=2e-5)
    assert len(loaded["tp2_resumed"]) == STEPS - STOP
    assert loaded["weights_only"] == (0, ["model", "rng"], True)
    # DP=2 Muon state continued at DP=1 follows the single-process Muon run.
    muon_ref = split_runs[0]["muon_ref"]
    np.testing.assert_allclose(loaded["dp2_resumed"], muon_ref[STOP:], rtol=2e-5)
    assert loaded["requeued_step"] == STEPS


# ------------------------------------------------------------------ SIGTERM (cluster preemption)
def _pretrain(overrides, **kwargs):
    env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "megatron_osp.training.pretrain", *overrides]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigterm_saves_and_the_next_run_continues(toy_corpus, tmp_path):
    overrides = _overrides(toy_corpus, tmp_path / "run", steps=10_000)
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = _pretrain(overrides)
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    stopped = steps[-1]
    assert stopped < 10_000
    assert f"SIGTERM: stopped after step {stopped} of 10000" in output
    save_dir = tmp_path / "run" / "checkpoints"
    assert (save_dir / "latest").read_text().strip() == f"iter_{stopped:07d}"

    with metrics.open("a") as f:  # a line from beyond the checkpoint: the resumed run drops it
        f.write(json.dumps({"step": stopped + 50, "loss": 0.0}) + "\n")
    proc = _pretrain(overrides + [f"train.exit_at_step={stopped + 1}"])
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert f"resuming at step {stopped} ({stopped * 8} samples consumed)" in output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped + 2))
    assert (save_dir / "latest").read_text().strip() == f"iter_{stopped + 1:07d}"


def test_a_checkpoint_that_does_not_fit_the_run_is_refused_by_field(split_runs):
    import types

    from megatron_osp.training.checkpoint import CheckpointError, load_model_weights
    from megatron_osp.training.resume_check import check_compatible
    from megatron_osp.training.config import load_config

    save_dir = split_runs[2] / "adam_split" / "checkpoints"
    base = _overrides("unused", "unused")
    check_compatible(save_dir, load_config(None, base + ["parallel.tensor_parallel_size=2"]), resume=True)
    # SSNorm's kernel is how the same formula is computed, not the model: a resume may change it.
    check_compatible(save_dir, load_config(None, base + ["model.ssnorm_kernel=fused"]), resume=True)
    with pytest.raises(CheckpointError, match=r"model.hidden_size: checkpoint 64, this run 128"):
        check_compatible(save_dir, load_config(None, base + ["model.hidden_size=128"]), resume=False)
    with pytest.raises(CheckpointError, match=r"optimizer.name: checkpoint 'adam', this run 'muon'"):
        check_compatible(save_dir, load_config(None, base + ["optimizer.name=muon"]), resume=True)
    check_compatible(save_dir, load_config(None, base + ["optimizer.name=muon"]), resume=False)  # weights only
    with pytest.raises(CheckpointError, match="padded to 256 .* this model to 384"):
        load_model_weights(save_dir, [types.SimpleNamespace(vocab_size=384)])


def test_the_start_up_check_resolves_the_checkpoint_once(split_runs, monkeypatch):
    """check_compatible resolved (stat'ed every shard of) the checkpoint 4 times: reading its run config,
    its train state for the tokenizer record, and again for the vocabulary padding check."""
    from megatron_osp.training import checkpoint
    from megatron_osp.training.config import load_config
    from megatron_osp.training.resume_check import check_compatible

    real, calls = checkpoint.integrity.check_complete, []
    monkeypatch.setattr(checkpoint.integrity, "check_complete", lambda path, *a: calls.append(path) or real(path, *a))
    save_dir = split_runs[2] / "adam_split" / "checkpoints"
    check_compatible(save_dir, load_config(None, _overrides("unused", "unused")), resume=True)
    assert calls == [save_dir / "iter_0000004"]


def _count_resolutions(rank, world, corpus, load, run_dir):
    from megatron_osp.training import checkpoint
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    real, calls = checkpoint.integrity.check_complete, []
    checkpoint.integrity.check_complete = lambda path, *a: calls.append(str(path)) or real(path, *a)
    overrides = _overrides(corpus, run_dir, "muon") + [f"train.load={load}"]
    trainer = Trainer(load_config(None, overrides), log=lambda *_: None)
    return trainer.step, calls


def test_a_start_from_a_checkpoint_resolves_it_once_to_check_it_and_once_to_load_it(split_runs, toy_corpus, tmp_path):
    """The start-up resolved it 8 times: continues, check_compatible's 4, load_checkpoint and its
    train state, the saved sequence length."""
    ckpt = split_runs[2] / "muon_split" / "checkpoints" / f"iter_{STOP:07d}"  # steps left to continue
    step, calls = run_distributed(_count_resolutions, 1, toy_corpus, str(ckpt), str(tmp_path / "run"))[0]
    assert step == STOP and calls == [str(ckpt)] * 2


def _start_from(rank, world, corpus, load, run_dir, extra):
    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    try:
        trainer = Trainer(load_config(None, _overrides(corpus, run_dir, "muon") + [f"train.load={load}", *extra]),
                          log=lambda *_: None)
    except CheckpointError as e:
        return str(e)
    return trainer.step


def test_continuing_another_runs_finished_checkpoint_is_refused_as_nothing_left_to_train(split_runs, toy_corpus,
                                                                                          tmp_path):
    """train.load of another run's last checkpoint (at its train_steps, which a resume must keep) started,
    trained nothing and wrote a summary of the checkpoint's steps with no loss of its own. Now refused
    before anything starts, naming the way out; its weights alone (load_weights_only) still start a run."""
    save_dir = split_runs[2] / "muon_split" / "checkpoints"
    got = run_distributed(_start_from, 1, toy_corpus, str(save_dir), str(tmp_path / "a"), [])[0]
    assert isinstance(got, str) and f"at step {STEPS}" in got and "nothing left to train" in got, got
    assert "train.load_weights_only=true" in got
    assert not (tmp_path / "a" / "summary.json").exists()
    fresh = run_distributed(_start_from, 1, toy_corpus, str(save_dir), str(tmp_path / "b"),
                            ["train.load_weights_only=true"])[0]
    assert fresh == 0


def test_a_resume_with_other_optimizer_state_hyperparameters_is_refused(split_runs):
    """Adam's betas and eps and Muon's momentum and LR live in the optimizer state's param groups;
    loading it used to put the checkpoint's values back over the ones given, silently (a resume with
    optimizer.muon_momentum=0.5 kept 0.95). Now such a resume is refused naming the field."""
    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.resume_check import check_compatible
    from megatron_osp.training.config import load_config

    root = split_runs[2]
    for opt, override, message in (
        ("adam", "optimizer.adam_beta1=0.8", r"optimizer.adam_beta1: checkpoint 0.9, this run 0.8"),
        ("adam", "optimizer.adam_beta2=0.99", r"optimizer.adam_beta2: checkpoint 0.95, this run 0.99"),
        ("adam", "optimizer.adam_eps=1e-6", r"optimizer.adam_eps: checkpoint 1e-08, this run 1e-06"),
        ("muon", "optimizer.muon_momentum=0.5", r"optimizer.muon_momentum: checkpoint 0.95, this run 0.5"),
        ("muon", "optimizer.muon_lr=0.05", r"optimizer.muon_lr: checkpoint 0.003, this run 0.05"),
        ("muon", "optimizer.adam_beta2=0.99", r"optimizer.adam_beta2: checkpoint 0.95, this run 0.99"),
    ):
        save_dir = root / f"{opt}_split" / "checkpoints"
        config = load_config(None, _overrides("unused", "unused", opt) + [override])
        with pytest.raises(CheckpointError, match=message):
            check_compatible(save_dir, config, resume=True)
        check_compatible(save_dir, config, resume=False)  # its weights load either way
    base = _overrides("unused", "unused", "muon")
    # The LR Muon used (muon_lr unset = lr) given explicitly, and Muon settings of an Adam run: accepted.
    check_compatible(root / "muon_split" / "checkpoints", load_config(None, base + ["optimizer.muon_lr=0.003"]), resume=True)
    adam = _overrides("unused", "unused", "adam") + ["optimizer.muon_momentum=0.5"]
    check_compatible(root / "adam_split" / "checkpoints", load_config(None, adam), resume=True)


def test_rerunning_into_a_run_directory_with_other_data_or_seed_is_refused(toy_corpus, split_runs, tmp_path):
    """A second run with other data or another seed in the same run directory (e.g. two jobs of
    pretrain_slurm.sh, whose run_dir is the job name) used to auto-resume the first run's checkpoint:
    it continued the first run on another sample order, or, the first run being finished, trained
    nothing, exited 0 and reported the first run's results. Now it is refused naming the fields,
    and train.load (a new run from that checkpoint, on purpose) still may change them."""
    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.config import load_config
    from megatron_osp.training.resume_check import check_compatible

    root = split_runs[2]
    save_dir = root / "muon_split" / "checkpoints"
    latest = (save_dir / "latest").read_text().strip()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MASTER_ADDR", None)
    other = str(tmp_path / "other")  # another dataset (a copy: data.paths refuses one dataset listed twice)
    for ext in (".bin", ".idx"):
        shutil.copyfile(toy_corpus + ext, other + ext)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_osp.training.pretrain", *_split(toy_corpus, root, "muon"), "train.seed=99",
         f"data.paths=[{toy_corpus},{other}]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "does not fit this run" in result.stderr and "train.seed: checkpoint 1234, this run 99" in result.stderr
    assert f"data.paths: checkpoint ['{toy_corpus}'], this run ['{toy_corpus}', '{other}']" in result.stderr
    assert f"train.load={save_dir / latest} with another train.run_dir" in result.stderr
    assert (save_dir / "latest").read_text().strip() == latest

    base = _overrides(toy_corpus, "unused", "muon")
    for override, field in (("data.split=90,10", "data.split"), ("data.weights=[2]", "data.weights")):
        with pytest.raises(CheckpointError, match=rf"{field}: checkpoint"):
            check_compatible(save_dir, load_config(None, base + [override]), resume=True, same_run=True)
        check_compatible(save_dir, load_config(None, base + [override]), resume=True)  # train.load
    # The same data named another way, and the same split written shorter, are the same run.
    relative = os.path.relpath(toy_corpus)
    same = base + [f"data.paths=[{relative}]", "data.split=98,2"]
    check_compatible(save_dir, load_config(None, same), resume=True, same_run=True)


def test_a_fresh_start_drops_the_metrics_of_an_attempt_without_checkpoint(split_runs):
    """A run killed before its first checkpoint and started again used to append to its metrics.jsonl
    (steps 1, 2, ..., 6, 1, 2, 3, 4). A fresh start keeps no step lines, as a resume keeps none past
    its checkpoint; the dropped lines go to metrics.dropped.jsonl."""
    rows = [json.loads(line) for line in (split_runs[2] / "adam_ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == split_runs[0]["adam_ref"]
    # the earlier attempt's lines are kept aside, not lost
    aside = [json.loads(line) for line in (split_runs[2] / "adam_ref" / "metrics.dropped.jsonl").read_text().splitlines()]
    assert aside == [{"step": s, "loss": 99.0} for s in range(1, 7)]


def test_a_run_that_would_save_over_checkpoints_it_does_not_continue_is_refused(split_runs):
    """train.auto_resume=false (which the refusal message used to suggest "to start fresh") made a run
    save into a save_dir holding an earlier run's checkpoints: its iter_2 replaced theirs, latest moved
    and keep_last pruned the rest. Now refused before anything is built; loading a checkpoint of the
    save_dir itself (going back to an earlier step) or not saving is still allowed."""
    import types

    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.resume_check import checkpoint_to_load

    save_dir = split_runs[2] / "muon_split" / "checkpoints"
    listing = sorted(p.name for p in save_dir.iterdir())

    def train(**values):
        return types.SimpleNamespace(**{"auto_resume": False, "load": None, "save": True,
                                        "run_dir": str(split_runs[2] / "unused_run_dir"), **values})

    assert checkpoint_to_load(train(auto_resume=True), save_dir) == (save_dir, True)
    for settings, started in ((train(), "from scratch"), (train(load=str(split_runs[2] / "adam_split" / "checkpoints")),
                                                          "from train.load=")):
        with pytest.raises(CheckpointError, match=rf"train.save_dir={save_dir} holds the checkpoints of an earlier "
                                                  rf"run \(latest: iter_0000004\); this run starts {started}"):
            checkpoint_to_load(settings, save_dir)
    older = str(save_dir / "iter_0000002")
    assert checkpoint_to_load(train(load=older), save_dir) == (older, True)
    assert checkpoint_to_load(train(save=False), save_dir) == (None, False)
    assert checkpoint_to_load(train(), save_dir.parent / "elsewhere") == (None, False)
    assert sorted(p.name for p in save_dir.iterdir()) == listing


def test_a_run_stopped_by_exit_at_step_says_how_to_continue(split_runs):
    """It used to say "Run the same command again to continue": that command stops again at once."""
    stops = [line for line in split_runs[0]["first_log"] if "stopped after step" in line]
    assert len(stops) == 2, split_runs[0]["first_log"][-5:]
    for line in stops:
        assert line.endswith("Run it again without train.exit_at_step (or with a larger one) to continue."), line
