"""What the distributed optimizer sends, and when (4 gloo ranks, the test model, fp32).

Bytes: every collective of one training step is counted per rank (testing/comm_count.py, the NCCL
bus-bytes model), for Adam and OSP, with distributed_optimizer=true (ours) and false (today's path:
DDP all-reduce, plus Muon's all-to-all of update slices), at DP=4 and TP=2 x DP=2. The optimizer's
share is the all-to-all traffic of ours, and all but the model's own TP all-reduces for today's.
The baseline is what Megatron-Core's DistributedOptimizer sends for Adam: a reduce-scatter of fp32
gradients and an all-gather of parameters, (D-1)/D x local parameters x (4 + 4) bytes per rank
(tests/test_megatron_reference.py shows Megatron's own sends exactly that).
- DP=4: ours is within 1.05x of that baseline for Adam and for OSP, and below today's path.
- TP=2 x DP=2: Adam within 1.01x on average (1.10x on the busiest rank); OSP below today's path, but above 1.05x of the Adam baseline:
  a whole logical matrix must be assembled for Newton-Schulz, so the TP pieces of every TP-split Muon
  matrix also cross TP ranks. The test checks OSP against that exact whole-matrix volume instead.

Order (overlap on): every gradient bucket but the last one or two (the embedding's, the input
EmbProj's) is sent before the backward pass reaches the embedding output, in bucket order, and some
owner runs a bucket's Newton-Schulz then; parameters returned by a step are waited for only inside
the next forward pass, some of them after a later layer's forward has begun, and all but the first
WINDOW rounds (a bucket goes in one or more all-to-all rounds) are sent from inside that forward
pass as earlier ones arrive. The same holds with relayed delivery (optimizer.delivery=relay).
"""

import numpy as np
import pytest

from megatron_osp.optimizer.zero.exchange import WINDOW
from megatron_osp.testing.distributed import run_distributed

