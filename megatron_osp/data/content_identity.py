"""Whether two indexed datasets (``PREFIX.bin``/``PREFIX.idx``) in different files hold the same
documents: a byte copy under another name (``cp a.bin held.bin; cp a.idx held.idx``), which file
identity (device and inode) does not see.

Cheap by construction: datasets whose ``.bin`` sizes differ (the normal case) cost one ``stat`` each
and are never opened. Only for equal ``.bin`` and ``.idx`` sizes are bytes read: the first and last
MiB of each ``.bin``, then both ``.idx`` files compared in 1 MiB blocks, stopping at the first block
that differs (an ``.idx`` holds every document's length and byte offset, so equal ``.idx`` bytes and
``.bin`` size mean the same documents of the same lengths; the ``.bin`` edges tell apart datasets of
identical layout and other tokens). The middle of the ``.bin`` is not read: a dataset that differs
only there (same layout, same first and last MiB) counts as the same content."""

from __future__ import annotations

import hashlib
import os

_EDGE = 1 << 20  # bytes read at each end of a .bin
_BLOCK = 1 << 20  # bytes per .idx comparison read


def _sizes(prefix: str) -> tuple[int, int]:
    return os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx")


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _bin_edges(prefix: str, size: int) -> bytes:
    """The sha256 of the first and last ``_EDGE`` bytes of ``prefix``.bin (all of it when smaller)."""
    h = hashlib.sha256()
    with open(prefix + ".bin", "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(size - _EDGE, _EDGE))
            h.update(f.read(_EDGE))
    return h.digest()


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(_BLOCK)
            if block != fb.read(_BLOCK):
                return False
            if not block:
                return True


def same_content(a: str, b: str) -> bool:
    """Whether datasets ``a`` and ``b`` (prefixes; their files exist) hold the same content: equal
    ``.bin`` sizes, equal ``.idx`` bytes, equal first and last MiB of ``.bin``. The same files (any
    link to them) count too."""
    if _file_id(a + ".bin") == _file_id(b + ".bin"):
        return True
    size = _sizes(a)
    if size != _sizes(b):
        return False
    return _bin_edges(a, size[0]) == _bin_edges(b, size[0]) and _same_bytes(a + ".idx", b + ".idx")


def copies_of(prefixes: list[str], others: list[str]) -> dict[str, str]:
    """Each dataset of ``prefixes`` that holds the same content as one of ``others`` in other files
    (not the same ``.bin`` under another link: file identity says that already), with the first such
    one. Datasets whose ``.bin`` sizes differ are only stat'ed."""
    by_size: dict[int, list[str]] = {}
    for o in others:
        by_size.setdefault(os.path.getsize(o + ".bin"), []).append(o)
    found = {}
    for p in prefixes:
        for o in by_size.get(os.path.getsize(p + ".bin"), []):
            if _file_id(p + ".bin") != _file_id(o + ".bin") and same_content(p, o):
                found[p] = o
                break
    return found
