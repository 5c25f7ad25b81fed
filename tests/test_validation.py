"""Issue #14, case 3 and the config-error prefix of case 6: values that cannot work are refused by
name before any work starts (training/validation.py), token ids and token dtypes are checked when a
dataset opens (data/token_range.py), and a resumed run's token count is what it consumed.

The CLI tests run ``python -m megatron_osp.training.pretrain`` as a user does; the resumed-run test
calls the same entry point (``pretrain.main``) in a fresh process per segment forked from
run_distributed's preloaded server, which skips each segment's ~6 s of imports."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_osp.training.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "megatron_osp" / "configs").glob("*.yaml"))


def _pretrain(args, cwd=REPO, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MASTER_ADDR", None)
    return subprocess.run(
        [sys.executable, "-m", "megatron_osp.training.pretrain", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _pretrain_worker(rank, world, args):
    """``pretrain.main(args)`` as from a plain shell (a world of one that it starts and shuts down
    itself, MASTER_ADDR unset as in _pretrain): (exit code, stdout, stderr)."""
    import contextlib
    import io

    import torch.distributed as dist

    from megatron_osp.training import pretrain

    dist.destroy_process_group()  # run_distributed's world of one: pretrain starts its own
    os.environ.pop("MASTER_ADDR", None)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = pretrain.main(args)
    return rc, out.getvalue(), err.getvalue()


def _pretrain_forked(args) -> subprocess.CompletedProcess:
    """_pretrain's result, from ``pretrain.main`` in a new process forked with the imports done."""
    from megatron_osp.testing.distributed import run_distributed

    rc, out, err = run_distributed(_pretrain_worker, 1, args, timeout=300)[0]
    return subprocess.CompletedProcess(args, rc, out, err)


def _tiny(corpus, run_dir, *extra):
    return [
        "model.preset=test", f"data.paths=[{corpus}]", "data.eod_id=255", "train.train_steps=2",
        "train.warmup_steps=1", "train.global_batch_size=8", "train.micro_batch_size=2", "train.log_interval=1",
        "train.eval_batches=1", "train.tensorboard=false", "train.progress_bar=false", f"train.run_dir={run_dir}",
        *extra,
    ]


# ------------------------------------------------------------------ every field has a rule
def test_every_settings_field_has_a_range_rule():
    """A field added to a settings dataclass without a rule in RULES fails here, so none is forgotten."""
    from megatron_osp.training.validation import RULES

    for section in dataclasses.fields(RunConfig):
        names = {f.name for f in dataclasses.fields(section.default_factory())}
        assert set(RULES[section.name]) == names, section.name


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_validate(path):
    from megatron_osp.training.validation import check_config, check_world

    config = load_config(path)
    check_config(config)
    par = config.parallel
    check_world(config, par.tensor_parallel_size * par.pipeline_parallel_size)


