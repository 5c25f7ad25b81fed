"""Newton-Schulz per bucket during the backward pass (optimizer.early_newton_schulz).

One rank (it owns every unit, so every bucket's Muon batches run early), OSP with the distributed
optimizer and overlapped gradient delivery, small buckets, 3 steps:
- without clipping the early results are used in every step, and the run is bit-identical (losses
  and every weight) to the same run with early_newton_schulz=false;
- with a clip threshold so small that every step clips, the first step's early results are
  discarded and computed again in the step, later steps (after a clipped one) do not run early, and
  the run is again bit-identical to early_newton_schulz=false;
- the first Newton-Schulz batch runs before the backward pass reaches the embedding output.
The 4-rank layouts (tests/test_zero_training.py) run with it on, and match overlap off and the
single-process run there.
"""

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

BASE = [
    "model.preset=test", "data.eod_id=255", "optimizer.name=muon", "optimizer.muon_lr=0.02",
    "optimizer.distributed_optimizer=true", "optimizer.overlap_grad_reduce=true",
    "optimizer.overlap_param_gather=true", "optimizer.bucket_size=4000",
    "train.train_steps=3", "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
    "train.log_interval=1", "train.tensorboard=false", "train.progress_bar=false",
    "train.eval_batches=1", "train.kurtosis_batches=1",
]


def _worker(rank, world_size, cases, root):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer, unwrap

    out = {}
    for name, overrides in cases:
        trainer = Trainer(load_config(None, overrides + [f"train.run_dir={root}/{name}"]), log=lambda *_: None)
        events = []
        core = unwrap(trainer.model)

        def mark_backward(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: events.append(("embedding_output_grad",)))

        core.embedding.register_forward_hook(mark_backward)
        trainer.optimizer.exchange.events = events
        trainer.train()
        trainer.optimizer.finish_param_sync()
        out[name] = {
            "losses": [h["loss"] for h in trainer.history],
            "weights": {k: v.detach().clone() for k, v in core.named_parameters()},
            "early_ns": dict(trainer.optimizer.early_ns),
            "batches": len(trainer.optimizer.ns_batches),
            "events": events,
        }
    return out


@pytest.fixture(scope="module")
def runs(toy_corpus, tmp_path_factory):
    base = BASE + [f"data.paths=[{toy_corpus}]"]
    cases = []
    for clip in ("0", "1e-6"):
        for early in ("true", "false"):
            cases.append((f"clip{clip}_{early}", base + [f"optimizer.clip_grad={clip}",
                                                         f"optimizer.early_newton_schulz={early}"]))
    return run_distributed(_worker, 1, cases, str(tmp_path_factory.mktemp("early_ns")), timeout=600)[0]


def _identical(a, b):
    assert a["losses"] == b["losses"]
    assert sorted(a["weights"]) == sorted(b["weights"])
    for k, w in a["weights"].items():
        assert torch.equal(b["weights"][k], w), k


@pytest.mark.parametrize("clip", ["0", "1e-6"])
def test_early_newton_schulz_gives_the_step_time_numbers(runs, clip):
    early, late = runs[f"clip{clip}_true"], runs[f"clip{clip}_false"]
    _identical(early, late)
    batches, steps = early["batches"], len(early["losses"])
    assert batches > 2
    if clip == "0":  # never clips: every batch's early result is used
        assert early["early_ns"] == {"used": batches * steps, "redone": 0}
    else:  # always clips: step 1's early results are redone, and later steps do not try
        assert early["early_ns"] == {"used": 0, "redone": batches}
    assert late["early_ns"] == {"used": 0, "redone": 0}
    assert not any(e[0] == "newton_schulz" for e in late["events"])


def test_newton_schulz_starts_while_the_backward_pass_runs(runs):
    ev = runs["clip0_true"]["events"]
    step = ev[: next(i for i, e in enumerate(ev) if e[0] == "param_issue")]  # the first step's events
    backward_end = max(i for i, e in enumerate(step) if e == ("embedding_output_grad",))
    first_ns = next(i for i, e in enumerate(step) if e[0] == "newton_schulz")
    assert first_ns < backward_end, step[: backward_end + 1]
    # a bucket's batches run once its gradients are in (every round of it waited for), never before
    rounds = {}
    for e in ev:
        if e[0] == "grad_issue":
            rounds.setdefault(e[1], set()).add(e[2])
    for i, e in enumerate(ev):
        if e[0] == "newton_schulz":
            assert rounds[e[1]] <= {x[2] for x in ev[:i] if x[0] == "grad_wait" and x[1] == e[1]}
