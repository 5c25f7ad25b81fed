"""The memory planner (training/memory_plan.py, tools/plan_memory.py) against real multi-rank runs.

A CPU run of the ``test`` preset (with GQA: 4 heads in 2 query groups) in bf16 with
``optimizer.distributed_optimizer=true`` (OSP: Muon + AdamW) at DP=2 and at TP=2 x DP=2 (there with
relayed delivery, optimizer.delivery=relay) measures on
every rank: bytes of the parameters, of DDP's main_grad buffers, of the ZeroOptimizer's masters and
state tensors and of the owners' reduced gradients after one step, the peak bytes of the exchange's
live send/receive buffers during that step (Exchange.peak_buffer_bytes), the bytes sent by all-to-all in
that step (split sizes to other ranks, every call wrapped), and the activations one micro-batch's
forward saves for backward (saved_tensors_hooks, deduplicated by storage, parameters excluded).
It also records every all-to-all's bytes to and from other ranks, from which the step's busiest
link (per call, the most any rank sent or received, summed over calls) is taken.
The planner, run in a separate world of one for the same layouts, must give the same figures rank
by rank (and the same busiest link): exactly for everything but activations, within 10% for activations (its formula is the
local layer spec's on CPU, unfused attention; see per_layer_activation_bytes).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
MICRO, DP_GLOBAL = 2, 4  # micro-batch 2; global batch 4 per DP=2 world: one micro-batch per step
EXACT = ("params", "grads", "masters", "state", "owner_grads", "comm_buffers", "sent_grads", "sent_params")


def _overrides(corpus, run_dir, tp, delivery="auto"):
    return [f"optimizer.delivery={delivery}",
        "model.preset=test", "model.num_query_groups=2", f"data.paths=[{corpus}]", "data.eod_id=255",
        "optimizer.name=muon", "optimizer.muon_lr=0.02", "optimizer.distributed_optimizer=true",
        "optimizer.bucket_size=20000", f"parallel.tensor_parallel_size={tp}", "train.bf16=true",
        "train.train_steps=1", "train.warmup_steps=0", f"train.global_batch_size={DP_GLOBAL}",
        f"train.micro_batch_size={MICRO}", "train.tensorboard=false", "train.progress_bar=false",
        f"train.run_dir={run_dir}",
    ]


def _saved_bytes(model, tokens) -> int:
    """Bytes of the tensors one forward saves for backward, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    position = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, position, None, labels=tokens)
    del out
    return sum(seen.values())


