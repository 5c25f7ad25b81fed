"""TensorBoard and W&B behind training/metric_sinks.py.

Most tests need no wandb: a recording fake module stands in for it in sys.modules (in the test
process, or inside the training rank). The tests marked by ``pytest.importorskip("wandb")`` run the
real one offline (a tiny run end to end) or online without a login (one clear error at start)."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from megatron_osp.testing.distributed import run_distributed
from megatron_osp.training.config import load_config
from test_training_parallel import _overrides

REPO = Path(__file__).resolve().parents[1]


class _FakeRun:
    def __init__(self, calls, step):
        self.calls, self.step = calls, step

    def log(self, data, step=None):
        self.calls.append(("log", data, step))

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))


def _fake_wandb(calls, step=0, fail=None):
    """A wandb module recording init/log/finish; ``step``: the resumed run's next step."""
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        if fail is not None:
            raise fail
        return _FakeRun(calls, step)

    module.init = init
    return module


def _config(run_dir, *extra):
    return load_config(None, ["train.wandb_project=proj", f"train.run_dir={run_dir}", *extra])


def _logged(calls):
    return [(tag, step, value) for call in calls if call[0] == "log" for tag, value in call[1].items() for step in [call[2]]]


# ------------------------------------------------------------------ the sinks alone (fake wandb)
def test_wandb_sink_init_scalars_and_finish(tmp_path, monkeypatch):
    from megatron_osp.training.metric_sinks import open_sinks

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = _config(tmp_path / "my_run", "train.tensorboard=false", "train.wandb_entity=team")
    sinks = open_sinks(config, logging_rank=True, resume=False)
    sinks.scalar("train/loss", 2.5, 1)
    sinks.scalar("train/grad_norm", float("nan"), 1)  # skipped, as for TensorBoard
    sinks.scalar("val/loss", 3.0, 10)
    sinks.close()
    sinks.close()  # once only

    (name, kwargs), *rest = calls
    run_id = (tmp_path / "my_run" / "wandb_run_id").read_text().strip()
    assert name == "init" and run_id
    assert kwargs == {
        "project": "proj", "entity": "team", "name": "my_run", "dir": str(tmp_path / "my_run"),
        "id": run_id, "resume": "allow", "config": config.to_dict(),
    }
    assert rest == [("log", {"train/loss": 2.5}, 1), ("log", {"val/loss": 3.0}, 10), ("finish", 0)]


def test_name_and_dir_settings_and_wandb_dir_env(tmp_path, monkeypatch):
    from megatron_osp.training.metric_sinks import open_sinks

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env_dir"))
    open_sinks(_config(tmp_path / "run", "train.tensorboard=false"), True, False).close()
    explicit = _config(tmp_path / "run", "train.tensorboard=false", "train.wandb_name=n", f"train.wandb_dir={tmp_path}/w")
    open_sinks(explicit, True, False).close()
    inits = [call[1] for call in calls if call[0] == "init"]
    assert [(i["name"], i["dir"]) for i in inits] == [("run", str(tmp_path / "env_dir")), ("n", str(tmp_path / "w"))]
    assert (tmp_path / "w").is_dir()


def test_resume_reuses_the_run_id_and_a_new_start_gets_a_new_one(tmp_path, monkeypatch):
    from megatron_osp.training.metric_sinks import open_sinks

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    config = _config(tmp_path / "run", "train.tensorboard=false")
    for resume in (False, True, True, False):
        open_sinks(config, True, resume).close()
    ids = [call[1]["id"] for call in calls if call[0] == "init"]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == ids[3]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["wandb_run_id"]  # no temporary left


def test_resumed_run_skips_the_steps_wandb_already_has(tmp_path, monkeypatch):
    """A run resumed from step 2's checkpoint whose W&B run had reached step 4: steps 3 and 4 would
    each be refused by W&B with a warning; they are skipped, with one message."""
    from megatron_osp.training.metric_sinks import open_sinks

    calls, messages = [], []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls, step=5))
    sinks = open_sinks(_config(tmp_path / "run", "train.tensorboard=false"), True, resume=True, log=messages.append)
    for step in (3, 4, 5, 6):
        sinks.scalar("train/loss", float(step), step)
        sinks.scalar("train/lr", 0.1, step)
    assert _logged(calls) == [("train/loss", 5, 5.0), ("train/lr", 5, 0.1), ("train/loss", 6, 6.0), ("train/lr", 6, 0.1)]
    assert len(messages) == 1 and "before 5" in messages[0]