# ------------------------------------------------------------------ one value out of range
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.global_batch_size=0", r"train\.global_batch_size=0: must be >= 1"),
        ("train.global_batch_size=-16", r"train\.global_batch_size=-16: must be >= 1"),
        ("train.micro_batch_size=0", r"train\.micro_batch_size=0: must be >= 1"),
        ("train.micro_batch_size=-4", r"train\.micro_batch_size=-4: must be >= 1"),
        ("parallel.tensor_parallel_size=0", r"parallel\.tensor_parallel_size=0: must be >= 1"),
        ("parallel.pipeline_parallel_size=-1", r"parallel\.pipeline_parallel_size=-1"),
        ("optimizer.lr=-1", r"optimizer\.lr=-1\.0: must be > 0"),
        ("optimizer.lr=0", r"optimizer\.lr=0\.0: must be > 0"),
        ("optimizer.lr=.nan", r"optimizer\.lr=nan: must be a finite number"),
        ("optimizer.muon_lr=.inf", r"optimizer\.muon_lr=inf: must be a finite number"),
        ("optimizer.min_lr_ratio=1.5", r"optimizer\.min_lr_ratio=1\.5: must be in \[0\.0, 1\.0\]"),
        ("optimizer.adam_beta1=1", r"optimizer\.adam_beta1=1\.0: must be in \[0\.0, 1\.0\)"),
        ("optimizer.adam_beta2=-0.1", r"optimizer\.adam_beta2=-0\.1"),
        ("optimizer.adam_eps=0", r"optimizer\.adam_eps=0\.0: must be > 0"),
        ("optimizer.weight_decay=-0.1", r"optimizer\.weight_decay=-0\.1: must be >= 0"),
        ("optimizer.clip_grad=-1", r"optimizer\.clip_grad=-1\.0"),
        ("optimizer.muon_momentum=1.0", r"optimizer\.muon_momentum=1\.0"),
        ("optimizer.muon_ns_steps=0", r"optimizer\.muon_ns_steps=0: must be >= 1"),
        ("optimizer.round_size=0", r"optimizer\.round_size=0: must be >= 1"),
        ("model.num_attention_heads=0", r"model\.num_attention_heads=0: must be >= 1"),
        ("model.num_query_groups=0", r"model\.num_query_groups=0: must be >= 1"),
        ("model.hidden_size=-64", r"model\.hidden_size=-64"),
        ("model.num_layers=0", r"model\.num_layers=0"),
        ("model.vocab_size=0", r"model\.vocab_size=0"),
        ("model.seq_length=0", r"model\.seq_length=0"),
        ("model.make_vocab_size_divisible_by=0", r"model\.make_vocab_size_divisible_by=0"),
        ("model.hidden_dropout=1.0", r"model\.hidden_dropout=1\.0: must be in \[0\.0, 1\.0\)"),
        ("model.attention_dropout=-0.1", r"model\.attention_dropout=-0\.1"),
        ("model.layernorm_epsilon=0", r"model\.layernorm_epsilon=0\.0: must be > 0"),
        ("model.init_method_std=-0.02", r"model\.init_method_std=-0\.02"),
        ("model.transformer_impl=fast", r"model\.transformer_impl='fast': must be one of"),
        ("model.ssnorm_kernel=triton", r"model\.ssnorm_kernel='triton': must be one of auto, eager, fused"),
        ("train.log_interval=0", r"train\.log_interval=0: must be >= 1"),
        ("train.eval_batches=0", r"train\.eval_batches=0: must be >= 1"),
        ("train.kurtosis_batches=0", r"train\.kurtosis_batches=0: must be >= 1"),
        ("train.eval_interval=-1", r"train\.eval_interval=-1"),
        ("train.kurtosis_interval=-5", r"train\.kurtosis_interval=-5"),
        ("train.seed=-1", r"train\.seed=-1: must be in \[0, 4294967296\)"),
        ("train.wsd_decay_fraction=1.5", r"train\.wsd_decay_fraction=1\.5"),
        ("train.run_dir=''", r"train\.run_dir='': must be a non-empty string"),
        ("data.eod_id=-1", r"data\.eod_id=-1"),
        ("data.split=abc", r"data\.split='abc'"),
        ("data.weights=[1, -1]", r"data\.weights=\[1\.0, -1\.0\]: entry 1"),
        ("data.weights=[1, 0]", r"data\.weights=\[1\.0, 0\.0\]: entry 1 \(0\.0\) must be a finite number > 0"),
        ("data.weights=[1, nan]", r"data\.weights=\[1\.0, nan\]: entry 1"),
        ("data.num_workers=-1", r"data\.num_workers=-1"),
        ("data.num_workers=4", r"data\.num_workers=4: must be 0 \(samples are read by the training process\)"),  # was accepted and never used
    ],
)
def test_value_out_of_range_is_refused_by_name(override, message):
    from megatron_osp.training.validation import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, field", [
    ("train.run_dir=~/runs/x", r"train\.run_dir='~/runs/x'"),
    ("train.save_dir=~/ckpt", r"train\.save_dir='~/ckpt'"),
    ("train.load=~/ckpt", r"train\.load='~/ckpt'"),
    ("data.cache_dir=~user/cache", r"data\.cache_dir='~user/cache'"),
    ("data.tokenizer_model=~/tok.model", r"data\.tokenizer_model='~/tok.model'"),
    ("train.wandb_dir=~/wandb", r"train\.wandb_dir='~/wandb'"),
    ("data.paths=[/data/a, ~/b]", r"data\.paths=\['/data/a', '~/b'\]: entry 1 \('~/b'\)"),
])
def test_a_path_starting_with_a_tilde_is_refused_not_made_a_directory_named_tilde(override, field):
    """Nothing expands '~' (the shell does not in train.run_dir=~/x: not a variable assignment; YAML
    never does): the run was written into ./~/runs/x under the working directory, the data looked for
    in ./~/b."""
    from megatron_osp.training.validation import ConfigError

    with pytest.raises(ConfigError, match=field + r":? starts with '~', which is not expanded here"):
        load_config(None, ["data.paths=[x]", "data.eod_id=0", override])
    load_config(None, ["data.paths=[x]", "data.eod_id=0", "train.run_dir=runs/~x"])  # inside a path: a name


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hidden_size=12", "model.num_attention_heads=4"], r"3 channels per head: must be even"),
        (["model.num_query_groups=3"], r"model\.num_attention_heads=4 is not divisible by model\.num_query_groups=3"),
        (["parallel.tensor_parallel_size=3"],
         r"model\.num_attention_heads=4 is not divisible by parallel\.tensor_parallel_size=3"),
        (["parallel.pipeline_parallel_size=3"],
         r"model\.num_layers=2 is not divisible by parallel\.pipeline_parallel_size=3"),
        (["model.ffn_hidden_size=171", "parallel.tensor_parallel_size=2"],
         r"model\.ffn_hidden_size=171 is not divisible"),
        (["parallel.sequence_parallel=true", "parallel.tensor_parallel_size=4", "model.seq_length=30"],
         r"model\.seq_length=30 is not divisible by parallel\.tensor_parallel_size=4"),
        (["data.eod_id=600"], r"data\.eod_id=600 is outside the vocabulary \(model\.vocab_size=512\)"),
        (["data.paths=[a]", "data.weights=[1, 2]"], r"data\.weights has 2 entries but data\.paths has 1"),
        (["optimizer.delivery=relay"], r"optimizer\.delivery=relay needs optimizer\.distributed_optimizer=true"),
        (["optimizer.distributed_optimizer=true", "model.untie_embeddings_and_output_weights=false"],  # refused once built
         r"optimizer\.distributed_optimizer=true needs model\.untie_embeddings_and_output_weights=true"),
        (["parallel.sequence_parallel=true"],  # TP 1: silently off (Megatron-Core refuses it)
         r"parallel\.sequence_parallel=true needs parallel\.tensor_parallel_size > 1.*set parallel\.sequence_parallel=false"),
        (["train.wsd_decay_fraction=0.3"],  # decay_style cosine: the fraction was never used
         r"train\.wsd_decay_fraction=0\.3 is used only with train\.decay_style=wsd \(train\.decay_style='cosine'\)"),
        (["train.train_steps=100", "train.exit_at_step=150"],  # ran to the end: exit_at_step never triggered
         r"train\.exit_at_step=150 is past train\.train_steps=100.*at most 100"),
        (["data.split=0,100,0"],  # no train share: used to crash at the first step (len(None))
         r"data\.split='0,100,0' gives training no documents"),
    ],
)
def test_values_that_do_not_fit_together_are_refused(overrides, message):
    from megatron_osp.training.validation import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_every_problem_is_reported_at_once_and_the_prefix_once(tmp_path):
    """Issue 6: the prefix used to repeat '+ command line' once per section given on the command line."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n")
    with pytest.raises(ValueError) as e:
        load_config(path, ["train.global_batch_size=0", "optimizer.lr=-1", "parallel.tensor_parallel_size=0"])
    text = str(e.value)
    assert text.startswith(f"{path} + command line: 3 invalid settings:"), text
    assert text.count("command line") == 1
    for part in ("train.global_batch_size=0", "optimizer.lr=-1.0", "parallel.tensor_parallel_size=0"):
        assert part in text


def test_world_size_relations():
    from megatron_osp.training.validation import ConfigError, check_world

    config = load_config(
        None, ["parallel.tensor_parallel_size=2", "train.global_batch_size=8", "train.micro_batch_size=4"]
    )
    check_world(config, 2)  # DP 1: 8 = 4 x 2 micro-batches
    world = r"tensor_parallel_size=2 x parallel\.pipeline_parallel_size=1 = 2 does not divide the world size 3"
    with pytest.raises(ConfigError, match=world):
        check_world(config, 3)
    batch = r"global_batch_size=8 is not divisible by train\.micro_batch_size=4 x 4 data-parallel"
    with pytest.raises(ConfigError, match=batch):
        check_world(config, 8)


# ------------------------------------------------------------------ the CLI, as a user runs it
def test_cli_refuses_impossible_batch_parallel_and_lr_values_before_starting(toy_corpus, tmp_path):
    """gbs 0 / -16 used to train and exit 0 (NaN loss, negative tokens); mbs 0 / -4, TP 0 and lr -1
    ended in ZeroDivisionError or library tracebacks. Now: exit 2, every field named, nothing written."""
    for bad in (
        ["train.global_batch_size=0", "train.micro_batch_size=-4", "parallel.tensor_parallel_size=0",
         "optimizer.lr=-1"],
        ["train.global_batch_size=-16", "train.micro_batch_size=0"],
    ):
        run_dir = tmp_path / "run"
        result = _pretrain(_tiny(toy_corpus, run_dir, *bad))
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        for item in bad:
            field, value = item.split("=")
            assert f"{field}={value}" in result.stderr.replace(".0:", ":"), (item, result.stderr[-2000:])
        assert not run_dir.exists()


def test_cli_refuses_a_split_without_a_train_share_before_starting(toy_corpus, tmp_path):
    """data.split=0,100,0 used to build the indices, start the run and stop at step 1 with
    'TypeError: object of type 'NoneType' has no len()'. Now: exit 2 naming data.split, nothing written."""
    run_dir = tmp_path / "run"
    result = _pretrain(_tiny(toy_corpus, run_dir, "data.split=0,100,0"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "data.split='0,100,0' gives training no documents" in result.stderr
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A 350-piece SentencePiece tokenizer and a corpus written with it (uint16, like preprocessing)."""
    import sentencepiece as spm

    from megatron_osp.data.builtin_corpus import write_corpus
    from megatron_osp.data.indexed import IndexedDatasetWriter
    from megatron_osp.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("tokenized")
    write_corpus(d / "corpus.jsonl", max_documents=80)
    model = str(train_sentencepiece(d / "corpus.jsonl", d / "tok", vocab_size=350))
    sp = spm.SentencePieceProcessor(model_file=model)
    with IndexedDatasetWriter(d / "corpus", np.uint16) as writer:
        for line in (d / "corpus.jsonl").read_text().splitlines():
            writer.add_document(np.array(sp.encode(json.loads(line)["text"]) + [sp.eos_id()], dtype=np.uint16))
    return {"tokenizer": model, "prefix": str(d / "corpus"), "vocab": sp.get_piece_size()}


