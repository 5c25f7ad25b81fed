"""Checksum manifest of a checkpoint: written with every save, verified before anything is loaded.

``iter_N/checksums.json`` holds the size and CRC-32 of every file of the checkpoint (the
``.distcp`` shards, ``.metadata``, ``common.pt``, ``metadata.json``, ``run_config.yaml``,
``train_state.json``) and a SHA-256 of that list itself, so a damaged manifest is told apart from a
damaged data file. It is written inside ``iter_N.tmp/`` before the directory is renamed and
``latest`` moves, so a published checkpoint always has a complete manifest.

Who hashes what. Saving: every rank hashes the shards it wrote itself (``__<rank>_<n>.distcp``,
still in its page cache, and the work is spread over the ranks like the writing was); rank 0 hashes
the files only it writes and anything else it finds, gathers the rest and writes the manifest.
Loading: the files are split over the loading ranks by size, each hashes its share, and the
failures are gathered so that every rank raises the same CheckpointError before any weights are
read. CRC-32 (zlib's, as zip, gzip and PNG use) because the threat is accidental damage, not an
adversary: it catches every burst of up to 32 bits and any other damage but one time in 2^32, at
about twice the speed of SHA-256 (the fastest cryptographic hash in CPython's hashlib with the CPU's
SHA extensions) and three times that of blake2b; measured in docs/benchmarks.md. The manifest
names its algorithm, and any hashlib algorithm is accepted when reading.

Checkpoints without a manifest (written before checksums existed) are refused with the command that
writes one for a checkpoint the user trusts; a silent unverified load is what this module prevents.

    python -m megatron_osp.training.checkpoint_integrity verify CHECKPOINT
    python -m megatron_osp.training.checkpoint_integrity write CHECKPOINT   # vouch for its files as they are
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_osp.fileio import atomic_write_json

MANIFEST = "checksums.json"
MANIFEST_FORMAT = "megatron-osp/checksums"
MANIFEST_VERSION = 1
ALGORITHM = "crc32"
_BLOCK = 8 << 20  # bytes read per call: large blocks keep Python's per-call cost negligible
_MAX_THREADS = 4  # zlib and hashlib release the GIL on large buffers, so files hash in parallel
_WRITER_RE = re.compile(r"^__(\d+)_\d+\.distcp$")
_SHARD_SUFFIX = ".distcp"


class CheckpointError(RuntimeError):
    """A path that is not a (complete) checkpoint, or a checkpoint that cannot be loaded here."""


# ---------------------------------------------------------------------------------- hashing
def file_digest(path: str | os.PathLike, algorithm: str = ALGORITHM) -> str:
    """Hex digest of one file (``crc32`` or a hashlib algorithm), streamed in large blocks."""
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    h = None if algorithm == "crc32" else hashlib.new(algorithm)
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if h is None:
                crc = zlib.crc32(view[:n], crc)
            else:
                h.update(view[:n])
    return f"{crc:08x}" if h is None else h.hexdigest()


def _hash_files(directory: Path, names, algorithm: str = ALGORITHM) -> dict[str, dict]:
    """``{name: {"size": bytes, algorithm: hex}}`` for ``names`` inside ``directory``."""
    names = sorted(names)

    def one(name):
        path = directory / name
        size = path.stat().st_size
        return name, {"size": size, algorithm: file_digest(path, algorithm)}

    if len(names) <= 1:
        return dict(map(one, names))
    with ThreadPoolExecutor(max_workers=min(len(names), _MAX_THREADS, os.cpu_count() or 1)) as pool:
        return dict(pool.map(one, names))


def _listing_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _checkpoint_files(directory: Path) -> list[str]:
    """The files a save left in ``directory``: everything but the manifest and temporary files."""
    return sorted(
        p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    )


def _write_manifest(directory: Path, files: dict) -> None:
    atomic_write_json(
        directory / MANIFEST,
        {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "algorithm": ALGORITHM,
            "files": dict(sorted(files.items())),
            "files_sha256": _listing_digest(files),
        },
    )


# ---------------------------------------------------------------------------------- save side
def _writer_rank(name: str, world: int) -> int:
    """The rank that wrote ``name`` (torch_dist names shards ``__<rank>_<n>.distcp``); 0 otherwise."""
    m = _WRITER_RE.match(name)
    return int(m.group(1)) if m and int(m.group(1)) < world else 0


def own_shards(directory: str | os.PathLike, rank: int, world: int) -> dict[str, dict]:
    """Hash the shards ``rank`` wrote into ``directory`` (what it contributes to the manifest)."""
    directory = Path(directory)
    return _hash_files(directory, [n for n in _checkpoint_files(directory) if _WRITER_RE.match(n)
                                   and _writer_rank(n, world) == rank])


def write_manifest_collective(directory: str | os.PathLike, hashed: dict | str | None = None) -> None:
    """Hash a finished save in ``directory`` and write its manifest (collective: every rank calls it,
    after every rank's files are written). Each rank hashes its own shards (or passes them as
    ``hashed``, already hashed where they were written; a string: why that failed); rank 0 gathers
    them, hashes any file nobody claimed, and writes ``checksums.json``."""
    import torch.distributed as dist

    directory = Path(directory)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if hashed is None:
        try:
            hashed = own_shards(directory, rank, world)
        except OSError as e:  # gathered, then raised on every rank: no rank is left waiting in a collective
            hashed = f"rank {rank}: {e}"
    parts = [hashed]
    if distributed and world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, hashed)
    failed = [p for p in parts if isinstance(p, str)]
    if failed:
        raise CheckpointError(f"hashing the new checkpoint {directory} failed: " + "; ".join(failed))
    if rank != 0:
        return
    files: dict = {}
    for part in parts:
        files.update(part)
    files.update(_hash_files(directory, [n for n in _checkpoint_files(directory) if n not in files]))
    _write_manifest(directory, files)


def write_manifest(directory: str | os.PathLike) -> Path:
    """Hash every file of one checkpoint directory now and write its manifest (one process).
    For checkpoints saved before manifests existed, once their files are trusted."""
    directory = Path(directory)
    _write_manifest(directory, _hash_files(directory, _checkpoint_files(directory)))
    return directory / MANIFEST


# ---------------------------------------------------------------------------------- load side
def read_manifest(ckpt: Path) -> dict:
    """The manifest's ``files`` entry; CheckpointError naming the manifest if it is missing or damaged."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt} has no checksum manifest {MANIFEST}, so its files cannot be verified "
            "(it was saved by a megatron-osp version without checksums, or the file was lost). If you "
            "trust its files as they are, write one with: python -m "
            f"megatron_osp.training.checkpoint_integrity write {ckpt}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged checksum manifest (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise CheckpointError(
            f"{path}: manifest version {manifest['version']} is newer than this code's ({MANIFEST_VERSION})"
        )
    files, algorithm = manifest.get("files"), manifest.get("algorithm")
    if algorithm != "crc32" and algorithm not in hashlib.algorithms_available:
        raise CheckpointError(f"{path}: unknown checksum algorithm {algorithm!r}")
    valid = isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get(algorithm), str)
        for e in files.values()
    )
    if not valid or manifest.get("files_sha256") != _listing_digest(files):
        raise CheckpointError(f"{path}: damaged checksum manifest (its own checksum does not match)")
    return {"algorithm": algorithm, "files": files}


