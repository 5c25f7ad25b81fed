"""Replacing a dataset's .bin/.idx pair in place, and putting back a pair a killed replace set aside.

``replace_dataset`` renames the old pair aside (``PREFIX.idx.old-<host>-<pid>``, then the .bin likewise),
the new .bin in and the new .idx last, then removes the aside files. Killed after the old .idx went aside
and before the new one is in, it leaves PREFIX without its .idx and the earlier dataset only under the
aside names. ``restore_aside`` (run by ``shardset.clean_stale_temporaries``, so by the next preprocessing
run or merge on the prefix, before it writes) renames that earlier pair back; aside files beside a
complete pair are stale and removed by the cleaner as before. Only a dead run of this host counts
(data/run_owner.py): another host's aside files are named, not touched.
"""

from __future__ import annotations

import os
import re
import struct

import numpy as np

from megatron_osp.data.run_owner import DEAD, ELSEWHERE, LIVE, TAG, owner, owner_state, pid_alive, tag  # noqa: F401
from megatron_osp.fileio import fsync_dir

ASIDE = re.compile(rf"^(?P<name>.+)\.(?P<ext>bin|idx)\.old(?P<tag>{TAG})$")


def replace_dataset(bin_src: str, idx_src: str, prefix: str) -> None:
    """Rename a finished dataset's files to ``prefix``.bin/.idx, replacing a dataset there, so that no
    moment pairs the new .bin with the old .idx (which Megatron-Core, and our reader when the sizes agree,
    read without complaint: two merges of the same inputs in another order). The old pair is renamed
    aside (``.idx.old-<host>-<pid>`` first, then the .bin), the new .bin goes in, the new .idx last.
    Killed at any point, what is there is the old pair, the new one, or no .idx (refused by name, the
    message naming the aside files); the next run on the prefix puts an old pair without its .idx back
    (``restore_aside``) and removes aside files beside a complete pair. On an error the old pair is put
    back. Every dataset this code writes comes into place here (the writer, publishing)."""
    d = os.path.dirname(os.path.abspath(prefix))
    for src in (bin_src, idx_src):  # the data is on disk before a name points at it (a machine crash)
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    aside = []  # (final, aside) of the old files moved, .idx first
    moved = False
    try:
        for ext in (".idx", ".bin"):
            final, old = prefix + ext, f"{prefix}{ext}.old{tag()}"
            if os.path.lexists(final):
                os.replace(final, old)
                aside.append((final, old))
        if aside:
            fsync_dir(d)  # the old .idx is gone before the new .bin is in, on disk too
        os.replace(bin_src, prefix + ".bin")
        moved = True
        os.replace(idx_src, prefix + ".idx")
    except BaseException:
        if moved:  # the new .bin without its .idx
            _unlink_quietly(prefix + ".bin")
        for final, old in reversed(aside):  # .bin back first, the .idx last
            try:
                os.replace(old, final)
            except OSError:
                pass
        raise
    for _, old in aside:
        _unlink_quietly(old)
    fsync_dir(d)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _set_aside(prefix: str) -> dict[str, tuple[re.Match, set[str]]]:
    """Tag ("-<host>-<pid>", or "<pid>" in the earlier form) -> (a match of one of its names, the extensions
    (".bin", ".idx") that run set aside under exactly ``prefix``)."""
    d, base = os.path.dirname(prefix) or ".", os.path.basename(prefix)
    found: dict[str, tuple[re.Match, set[str]]] = {}
    if base and os.path.isdir(d):
        for name in os.listdir(d):
            m = ASIDE.match(name)
            if m and m.group("name") == base:
                found.setdefault(m.group("tag"), (m, set()))[1].add("." + m.group("ext"))
    return dict(sorted(found.items(), key=lambda kv: (kv[1][0].group("host") or "", int(kv[1][0].group("pid")))))


def _files(prefix: str, found: dict) -> list[str]:
    return [f"{prefix}{ext}.old{t}" for t, (_, exts) in found.items() for ext in (".idx", ".bin") if ext in exts]


def aside_hint(prefix: str | os.PathLike) -> str:
    """For a message refusing ``prefix`` for a missing file: where a replace cut short set its earlier
    .idx aside, and how it comes back; "" if none is there."""
    prefix = str(prefix)
    files = _files(prefix, _set_aside(prefix))
    if not any(".idx.old" in f for f in files):
        return ""
    return (f"; the earlier dataset was set aside as {' and '.join(files)} by a replace that did not finish: the "
            f"next preprocessing or merge run writing {prefix} on the host named in it puts it back (or rename the "
            f".idx.old... file to {os.path.basename(prefix)}.idx, and the .bin.old... file of the same run to .bin, "
            "by hand)")