def test_only_the_logging_rank_opens_sinks(tmp_path, monkeypatch):
    from megatron_osp.training.metric_sinks import open_sinks

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    sinks = open_sinks(_config(tmp_path / "run"), logging_rank=False, resume=False)
    sinks.scalar("train/loss", 1.0, 1)
    sinks.close()
    assert calls == [] and not (tmp_path / "run").exists()


def test_wandb_that_does_not_start_is_one_clear_error(tmp_path, monkeypatch):
    from megatron_osp.training.metric_sinks import SinkStartError, open_sinks

    calls = []
    failure = RuntimeError("No API key configured.\nUse `wandb login` to log in.")
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls, fail=failure))
    with pytest.raises(SinkStartError) as info:
        open_sinks(_config(tmp_path / "run", "train.tensorboard=true"), True, False)
    message = str(info.value)
    assert message.startswith("W&B (train.wandb_project=proj) could not start: No API key configured. Use")
    assert "WANDB_MODE=offline" in message and "\n" not in message
    assert list((tmp_path / "run" / "tensorboard").iterdir())  # the TensorBoard sink was opened, and closed


def test_wandb_settings_are_checked_by_name(tmp_path, monkeypatch):
    from megatron_osp.training.platform_checks import platform_problems
    from megatron_osp.training.validation import ConfigError, check_config

    with pytest.raises(ConfigError, match=r"train\.wandb_name=' ': must be a non-empty string"):
        check_config(_config(tmp_path, "train.wandb_name=' '"))
    assert load_config(None, ["train.wandb_project="]).train.wandb_project is None  # empty: off
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails as when it is not installed
    problems = platform_problems(_config(tmp_path / "run"), on_cpu=True)
    assert problems == ["train.wandb_project=proj: wandb is not installed (pip install wandb, or "
                        "pip install -e \".[wandb]\"; or leave train.wandb_project unset)"]
    assert platform_problems(load_config(None, [f"train.run_dir={tmp_path}/run"]), on_cpu=True) == []


def test_trainer_refuses_wandb_project_without_wandb_before_the_model(toy_corpus, tmp_path, monkeypatch):
    from megatron_osp.training import model_setup
    from megatron_osp.training.loop import Trainer
    from megatron_osp.training.validation import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(model_setup, "build_chunks", lambda *a, **k: pytest.fail("the model was built"))
    config = load_config(None, _overrides(toy_corpus, "adam") + [f"train.run_dir={tmp_path}/run", "train.wandb_project=p"])
    with pytest.raises(ConfigError, match=r"^train\.wandb_project=p: wandb is not installed \(pip install wandb"):
        Trainer(config, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the Trainer (fake wandb in the rank)
def _train_with_fake(rank, world_size, overrides, step=0):
    from megatron_osp.training.loop import Trainer

    calls = []
    sys.modules["wandb"] = _fake_wandb(calls, step)
    os.environ.pop("WANDB_DIR", None)
    Trainer(load_config(None, overrides), log=lambda *_: None).train()
    return calls


def test_trainer_logs_what_tensorboard_gets_and_resumes_the_same_run(toy_corpus, tmp_path):
    """Steps 1-2 (exit_at_step), then the same command resumes at step 3: one W&B run id, the
    training steps, and the same (tag, step, value)s as TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    overrides = [o for o in _overrides(toy_corpus, "adam") if not o.startswith("train.tensorboard")]
    overrides += ["train.tensorboard=true", "train.kurtosis_interval=1", "train.wandb_project=proj",
                  f"train.run_dir={run_dir}"]
    first = run_distributed(_train_with_fake, 1, overrides + ["train.exit_at_step=2"])[0]
    second = run_distributed(_train_with_fake, 1, overrides, 3)[0]

    inits = [call[1] for call in first + second if call[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert inits[1]["config"] == load_config(None, overrides).to_dict()
    assert {i["resume"] for i in inits} == {"allow"} and inits[0]["name"] == "run" and inits[0]["dir"] == str(run_dir)
    assert first[-1] == second[-1] == ("finish", 0)
    logged = _logged(first) + _logged(second)
    assert sorted({step for _, step, _ in logged}) == [1, 2, 3]
    assert [s for tag, s, _ in logged if tag == "train/loss"] == [1, 2, 3]
    assert [s for tag, s, _ in logged if tag == "kurtosis/mean"] == [1, 2, 3]
    assert [s for tag, s, _ in logged if tag == "val/loss"] == [3]

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    board = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    wandb = {(tag, step): value for tag, step, value in logged}
    assert len(wandb) == len(logged) and sorted(wandb) == sorted(board)
    assert [wandb[key] for key in sorted(board)] == pytest.approx([board[key] for key in sorted(board)], rel=1e-6)


def _start_failing(rank, world_size, overrides):
    from megatron_osp.training.loop import Trainer
    from megatron_osp.training.metric_sinks import SinkStartError

    sys.modules["wandb"] = _fake_wandb([], fail=RuntimeError("no network."))
    try:
        Trainer(load_config(None, overrides), log=lambda *_: None)
    except SinkStartError as e:
        return str(e)
    return "started"


def test_every_rank_stops_at_start_when_wandb_fails_on_the_logging_rank(toy_corpus, tmp_path):
    """PP=2: the logging rank is rank 1 (last stage). Rank 0 used to go on into the data index's
    barrier and die there with a lost peer's traceback; now both stop at start with one line."""
    overrides = _overrides(toy_corpus, "adam", pp=2) + [f"train.run_dir={tmp_path}/run", "train.wandb_project=p"]
    first, last = run_distributed(_start_failing, 2, overrides)
    assert first == "W&B (train.wandb_project=p) could not start on the logging rank; its error says why"
    assert last.startswith("W&B (train.wandb_project=p) could not start: no network. Log in with `wandb login`")
    assert not (tmp_path / "run" / "index_cache").exists()


# ------------------------------------------------------------------ real wandb
def _wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log of 32 KiB blocks
    after a 7-byte header): enough to read back what was logged."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not the W&B offline file format this test reads"
    records, chunk, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(Record.FromString(chunk))
            chunk = b""
    return records


