"""On-disk cache of built data indices, keyed by everything that changes them.

Megatron-Core keys its cache by the dataset path and config only, so a ``.bin/.idx`` pair rewritten
in place (re-tokenised, or a different corpus under the same prefix) silently reuses indices built
for the old file. Here the key also holds each data file's size and modification time
(``file_fingerprint``), so a rewritten file gives a new key and its stale entry is never read.

An entry is one file ``<cache_dir>/<name>-<sha256 of key>``: a magic, the length of a JSON header
(its key, and each array's name, dtype, shape and offset), the header, then each array's bytes at a
64-byte-aligned offset. Loading reads the header and memory-maps the file once for all its arrays. (An
entry was a directory of ``key.json`` and one ``.npy`` per array: 14 opens, a mkdir and a parse of each
``.npy`` header per dataset and split: on 2000 tiny shards, 2.9-9.0 ms per shard and split at first
use and 1.6-2.3 ms cached, now 1.05-1.25 and 0.27-0.52 ms; tools/bench_index_cache.py.) It is written to a temporary file and renamed into place
(atomic: a reader sees a whole entry or none; of two concurrent builders, which write the same
bytes, the first's file stays: ``_publish``). Under torch.distributed, local rank 0 of each node
builds while the other ranks wait on a barrier and then load (memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

_FORMAT = 2  # bump when the layout of an entry changes (2: one file per entry)
_MAGIC = b"OSPIDXC2"
_ALIGN = 64


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
    """The entry's arrays (read-only, memory-mapped), or None if absent; an entry for another key, or
    damaged (shorter than its header says), is an error naming the file."""
    try:
        f = open(entry, "rb")
    except FileNotFoundError:
        return None
    with f:
        head = f.read(16)
        size = int.from_bytes(head[8:], "little") if len(head) == 16 and head[:8] == _MAGIC else -1
        header = f.read(size) if size > 0 else b""
        try:
            stored = json.loads(header) if len(header) == size else None
        except ValueError:
            stored = None
        if not isinstance(stored, dict) or not isinstance(stored.get("arrays"), list):
            raise ValueError(f"{entry}: not an index cache entry of format {_FORMAT} (damaged?); remove it")
        if _canonical(stored.get("key", {})) != _canonical(key):
            raise ValueError(f"{entry}: cache entry was built for another key (hash collision or edited file)")
        length = os.fstat(f.fileno()).st_size
        out = {}
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # one map, kept open by the arrays on it
        for a in stored["arrays"]:
            dtype, shape = np.dtype(a["dtype"]), tuple(a["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if a["offset"] + count * dtype.itemsize > length:
                raise ValueError(f"{entry}: shorter than its header says ({length} bytes; array {a['name']!r} "
                                 "ends past it): damaged; remove it")
            out[a["name"]] = np.frombuffer(mm, dtype, count, a["offset"]).reshape(shape)
        return out


def _publish(tmp: str, entry: Path) -> None:
    """Put the written file ``tmp`` in place as ``entry``, atomically, unless an entry is there already:
    a concurrent builder (another node) published the same bytes, and its ranks may have the file
    memory-mapped, which replacing it would leave stale on a network file system (NFS: ESTALE, SIGBUS).
    Without hard links (some file systems), a replace: the last builder wins."""
    try:
        os.link(tmp, entry)  # fails if the entry exists: the first builder's file stays
    except FileExistsError:
        pass
    except OSError:
        os.replace(tmp, entry)


def _save(entry: Path, key: dict, arrays: dict[str, np.ndarray]) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    arrays = {n: np.ascontiguousarray(a) for n, a in arrays.items()}
    layout, offset = [], 0
    for n, a in arrays.items():
        layout.append({"name": n, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += -(-a.nbytes // _ALIGN) * _ALIGN

    def header_of(base: int) -> bytes:  # the arrays start at ``base``, past the magic, length and header
        return json.dumps({"key": json.loads(_canonical(key)),
                           "arrays": [{**a, "offset": a["offset"] + base} for a in layout]}, sort_keys=True).encode()

    base = -(-(16 + len(header_of(0)) + 64) // _ALIGN) * _ALIGN  # room for the offsets' longer digits
    header = header_of(base)
    assert 16 + len(header) <= base
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            for a, spec in zip(arrays.values(), layout):
                f.seek(spec["offset"] + base)
                f.write(a.reshape(-1).view(np.uint8))
            f.truncate(base + offset)
        _publish(tmp, entry)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