def test_cli_refuses_vocab_smaller_than_the_tokenizer(tokenized, tmp_path):
    """Used to fail inside torch.embedding (IndexError; a device-side assert on a GPU) after start-up."""
    run_dir = tmp_path / "run"
    args = _tiny(tokenized["prefix"], run_dir, f"data.tokenizer_model={tokenized['tokenizer']}", "model.vocab_size=300")
    result = _pretrain([a for a in args if a != "data.eod_id=255"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    expected = f"model.vocab_size=300 is smaller than the vocabulary of data.tokenizer_model={tokenized['tokenizer']}"
    assert expected + " (350 pieces)" in result.stderr
    assert not run_dir.exists()


def test_cli_names_the_file_holding_ids_outside_the_vocabulary(toy_corpus, tmp_path):
    """toy_corpus holds ids up to 255; a 200-id model used to die in torch.embedding."""
    result = _pretrain(_tiny(toy_corpus, tmp_path / "run", "model.vocab_size=200", "data.eod_id=199"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{toy_corpus}.bin: token ids reach 255, outside model.vocab_size=200" in result.stderr
    assert "in sequence " in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_cli_refuses_an_index_whose_dtype_cannot_hold_the_tokenizer_ids(tokenized, tmp_path):
    """An .idx whose dtype code was changed from uint16 to uint8 used to train on reinterpreted
    bytes. Refused by the reader (the .bin size does not match) or, for a dataset truly stored in
    uint8, because uint8 cannot hold the 350-piece tokenizer's ids."""
    from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter

    patched = str(tmp_path / "patched")
    shutil.copy(tokenized["prefix"] + ".bin", patched + ".bin")
    idx = bytearray(Path(tokenized["prefix"] + ".idx").read_bytes())
    assert idx[17] == 8  # MMIDIDX\0\0 | u64 version | u8 dtype code: 8 = uint16
    idx[17] = 1  # uint8
    Path(patched + ".idx").write_bytes(bytes(idx))
    stored = str(tmp_path / "stored")
    source = IndexedDataset(tokenized["prefix"])
    with IndexedDatasetWriter(stored, np.uint8) as writer:
        for i in range(len(source)):
            ids = np.asarray(source[i])
            writer.add_document(ids[ids < 256].astype(np.uint8))
    for prefix, message in (
        (patched, f"{patched}.idx"),
        (stored, f"{stored}.idx: token dtype uint8 holds ids up to 255, but the tokenizer "
                 f"{tokenized['tokenizer']} (350 pieces) has ids up to 349"),
    ):
        args = _tiny(prefix, tmp_path / "run", f"data.tokenizer_model={tokenized['tokenizer']}", "model.vocab_size=350")
        result = _pretrain([a for a in args if a != "data.eod_id=255"])
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert message in result.stderr and "uint8" in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "run" / "config.yaml").exists()


def test_resumed_token_count_and_a_finished_rerun_keep_summary_right(toy_corpus, tmp_path):
    """Tokens count what was consumed across resumed segments with different global batches, and a
    rerun of the finished run with another global batch used to rewrite summary.json (wrong tokens).
    Each segment is a new process running the CLI's entry point (_pretrain_forked)."""
    run_dir = tmp_path / "run"
    seq = 32  # the test preset
    first = _pretrain_forked(_tiny(toy_corpus, run_dir, "train.train_steps=3", "train.exit_at_step=1"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _pretrain_forked(_tiny(toy_corpus, run_dir, "train.train_steps=3", "train.global_batch_size=4"))
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["tokens"] == (8 + 4 + 4) * seq
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["consumed_samples"], r["tokens"]) for r in lines] == [
        (1, 8, 8 * seq), (2, 12, 12 * seq), (3, 16, 16 * seq)
    ]
    before = {name: (run_dir / name).read_bytes() for name in ("summary.json", "config.yaml", "metrics.jsonl")}
    again = _pretrain_forked(_tiny(toy_corpus, run_dir, "train.train_steps=3", "train.global_batch_size=16"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished at step 3" in again.stdout + again.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_settings_this_machine_cannot_run_are_refused_before_the_model_is_built(toy_corpus, tmp_path):
    """On CPU, train.bf16=true (without the distributed optimizer) used to fail inside Megatron's
    optimizer once the model was built (TypeError: Wrapped parameters must be one of
    torch.cuda.FloatTensor ...), transformer_impl=transformer_engine without TE with an ImportError
    traceback, and muon_ns_backend=triton at the first step. Now all three are named at once when
    the Trainer starts, before the process group, datasets or model exist."""
    from megatron_osp.models.layer_specs import transformer_engine_available
    from megatron_osp.training.loop import Trainer
    from megatron_osp.training.platform_checks import platform_problems
    from megatron_osp.training.validation import ConfigError

    bad = ["train.bf16=true", "model.transformer_impl=transformer_engine", "optimizer.name=muon",
           "optimizer.muon_ns_backend=triton"]
    config = load_config(None, _tiny(toy_corpus, tmp_path / "run", *bad))
    problems = platform_problems(config, on_cpu=True)
    assert problems[0].startswith("train.bf16=true on CPU needs optimizer.distributed_optimizer=true")
    assert any(p.startswith("optimizer.muon_ns_backend=triton cannot run here") for p in problems)
    if not transformer_engine_available():
        assert any(p.startswith("model.transformer_impl=transformer_engine: Transformer Engine is not installed")
                   for p in problems)
    with pytest.raises(ConfigError, match=r"invalid settings:\n  train\.bf16=true on CPU"):
        Trainer(config, log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    # What runs: bf16 with our distributed optimizer, Adam with any Newton-Schulz backend, a GPU.
    fine = load_config(None, _tiny(toy_corpus, tmp_path / "run", "train.bf16=true", "optimizer.distributed_optimizer=true",
                                   "optimizer.muon_ns_backend=triton"))
    assert platform_problems(fine, on_cpu=True) == []
    assert not [p for p in platform_problems(config, on_cpu=False) if p.startswith("train.bf16")]


def test_rmsnorm_with_sequence_parallelism_on_the_local_spec_is_refused(toy_corpus, tmp_path):
    """Megatron-Core's local RMSNorm asserts "sequence parallel not supported by torch LayerNorm" when
    the model is built (after the data), so RMSNorm x SP at TP=2 on CPU crashed every rank."""
    from megatron_osp.training.platform_checks import platform_problems

    sp = ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true", "model.transformer_impl=local"]
    config = load_config(None, _tiny(toy_corpus, tmp_path / "run", *sp, "model.normalization=rmsnorm"))
    assert [p for p in platform_problems(config, on_cpu=True) if "sequence_parallel" in p] == [
        "parallel.sequence_parallel=true with model.normalization=rmsnorm needs Transformer Engine "
        "(model.transformer_impl=local builds Megatron-Core's local RMSNorm here, which has no sequence "
        "parallelism): use model.normalization=ssnorm, parallel.sequence_parallel=false, or "
        "transformer_impl=transformer_engine on a GPU"]
    # SSNorm is sequence parallel; RMSNorm without it is fine.
    for fine in (sp, sp[:1] + ["model.transformer_impl=local", "model.normalization=rmsnorm"]):
        assert platform_problems(load_config(None, _tiny(toy_corpus, tmp_path / "run", *fine)), on_cpu=True) == []


def test_several_tasks_not_started_by_torchrun_are_refused(toy_corpus, tmp_path, monkeypatch):
    """`srun -n 8 python -m megatron_osp.training.pretrain ...` (no torchrun) made every task a world
    of one: eight runs trained alone and raced on one run directory and its checkpoints."""
    from megatron_osp.training.loop import Trainer
    from megatron_osp.training.platform_checks import check_launch
    from megatron_osp.training.validation import ConfigError

    for env, message in (({"SLURM_STEP_NUM_TASKS": "8"}, r"one of 8 tasks started by srun \(SLURM_STEP_NUM_TASKS=8\)"),
                         ({"OMPI_COMM_WORLD_SIZE": "2"}, r"one of 2 tasks started by mpirun")):
        with pytest.raises(ConfigError, match=message):
            check_launch(env)
    check_launch({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"})  # one task (or a batch script)
    check_launch({"SLURM_STEP_NUM_TASKS": "4", "MASTER_ADDR": "node1"})  # torchrun's workers
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(ConfigError, match="not by torchrun"):
        Trainer(load_config(None, _tiny(toy_corpus, tmp_path / "run")), log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_a_save_dir_that_cannot_be_written_is_refused_before_training(toy_corpus, tmp_path):
    """train.save_dir under a file (or anywhere it cannot be created) used to train every step and
    then fail at the first save with FileExistsError: with save_interval=0 the whole run was lost."""
    from megatron_osp.training.loop import Trainer
    from megatron_osp.training.platform_checks import platform_problems
    from megatron_osp.training.validation import ConfigError

    a_file = toy_corpus + ".bin"
    config = load_config(None, _tiny(toy_corpus, tmp_path / "run", f"train.save_dir={a_file}/checkpoints"))
    with pytest.raises(ConfigError, match=rf"train\.save_dir={a_file}/checkpoints: {a_file} is not a directory"):
        Trainer(config, log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    inside = load_config(None, _tiny(toy_corpus, f"{a_file}/run"))
    assert platform_problems(inside, on_cpu=True) == [
        f"train.run_dir={a_file}/run: {a_file} is not a directory",
        f"train.save_dir={a_file}/run/checkpoints: {a_file} is not a directory"]
    cache = load_config(None, _tiny(toy_corpus, tmp_path / "run", f"data.cache_dir={a_file}/cache"))
    assert platform_problems(cache, on_cpu=True) == [f"data.cache_dir={a_file}/cache: {a_file} is not a directory"]
    # Not saving: only the run directory matters; a directory still to be made is fine.
    assert platform_problems(load_config(None, _tiny(toy_corpus, tmp_path / "a" / "b", "train.save=false",
                                                     f"train.save_dir={a_file}")), on_cpu=True) == []