def _damaged(ckpt: Path, name: str, why: str) -> str:
    return f"{ckpt / name} {why}"


def _check_sizes(ckpt: Path, files: dict) -> list[str]:
    problems = []
    for name, entry in sorted(files.items()):
        path = ckpt / name
        kind = "shard file" if name.endswith(_SHARD_SUFFIX) else "file"
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"checkpoint {ckpt} is missing {kind} {path} (listed in {MANIFEST})")
            continue
        if size != entry["size"]:
            what = "is truncated" if size < entry["size"] else "has grown"
            if kind == "file":
                what = f"{what} (changed after the save)"
            problems.append(f"checkpoint {kind.split()[0]} {path} {what}: {size} bytes, {MANIFEST} recorded {entry['size']}")
    return problems


def _check_hashes(ckpt: Path, algorithm: str, files: dict, names) -> list[str]:
    try:
        found = _hash_files(ckpt, names, algorithm)
    except OSError as e:
        return [f"checkpoint {ckpt}: cannot read {e.filename}: {e.strerror}"]
    return [
        f"checkpoint file {ckpt / name} is damaged: its {algorithm} checksum does not match the one in {MANIFEST} "
        "(its bytes changed after the save)"
        for name in sorted(names) if found[name][algorithm] != files[name][algorithm]
    ]


def _raise(ckpt: Path, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}{more}. Nothing was loaded from {ckpt}.{_earlier_saves_hint(ckpt)}")


def _earlier_saves_hint(ckpt: Path) -> str:
    others = sorted(p.name for p in ckpt.parent.glob("iter_*") if p.is_dir() and p != ckpt and "." not in p.name)
    if not others:
        return ""
    return (
        f" Other saves in {ckpt.parent}: {', '.join(others)}; to resume from one, move {ckpt.name} aside "
        f"and write its name into {ckpt.parent / 'latest'} (or load it with train.load=...)."
    )


def verify_small_files(ckpt: Path, required=()) -> dict:
    """Cheap checks for every open of a checkpoint: the manifest is intact and lists ``required``,
    every file it lists has its recorded size, and every file except the ``.distcp`` shards has its
    recorded checksum. Returns the manifest's files."""
    manifest = read_manifest(ckpt)
    files = manifest["files"]
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise CheckpointError(f"{ckpt / MANIFEST} does not list {', '.join(unlisted)}: damaged or foreign manifest")
    small = [name for name in files if not name.endswith(_SHARD_SUFFIX)]
    _raise(ckpt, _check_sizes(ckpt, files) or _check_hashes(ckpt, manifest["algorithm"], files, small))
    return files