BASE = ["model.preset=test", "data.eod_id=255", "optimizer.muon_lr=0.02", "train.train_steps=5",
        "train.warmup_steps=1", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.tensorboard=false", "train.progress_bar=false", "optimizer.bucket_size=4000"]
OVERLAP = ["optimizer.overlap_grad_reduce=true", "optimizer.overlap_param_gather=true"]


def _worker(rank, world_size, cases, root):
    from megatron.core import parallel_state

    from megatron_osp.testing.comm_count import CommCounter
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer, unwrap

    out = {}
    for name, overrides in cases:
        trainer = Trainer(load_config(None, overrides + [f"train.run_dir={root}/{name}"]), log=lambda *_: None)
        trainer.train_step()
        if not name.startswith("events"):
            with CommCounter() as counter:
                trainer.train_step()
            out[name] = {"by_op": dict(counter.by_op), "total": counter.bytes_sent,
                         "local": sum(p.numel() for p in trainer.model.parameters()),
                         "muon_tp_split": _muon_tp_split(trainer),
                         "dp": parallel_state.get_data_parallel_world_size(),
                         "tp": parallel_state.get_tensor_model_parallel_world_size()}
            continue
        events = []
        core = unwrap(trainer.model)
        core.register_forward_pre_hook(lambda *_: events.append(("forward_begin",)))
        core.decoder.layers[-1].register_forward_pre_hook(lambda *_: events.append(("last_layer_forward",)))
        def mark_backward(module, inputs, output):
            output.register_hook(lambda g: events.append(("embedding_output_grad",)))

        core.embedding.register_forward_hook(mark_backward)
        trainer.optimizer.exchange.events = events
        trainer.train_step()
        events.append(("step_returned",))
        trainer.train_step()
        buckets = trainer.optimizer.exchange.buckets
        out[name] = {"events": events, "buckets": len(buckets), "rounds": sum(len(b.param_rounds) for b in buckets)}
    return out


def _muon_tp_split(trainer) -> int:
    """Elements of this rank's TP-split Muon matrices (0 without Muon or TP)."""
    from megatron_osp.optimizer.routing import route_parameters

    route = route_parameters([trainer.model], trainer.config.optimizer.name)
    return sum(p.numel() for _, p in route.muon if p.ndim == 2 and getattr(p, "tensor_model_parallel", False))


@pytest.fixture(scope="module")
def measured(toy_corpus, tmp_path_factory):
    base = BASE + [f"data.paths=[{toy_corpus}]"]
    cases = []
    for tp in (1, 2):
        for opt in ("adam", "muon"):
            for zero in ("true", "false"):
                cases.append((f"tp{tp}_{opt}_{zero}", base + [
                    f"optimizer.name={opt}", f"parallel.tensor_parallel_size={tp}",
                    f"optimizer.distributed_optimizer={zero}"] + (OVERLAP if zero == "true" else [])))
    cases.append(("events", base + ["optimizer.name=muon", "optimizer.distributed_optimizer=true"] + OVERLAP))
    cases.append(("events_relay", base + ["optimizer.name=muon", "optimizer.distributed_optimizer=true",
                                          "optimizer.delivery=relay"] + OVERLAP))
    return run_distributed(_worker, 4, cases, str(tmp_path_factory.mktemp("zero_comm")), timeout=900)


def _optimizer_bytes(measured, name):
    """Per rank: bytes the optimizer sent in the step (ours: its all-to-alls; today's: everything
    but the model's TP all-reduces, which ours sends too, as all_reduce)."""
    out = []
    for r in measured:
        if name.endswith("_true"):
            out.append(r[name]["by_op"].get("all_to_all_single", 0))
        else:
            ours = r[name.replace("_false", "_true")]["by_op"].get("all_reduce", 0)
            out.append(r[name]["total"] - ours)
    return np.array(out, dtype=float)


def _distopt_volume(r) -> float:
    d = r["dp"]
    return (d - 1) / d * r["local"] * (4 + 4)


@pytest.mark.parametrize("tp", [1, 2])
def test_adam_sends_what_a_distributed_optimizer_sends(measured, tp):
    base = np.array([_distopt_volume(r[f"tp{tp}_adam_true"]) for r in measured])
    ours = _optimizer_bytes(measured, f"tp{tp}_adam_true")
    # Megatron's equal flat shards balance sends exactly; whole units owned by memory leave a few
    # percent between ranks at this size (a rank sends the parameters it owns).
    assert ours.mean() <= 1.01 * base.mean() and ours.max() <= 1.10 * base.max(), (ours, base)


@pytest.mark.parametrize("tp", [1, 2])
def test_osp_sends_less_than_todays_all_reduce_and_return(measured, tp):
    ours = _optimizer_bytes(measured, f"tp{tp}_muon_true")
    today = _optimizer_bytes(measured, f"tp{tp}_muon_false")
    assert ours.max() < today.min(), (ours, today)


def test_osp_at_dp4_is_within_1_05x_of_the_distributed_optimizer_volume(measured):
    base = np.array([_distopt_volume(r["tp1_muon_true"]) for r in measured])
    ours = _optimizer_bytes(measured, "tp1_muon_true")
    assert ours.max() <= 1.05 * base.max(), (ours / base)


def test_osp_at_tp2_dp2_pays_only_the_whole_matrix_assembly(measured):
    """Whole-matrix NS moves each TP-split Muon matrix's pieces to one owner of the T x D domain:
    (T*D - 1)/(T*D) of them per rank instead of a reduce-scatter's (D - 1)/D."""
    ratios = []
    for r in measured:
        m = r["tp2_muon_true"]
        t, d = m["tp"], m["dp"]
        extra = ((t * d - 1) / (t * d) - (d - 1) / d) * m["muon_tp_split"] * (4 + 4)
        ratios.append(_distopt_volume(m) + extra)
    bound = np.array(ratios)
    ours = _optimizer_bytes(measured, "tp2_muon_true")
    assert ours.mean() <= 1.01 * bound.mean() and ours.max() <= 1.05 * bound.max(), (ours, bound)
    assert ours.mean() > 1.05 * np.mean([_distopt_volume(r["tp2_muon_true"]) for r in measured])


@pytest.mark.parametrize("case", ["events", "events_relay"])
def test_gradients_leave_during_backward_and_parameters_arrive_during_forward(measured, case):
    """Direct delivery, and relayed (zero/relay.py: each round's second all-to-all goes when its
    first arrives; "grad_wait"/"param_wait" mark a round's last hop)."""
    for r in measured:
        ev, buckets, rounds = r[case]["events"], r[case]["buckets"], r[case]["rounds"]
        relayed = [e for e in ev if e[0] in ("grad_relay", "param_relay")]
        assert bool(relayed) == (case == "events_relay"), ev
        assert buckets > 2 and rounds >= buckets
        first_step = ev[: ev.index(("step_returned",))]
        second = ev[ev.index(("step_returned",)) :]
        last_backward = max(i for i, e in enumerate(first_step) if e == ("embedding_output_grad",))
        # Every bucket but the one holding the embedding (and at most the input EmbProj's) left
        # while the backward pass still ran: buckets follow the order gradients become ready.
        issued_early = list(dict.fromkeys(e[1] for e in first_step[:last_backward] if e[0] == "grad_issue"))
        assert issued_early == list(range(len(issued_early))) and len(issued_early) >= buckets - 2, first_step
        # and owners ran Newton-Schulz on some of them then (optimizer.early_newton_schulz)
        r["ns_early"] = any(e[0] == "newton_schulz" for e in first_step[:last_backward])
        # The step's parameters: the first WINDOW rounds leave before it returns, the rest as the
        # next forward pass waits for the first ones; nothing is waited for before that forward.
        last_grad_wait = max(i for i, e in enumerate(first_step) if e[0] == "grad_wait")
        assert sum(1 for e in first_step[last_grad_wait:] if e[0] == "param_issue") == WINDOW
        begin = second.index(("forward_begin",))
        waits = [i for i, e in enumerate(second) if e[0] == "param_wait"]
        issues = [i for i, e in enumerate(second) if e[0] == "param_issue"]
        assert len(waits) == rounds and min(waits) > begin
        assert len([i for i in issues if begin < i < max(waits)]) == rounds - WINDOW
        assert max(waits) > second.index(("last_layer_forward",))  # waited at first use, not upfront
    assert any(r["ns_early"] for r in measured)