def _train_offline(rank, world_size, overrides, wandb_dir):
    from megatron_osp.training.loop import Trainer

    os.environ.update(WANDB_MODE="offline", WANDB_DIR=wandb_dir, WANDB_SILENT="true", WANDB_CONFIG_DIR=wandb_dir,
                      WANDB_CACHE_DIR=wandb_dir, WANDB_DATA_DIR=wandb_dir)
    return Trainer(load_config(None, overrides), log=lambda *_: None).train()


def test_real_wandb_offline_run(toy_corpus, tmp_path):
    pytest.importorskip("wandb")
    import json

    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb_files"
    overrides = _overrides(toy_corpus, "adam") + ["train.save=false", "train.wandb_project=osp-test",
                                                   f"train.run_dir={run_dir}"]
    summary = run_distributed(_train_offline, 1, overrides, str(wandb_dir))[0]

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (log,) = wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    records = _wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "osp-test", "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {key: value for key, value in config.items() if not key.startswith("_")} == load_config(None, overrides).to_dict()
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = rows.setdefault(r.history.step.num, {})
            row.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    assert sorted(rows) == [1, 2, 3]
    assert [rows[s]["train/loss"] for s in (1, 2, 3)] == pytest.approx([h for h in _losses(run_dir)], rel=1e-6)
    assert rows[3]["val/loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert rows[3]["kurtosis/max"] == pytest.approx(summary["kurtosis_max"], rel=1e-6)
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]


def _losses(run_dir):
    import json

    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_wandb_that_cannot_log_in_stops_pretrain_at_start(toy_corpus, tmp_path):
    """Online mode without a login: one line naming W&B and WANDB_MODE=offline, exit 2, before the
    data or the model are built (nothing but the run id and W&B's own files in the run directory)."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "MASTER_ADDR"}
    env.update(HOME=str(tmp_path), WANDB_MODE="online", WANDB_CONFIG_DIR=str(tmp_path / "cfg"), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    run_dir = tmp_path / "run"
    args = _overrides(toy_corpus, "adam") + ["train.wandb_project=osp-test", f"train.run_dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "megatron_osp.training.pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert "error: W&B (train.wandb_project=osp-test) could not start: " in proc.stderr
    assert "WANDB_MODE=offline" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name for p in run_dir.iterdir()} <= {"wandb", "wandb_run_id"}