_INDEX_CACHE: dict = {}  # the last index parsed: {(file, inode, size, mtime): Metadata}


def read_index(path: Path):
    """The checkpoint's shard index .metadata, parsed (torch.distributed.checkpoint's Metadata).

    A resume reads it more than once (completeness, the muon_only check, the shape check), and a large
    run's index takes long to parse: the last one parsed is kept while its file is unchanged (same
    inode, size and modification time). Callers only read it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    index = Path(path) / ".metadata"
    try:
        st = index.stat()
        key = (str(index.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None  # the reader below names what is wrong
    if key is not None and key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a failure to parse the index is damage
        raise CheckpointError(f"checkpoint {path}: cannot read its shard index .metadata: {e}") from e
    if key is not None:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = metadata
    return metadata


def check_complete(path: Path, required) -> None:
    """The ``required`` files exist, the manifest's checks pass (``verify_small_files``: .metadata is
    intact before it is parsed), then every file the index names exists, is long enough and is in
    the manifest (a missing or truncated shard is named before dist_checkpointing fails in torch)."""
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    listed = verify_small_files(path, required)
    metadata = read_index(path)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"checkpoint {path} is missing shard file {shard}")
        if shard.stat().st_size < size:
            raise CheckpointError(
                f"checkpoint shard {shard} is truncated: {shard.stat().st_size} bytes, the index "
                f"needs {size}"
            )
        if name not in listed:
            raise CheckpointError(f"checkpoint shard {shard} is not listed in {path / MANIFEST}")


def _share(files: dict, rank: int, world: int) -> list[str]:
    """This rank's part of the files: largest first to the least loaded rank (the same on every rank)."""
    load = [0] * world
    owner = {}
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += files[name]["size"]
    return [name for name, r in owner.items() if r == rank]


def verify_checkpoint(ckpt: str | os.PathLike, *, collective: bool = False) -> None:
    """Every file of ``ckpt`` against its manifest (sizes and checksums). With ``collective`` (all
    ranks call it) the hashing is split over the ranks and every rank raises the same CheckpointError."""
    import torch.distributed as dist

    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    files, algorithm = manifest["files"], manifest["algorithm"]
    distributed = collective and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    problems = _check_sizes(ckpt, files)
    if not problems:
        problems = _check_hashes(ckpt, algorithm, files, _share(files, rank, world))
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = sorted(set(p for part in gathered for p in part))
    _raise(ckpt, problems)


def describe_load_failure(ckpt: Path, error: BaseException) -> str:
    """One message for a failure inside dist_checkpointing's load (a CheckpointException carries one
    traceback per failed rank): the checkpoint, the file involved where the failure names one."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        details = [f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _trace) in sorted(failures.items())]
        causes = [exc for exc, _trace in failures.values()]
    else:
        details, causes = [f"{type(error).__name__}: {error}"], [error]
    text = " ".join(details)
    named = sorted(set(re.findall(r"__\d+_\d+\.distcp", text)))
    if named:
        where = ", ".join(str(ckpt / n) for n in named)
    elif any("MetadataIndex" in repr(c) or "metadata" in str(c).lower() for c in causes):
        where = f"{ckpt / '.metadata'} (its shard index does not match the model or the shards)"
    else:
        where = f"{ckpt / '.metadata'} and the .distcp shards it indexes"
    return f"loading checkpoint {ckpt} failed reading {where}: {'; '.join(details)}"


# ---------------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m megatron_osp.training.checkpoint_integrity",
        description="verify: check a checkpoint's files against its checksum manifest. write: hash its "
        "files as they are now into a new manifest (for a checkpoint saved without one, or after a "
        "deliberate edit; it replaces an existing manifest and lists the files that changed).",
    )
    p.add_argument("action", choices=["verify", "write"])
    p.add_argument("checkpoint", help="checkpoint save directory (follows latest) or one iter_N directory")
    args = p.parse_args(argv)
    # Through the package, not this __main__ module: its CheckpointError is the one that is raised.
    from megatron_osp.training import checkpoint, checkpoint_integrity as mod

    try:
        if args.action == "verify":
            ckpt = checkpoint.resolve_checkpoint(args.checkpoint)
            mod.verify_checkpoint(ckpt)
            print(f"{ckpt}: every file matches its checksum in {MANIFEST}")
        else:
            ckpt = checkpoint.find_iteration_dir(args.checkpoint)
            try:
                old = mod.read_manifest(ckpt)["files"]
            except mod.CheckpointError:
                old = None
            path = mod.write_manifest(ckpt)
            if old is None:
                print(f"wrote {path}")
            else:
                new = mod.read_manifest(ckpt)["files"]
                changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
                print(f"replaced {path}; files that differ from the old manifest: {', '.join(changed) or 'none'}")
            checkpoint.resolve_checkpoint(ckpt)  # the other completeness checks
    except mod.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
