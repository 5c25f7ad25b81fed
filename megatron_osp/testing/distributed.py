"""Run a function on N gloo ranks from a plain pytest test (CPU, no torchrun needed).

Each rank is a fresh process, forked from a fork server that has only imported torch, Megatron-Core
and our training code (so ranks skip ~6 s of imports each), so Megatron's global parallel state and
our CPU patches never leak between tests. A rank's exception comes back to the caller with its full traceback, and a hung
world (e.g. one rank stuck in a collective) is killed after ``timeout`` instead of hanging pytest.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback

import torch.multiprocessing as mp

_POLL_S = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, results, fn, args, kwargs):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
        MEGATRON_OSP_FORCE_CPU="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args, **kwargs)
        # Plain pickle copies tensor data into the bytes; torch's queue would instead share memory
        # through this process, which breaks once it exits before the parent has read the result.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            # Only tear Megatron down if fn used it: importing it just to do so costs seconds.
            parallel_state = sys.modules.get("megatron.core.parallel_state")
            if parallel_state is not None:
                try:
                    parallel_state.destroy_model_parallel()
                except Exception:  # noqa: BLE001
                    pass
            dist.destroy_process_group()


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux /proc; elsewhere none are found)."""
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _stop(procs, grace: float) -> None:
    """Join the ranks, killing those still alive after ``grace`` seconds, and the processes a killed
    rank had started (Megatron-Core's checkpoint writer keeps a spawned Manager process), which would
    otherwise live on as orphans."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            children = _children(p.pid)
            p.kill()
            for child in children:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        p.join()


def run_distributed(fn, world_size: int, *args, timeout: float = 120, **kwargs) -> list:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on each of ``world_size`` gloo ranks.

    Returns ``fn``'s return values as a list ordered by rank. ``fn`` must be a module-level function
    and its arguments and results picklable (return CPU tensors / floats). Raises AssertionError with
    the rank and its traceback if any rank raises, dies, or the world outlives ``timeout`` seconds.
    """
    try:
        pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"run_distributed needs a module-level (picklable) function, got {fn!r}: {e}") from e
    # The rendezvous port is picked free, then bound by rank 0 a moment later; another process on a
    # busy machine can take it in between. Only that failure is retried, on a new port.
    for attempt in range(_PORT_ATTEMPTS):
        try:
            return _run_world(fn, world_size, args, kwargs, timeout)
        except AssertionError as e:
            if "EADDRINUSE" not in str(e) or attempt == _PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


_PORT_ATTEMPTS = 3
# Imported once by the fork server, so that each rank starts from an already-imported, untouched
# interpreter instead of importing torch and Megatron-Core again (about 6 s of CPU per rank).
_PRELOAD = ["megatron_osp.training.loop"]


def _context():
    """Processes forked from a fork server (a fresh interpreter that has imported ``_PRELOAD`` and
    nothing else: no process group, no parallel state, no platform patch), or spawned where the
    platform has no fork server."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (first use)
    return ctx


def _run_world(fn, world_size, args, kwargs, timeout) -> list:
    name = getattr(fn, "__name__", repr(fn))
    ctx = _context()
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, results, fn, args, kwargs))
        for r in range(world_size)
    ]
    outputs: dict[int, object] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(outputs) < world_size and not failures:
            try:
                rank, ok, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                pending = [r for r in range(world_size) if r not in outputs]
                # A rank that died without reporting (segfault, os._exit, OOM kill) never will.
                dead = [r for r in pending if procs[r].exitcode not in (None, 0)]
                if dead:
                    codes = ", ".join(f"rank {r} exit code {procs[r].exitcode}" for r in dead)
                    failures.append(f"--- {codes}: died without reporting a result ---")
                elif time.monotonic() > deadline:
                    raise AssertionError(
                        f"run_distributed({name}): timed out after {timeout}s; ranks {pending} never "
                        f"finished (hung in a collective or too slow) and were killed"
                    ) from None
                continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                failures.append(f"--- rank {rank} raised ---\n{payload}")
        if failures:  # collect errors other ranks report right away; the rest are likely blocked
            time.sleep(_POLL_S)
            while True:
                try:
                    rank, ok, payload = results.get_nowait()
                except queue.Empty:
                    break
                if not ok:
                    failures.append(f"--- rank {rank} raised ---\n{payload}")
            reported = " ".join(failures)
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and f"rank {r} " not in reported:
                    failures.insert(0, f"--- rank {r} exit code {p.exitcode}: died without reporting a result ---")
    finally:
        _stop(procs, grace=5.0 if not failures and len(outputs) == world_size else 0.5)
        results.close()
    if failures:
        raise AssertionError(f"run_distributed({name}) failed:\n" + "\n".join(failures))
    return [outputs[r] for r in range(world_size)]
