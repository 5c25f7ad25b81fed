"""train.profile_steps=2-3 on 2 ranks (DP=2): one Chrome trace per rank in <run_dir>/profile/, whose
named ranges cover exactly steps 2 and 3 (each step once, its forward-backward and optimizer step,
the evaluation after step 2, the kurtosis measurement after step 3 and the save of step 2), and the
losses are those of the same run without profiling, which writes no profile."""

import json
from collections import Counter

import pytest

from megatron_osp.testing.distributed import run_distributed
from test_training_parallel import _overrides


def _worker(rank, world_size, overrides, root):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    out = {}
    for name, extra in (("plain", []), ("profiled", ["train.profile_steps=2-3"])):
        lines = []
        trainer = Trainer(load_config(None, overrides + [f"train.run_dir={root}/{name}"] + extra), log=lines.append)
        trainer.train()
        out[name] = {"losses": [h["loss"] for h in trainer.history], "lines": lines}
    return out


def _ranges(path):
    """The trace's ranges of ours (torch adds its own, e.g. gloo:all_reduce): (name, start, end) in µs."""
    from megatron_osp.training.profiling import RANGES

    events = json.loads(path.read_text())["traceEvents"]
    return [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "user_annotation"
            and (e["name"] in RANGES or e["name"].startswith("step "))]


def test_profile_steps_traces_exactly_those_steps_on_every_rank(toy_corpus, tmp_path):
    overrides = _overrides(toy_corpus, "adam") + [
        "train.train_steps=4", "train.eval_interval=2", "train.kurtosis_interval=3", "train.save_interval=2",
        "train.eval_batches=1"]
    results = run_distributed(_worker, 2, overrides, str(tmp_path))
    for r in results:
        assert r["profiled"]["losses"] == r["plain"]["losses"] and len(r["plain"]["losses"]) == 4, r
    assert not (tmp_path / "plain" / "profile").exists()
    profile = tmp_path / "profiled" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["steps_2-3_rank0.json", "steps_2-3_rank1.json"]
    said = [line for line in results[0]["profiled"]["lines"] if line.startswith("profile of steps 2-3 written to")]
    assert len(said) == 1 and str(profile) in said[0], results[0]["profiled"]["lines"]
    for path in sorted(profile.iterdir()):
        ranges = _ranges(path)
        counts = Counter(name for name, _, _ in ranges)
        assert counts == {"step 2": 1, "step 3": 1, "forward_backward": 2, "optimizer_step": 2, "evaluate": 1,
                          "kurtosis": 1, "save_checkpoint": 1}, (path.name, counts)
        steps = {name: (start, end) for name, start, end in ranges if name.startswith("step ")}
        assert steps["step 2"][1] <= steps["step 3"][0]
        inside = {name: [s for s, (a, b) in steps.items() if a <= start and end <= b] for name, start, end in ranges
                  if not name.startswith("step ")}
        # the evaluation and the save follow step 2, the kurtosis measurement step 3
        assert inside["evaluate"] == ["step 2"] and inside["save_checkpoint"] == ["step 2"], inside
        assert inside["kurtosis"] == ["step 3"], inside
        parts = [(name, s) for name, start, end in ranges if name in ("forward_backward", "optimizer_step")
                 for s, (a, b) in steps.items() if a <= start and end <= b]
        assert sorted(parts) == sorted((n, s) for n in ("forward_backward", "optimizer_step") for s in steps), parts


def test_profile_steps_values():
    from megatron_osp.training.config import load_config
    from megatron_osp.training.profiling import _OFF, StepProfiler

    assert load_config(None, ["train.profile_steps=2-3"]).train.profile_steps == "2-3"
    assert load_config(None, ["train.profile_steps=5"]).train.profile_steps == "5"  # one step
    for bad in ("0-3", "3-2", "2..3", "2-3-4", "-3", "a-b"):
        with pytest.raises(ValueError, match="train.profile_steps=.*must be START-END"):
            load_config(None, [f"train.profile_steps={bad}"])
    with pytest.raises(ValueError, match=r"train.profile_steps='99-101' ends past train.train_steps=100"):
        load_config(None, ["train.profile_steps=99-101"])
    off = StepProfiler(None, "unused", 0, None)
    off.step_begins(1)
    assert off.range("forward_backward") is _OFF  # off: a shared no-op context, no profiler
