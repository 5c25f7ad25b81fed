"""On-disk cache of built data indices, keyed by everything that changes them.

Megatron-Core keys its cache by the dataset path and config only, so a ``.bin/.idx`` pair rewritten
in place (re-tokenised, or a different corpus under the same prefix) silently reuses indices built
for the old file. Here the key also holds each data file's size and modification time
(``file_fingerprint``), so a rewritten file gives a new key and its stale entry is never read.

An entry is a directory ``<cache_dir>/<name>-<sha256 of key>/`` with ``key.json`` and one ``.npy``
per array. It is built in a temporary directory and renamed into place (atomic: a reader sees a
whole entry or none; of two concurrent builders one wins). Under torch.distributed, local rank 0
of each node builds while the other ranks wait on a barrier and then load (memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

_FORMAT = 1  # bump when the layout of an entry changes


def file_fingerprint(path: str | os.PathLike) -> dict:
    """What identifies one version of a file: its real path, size and modification time (ns)."""
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def key_digest(key: dict) -> str:
    return hashlib.sha256(_canonical(key).encode("utf-8")).hexdigest()


def _canonical(key: dict) -> str:
    return json.dumps({"format": _FORMAT, **key}, sort_keys=True, separators=(",", ":"))


def entry_path(cache_dir: str | os.PathLike, name: str, key: dict) -> Path:
    return Path(cache_dir) / f"{name}-{key_digest(key)[:32]}"


def _is_local_builder() -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    local = os.environ.get("LOCAL_RANK")
    return (int(local) if local is not None else dist.get_rank()) == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _load(entry: Path, key: dict) -> dict[str, np.ndarray] | None:
    """The entry's arrays (memory-mapped), or None if absent; an entry for another key is an error."""
    key_file = entry / "key.json"
    if not key_file.is_file():
        return None
    stored = json.loads(key_file.read_text(encoding="utf-8"))
    names = stored.pop("_arrays", [])
    if _canonical(stored) != _canonical(key):
        raise ValueError(f"{key_file}: cache entry was built for another key (hash collision or edited file)")
    return {n: np.load(entry / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in names}


def _save(entry: Path, key: dict, arrays: dict[str, np.ndarray]) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        for n, a in arrays.items():
            np.save(tmp / f"{n}.npy", a, allow_pickle=False)
        stored = json.loads(_canonical(key))
        stored["_arrays"] = list(arrays)
        (tmp / "key.json").write_text(json.dumps(stored, sort_keys=True, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, entry)  # atomic; fails if another builder got there first
        except OSError:
            if not (entry / "key.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached_arrays(
    cache_dir: str | os.PathLike | None,
    name: str,
    key: dict,
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """``build()``'s arrays for ``key``: loaded from the cache, or built (once per node) and saved.

    Every rank must call this with the same key in the same order (it holds a barrier). With
    ``cache_dir=None`` each rank builds in memory.
    """
    if cache_dir is None:
        return build()
    key = {k: v for k, v in key.items() if k != "_arrays"}
    entry = entry_path(cache_dir, name, key)
    failure = None
    if _is_local_builder():
        try:
            if _load(entry, key) is None:
                _save(entry, key, build())
        except BaseException as e:  # still reach the barrier so other ranks do not hang
            failure = e
    _barrier()
    if failure is not None:
        raise failure
    arrays = _load(entry, key)
    if arrays is None:
        raise FileNotFoundError(
            f"{entry}: index cache entry missing after the building rank finished; is {cache_dir} "
            "on a file system all ranks of this node share, and did local rank 0 fail?"
        )
    return arrays
