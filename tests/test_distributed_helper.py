"""run_distributed gives real gloo worlds, returns per-rank results and surfaces rank failures."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_osp.testing.distributed import run_distributed


def _all_reduce(rank, world_size, base, scale=1.0):
    assert dist.get_rank() == rank and dist.get_world_size() == world_size
    assert os.environ["LOCAL_RANK"] == str(rank) and os.environ["MASTER_ADDR"] == "127.0.0.1"
    t = (base + rank) * scale
    dist.all_reduce(t)
    return {"rank": rank, "sum": t, "big": torch.full((256, 256), float(rank))}


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom from the failing rank")
    return rank


def _hang_on_rank_one(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


def _die_on_rank_one(rank, world_size):
    if rank == 1:
        os._exit(3)
    dist.barrier()


def test_all_reduce_two_ranks():
    base = torch.tensor([1.0, 2.0, 3.0])
    results = run_distributed(_all_reduce, 2, base, scale=2.0)
    want = (base + 0) * 2.0 + (base + 1) * 2.0
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        torch.testing.assert_close(r["sum"], want)
        assert r["big"][0, 0].item() == r["rank"]


def test_rank_exception_surfaces_traceback():
    with pytest.raises(AssertionError) as info:
        run_distributed(_raise_on_rank_one, 2, timeout=60)
    msg = str(info.value)
    assert "rank 1" in msg
    assert "Traceback (most recent call last)" in msg
    assert "ValueError: boom from the failing rank" in msg
    assert "_raise_on_rank_one" in msg


def test_hung_rank_is_killed_after_timeout():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 8s; ranks \[1\]"):
        run_distributed(_hang_on_rank_one, 2, timeout=8)
    assert time.monotonic() - start < 30


def test_dead_rank_is_reported():
    with pytest.raises(AssertionError, match="rank 1 exit code 3"):
        run_distributed(_die_on_rank_one, 2, timeout=60)


def test_lambda_is_rejected():
    with pytest.raises(TypeError, match="module-level"):
        run_distributed(lambda rank, world_size: rank, 1)


def test_a_taken_rendezvous_port_is_retried_on_a_new_one(monkeypatch):
    import socket

    import megatron_osp.testing.distributed as helper

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real_free_port = helper._free_port
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(helper, "_free_port", lambda: next(ports, None) or real_free_port())
    try:
        out = run_distributed(_all_reduce, 2, torch.tensor([1.0]))
    finally:
        taken.close()
    assert [o["rank"] for o in out] == [0, 1]
    assert torch.equal(out[0]["sum"], torch.tensor([3.0]))


def test_a_world_of_one_needs_no_port(monkeypatch):
    import subprocess
    import sys

    code = (
        "import os, torch.distributed as dist\n"
        "from megatron_osp import parallel\n"
        "parallel.init_distributed(1, 1)\n"
        "assert dist.get_world_size() == 1 and 'MASTER_PORT' not in os.environ\n"
        "parallel.shutdown(); parallel.init_distributed(1, 1); print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