def _measure_worker(rank, world_size, overrides):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    trainer = Trainer(load_config(None, overrides), log=lambda *_: None)
    domain = parallel_state.get_tensor_and_data_parallel_group()
    me = dist.get_rank(domain)
    sent = {}  # dtype -> bytes to other ranks: fp32 = gradients, bf16 = returned parameters
    calls = []  # per all-to-all, in issue order: (dtype, bytes sent to others, bytes received from others)
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        ranks, me = dist.get_world_size(group), dist.get_rank(group)
        sizes = input_split_sizes or [input.numel() // ranks] * ranks
        got = output_split_sizes or [output.numel() // ranks] * ranks
        n = sum(k for r, k in enumerate(sizes) if r != me) * input.element_size()
        sent[input.dtype] = sent.get(input.dtype, 0) + n
        calls.append((str(input.dtype), n, sum(k for r, k in enumerate(got) if r != me) * output.element_size()))
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        trainer.train_step()  # the first step: it also creates the optimizer's state tensors
    finally:
        dist.all_to_all_single = original
    opt, model = trainer.optimizer, trainer.model
    model.train()
    tokens = torch.randint(0, 250, (MICRO, trainer.config.model.seq_length))
    return {
        "domain_rank": me,
        "coord": (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()),
        "params": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in model.buffers + model.expert_parallel_buffers),
        "masters": sum(t.numel() * t.element_size() for t in opt.masters.values()),
        "state": sum(t.numel() * t.element_size() for st in opt.state_tensors.values() for t in st.values()),
        "owner_grads": sum(t.numel() * t.element_size() for t in opt.exchange.grads.values()),
        "comm_buffers": opt.exchange.peak_buffer_bytes,
        "sent_grads": sent.get(torch.float32, 0),
        "sent_params": sent.get(torch.bfloat16, 0),
        "param_dtype": str(next(model.parameters()).dtype),
        "calls": calls,
        "activations": _saved_bytes(model, tokens),
    }


def _plan(layouts):
    """Our planner's per-rank figures (as dicts) for each (tp, dp, delivery), OSP, the run's bucket size."""
    import dataclasses

    from megatron_osp.models.presets import get_preset
    from megatron_osp.training.memory_plan import Layout, plan

    model = get_preset("test", num_query_groups=2)
    out = []
    for tp, dp, delivery in layouts:
        stages = plan(model, Layout(tp=tp, dp=dp, micro_batch=MICRO), ("muon",), bucket_size=20000, delivery=delivery)
        out.append([dataclasses.asdict(r) for r in stages[0].ours["muon"]])
    return out


def _dp2_worker(rank, world_size, overrides):
    """The DP=2 run; its rank 0 (TP=1, PP=1, as the planner needs) also plans both layouts."""
    return _measure_worker(rank, world_size, overrides), _plan([(1, 2, "auto"), (2, 2, "relay")]) if rank == 0 else None


def _check(planned, measured):
    assert len(planned) == len(measured)
    for m in measured:
        assert m["param_dtype"] == "torch.bfloat16"
        p = planned[m["domain_rank"]]
        assert tuple(p["coord"]) == m["coord"]
        for key in EXACT:
            assert p[key] == m[key], (key, m["coord"], p[key], m[key])
        assert p["activations"] == pytest.approx(m["activations"], rel=0.10), (m["coord"], p["activations"], m["activations"])
    # The busiest link: per all-to-all (the same sequence on every rank), the most any rank sent or
    # received, summed over the step's calls: fp32 ones are gradients, bf16 ones parameters.
    per_call = list(zip(*[m["calls"] for m in measured]))
    link = {dtype: sum(max(max(s, r) for _, s, r in call) for call in per_call if call[0][0] == dtype)
            for dtype in ("torch.float32", "torch.bfloat16")}
    for p in planned:
        assert (p["link_grads"], p["link_params"]) == (link["torch.float32"], link["torch.bfloat16"]), (p, link)
    assert link["torch.float32"] > max(m["sent_grads"] for m in measured)  # not the mere bytes sent
    # Not trivially equal figures: ownership spreads the masters over the domain.
    assert sum(m["masters"] for m in measured) > max(m["masters"] for m in measured) > 0


def test_planner_matches_real_zero_runs_rank_by_rank(toy_corpus, tmp_path):
    """DP=2 (direct delivery), then TP=2 x DP=2 relayed (zero/relay.py): the planner's figures are
    the measured ones on every rank."""
    dp2 = run_distributed(_dp2_worker, 2, _overrides(toy_corpus, str(tmp_path / "dp2"), 1))
    planned = dp2[0][1]
    _check(planned[0], [m for m, _ in dp2])
    _check(planned[1], run_distributed(_measure_worker, 4, _overrides(toy_corpus, str(tmp_path / "tp2"), 2, "relay")))


def test_bad_layouts_are_refused_naming_the_option():
    from megatron_osp.models.presets import get_preset
    from megatron_osp.training.memory_plan import Layout, check_layout

    model = get_preset("osp-8b")
    for layout, message in ((Layout(tp=3), "--tp 3"), (Layout(pp=3), "--pp 3"), (Layout(pp=1, vp=2), "needs --pp"),
                            (Layout(recompute="some"), "--recompute"), (Layout(dp=0), "--dp")):
        with pytest.raises(ValueError, match=message):
            check_layout(model, layout)
    check_layout(model, Layout(tp=8, pp=4, vp=2, dp=8))


def test_micro_batch_counts_that_cannot_run_are_refused():
    """--microbatches 0 used to plan as if unset and -3 to plan negative activations; 3 with PP=2 and
    virtual stages, a step training refuses, was planned."""
    from megatron_osp.models.presets import get_preset
    from megatron_osp.training.memory_plan import Layout, check_layout

    model = get_preset("tiny")
    for layout, message in ((Layout(microbatches=0), "--microbatches must be >= 1, got 0"),
                            (Layout(pp=2, microbatches=-3), "--microbatches must be >= 1, got -3"),
                            (Layout(pp=2, vp=2, microbatches=3), "--microbatches 3 must be a multiple of --pp 2")):
        with pytest.raises(ValueError, match=message):
            check_layout(model, layout)
    check_layout(model, Layout(pp=2, vp=2, microbatches=4))
    check_layout(model, Layout(pp=2, microbatches=3))


def test_tool_refuses_a_layout_before_any_work():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_memory.py"), "--preset", "osp-8b", "--tp", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--tp 3" in done.stderr, done.stderr[-2000:]


def test_tool_refuses_a_json_path_that_is_a_directory(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_memory.py"), "--preset", "osp-1.4b", "--json",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"--json {tmp_path}: a directory" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and os.listdir(tmp_path) == []