def _pair_agrees(idx_path: str, bin_path: str) -> bool:
    """Whether the index is whole and accounts for exactly the .bin's bytes (as the reader checks)."""
    from megatron_osp.data.indexed import _HEADER, DTYPE_CODES, MAGIC  # indexed imports this module

    try:
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            magic, _, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
            if magic != MAGIC or code not in DTYPE_CODES or size != _HEADER.size + n_seq * 12 + n_doc * 8:
                return False
            lengths = np.fromfile(f, dtype="<i4", count=n_seq)
        need = int(lengths.sum(dtype=np.int64)) * np.dtype(DTYPE_CODES[code]).itemsize
        return need == os.path.getsize(bin_path)
    except (OSError, ValueError, struct.error):
        return False


def restore_aside(prefix: str | os.PathLike) -> list[str]:
    """Put back the earlier pair of ``prefix`` that a ``replace_dataset`` killed midway set aside, when
    ``prefix`` has no .idx; returns one note per action or refusal.

    Only files named exactly ``prefix``.{idx,bin}.old... count (not those of ``prefix``_1 ...). The
    .idx.old... goes back as ``prefix``.idx, after the .bin.old... of the same run (replacing a new .bin
    that went in without its .idx) where there is one; without one, the kill came before the .bin went
    aside, so ``prefix``.bin is still the earlier one. Left as they are, with a note: aside files of a run
    on another host (whether it still runs is not known here); aside files while a process that set some
    aside still runs (it is replacing the dataset now); aside files of several dead runs (which .bin belongs
    to which .idx is not known: the note says how to rename them back by hand); an .idx.old... that does
    not account for the .bin it would be paired with. With a .idx in place nothing is done here: the aside
    files are stale and ``shardset.clean_stale_temporaries`` removes them (this host's dead runs' only).
    """
    prefix = str(prefix)
    found = _set_aside(prefix)
    if not found or os.path.lexists(prefix + ".idx"):
        return []
    files = _files(prefix, found)
    states = {t: owner_state(m) for t, (m, _) in found.items()}
    elsewhere = [owner(found[t][0]) for t in found if states[t] == ELSEWHERE]
    if elsewhere:
        return [f"left {', '.join(files)}: set aside by a run of {elsewhere[0]} replacing {prefix} (whether it still "
                "runs is not known here): a preprocessing or merge run on that host puts the earlier pair back, or "
                "rename it by hand once that run is over"]
    live = [found[t][0].group("pid") for t in found if states[t] == LIVE]
    if live:
        return [f"left {', '.join(files)}: process {live[0]} is replacing {prefix} now"]
    if len(found) > 1:
        return [f"left {', '.join(files)}: {prefix} has no .idx and runs that did not finish (pids "
                f"{', '.join(found[t][0].group('pid') for t in found)}) set these aside; which .bin belongs "
                f"to which .idx is not known, so none is put back: rename the right pair to {prefix}.idx and .bin by "
                "hand (or remove them)"]
    (t, (m, exts)), = found.items()
    pid = m.group("pid")
    if ".idx" not in exts:  # the earlier dataset had no .idx either: nothing readable to put back
        return [f"left {', '.join(files)}: a .bin without its .idx, set aside by a run that did not finish (pid {pid}); "
                "remove it if it is not needed"]
    idx_old, bin_old = f"{prefix}.idx.old{t}", f"{prefix}.bin.old{t}"
    bin_src = bin_old if ".bin" in exts else prefix + ".bin"
    if not _pair_agrees(idx_old, bin_src):
        return [f"left {', '.join(files)}: set aside by a run that did not finish (pid {pid}), but {idx_old} does not "
                f"account for {bin_src} (not a pair); rename them back by hand if they are the dataset you want"]
    try:
        if bin_src == bin_old:
            os.replace(bin_old, prefix + ".bin")  # the .bin first: the .idx coming back marks the pair whole
        os.replace(idx_old, prefix + ".idx")
    except OSError as e:  # another run restoring at the same moment, a read-only directory
        return [f"could not put back {', '.join(files)} as {prefix}.bin/.idx: {e}"]
    fsync_dir(os.path.dirname(prefix) or ".")
    what = f"{prefix}.bin/.idx from {idx_old} and {bin_old}" if bin_src == bin_old else \
        f"{prefix}.idx from {idx_old} (beside its .bin, which was still in place)"
    return [f"restored {what}, left by a run that did not finish (pid {pid})"]
