"""Replacing a dataset's .bin/.idx pair never leaves the new .bin beside the old .idx.

A merge without a manifest (data/merge.py ``_write_plain``) renamed the new .bin over the old one and then
the new .idx over the old one; killed between the two, the new .bin sat beside the old .idx. Two merges of
the same inputs in another order have .bin files of one size, so both our reader and Megatron-Core's read
that pair without complaint and return wrong tokens. Now (shardset.replace_dataset) the old files go aside
first, the new .bin goes in, the new .idx last: killed at any point, what is there is the earlier pair whole,
the new one, or a dataset without its .idx (refused by name); an error puts the earlier pair back; the next
run removes what a killed one left and writes the output."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_osp.data.merge import merge_datasets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def inputs(tmp_path):
    """Two plain datasets of one token count, but different document lengths: merged as (x, y) and as
    (y, x), the .bin files have one size and the indices differ."""
    d = tmp_path / "in"
    docs = {"x": [np.arange(1, 4), np.arange(10, 15)], "y": [np.arange(20, 24), np.arange(30, 34)]}
    for name, ds in docs.items():
        with IndexedDatasetWriter(d / name, np.uint16) as w:
            for doc in ds:
                w.add_document(doc)
    return str(d / "x"), str(d / "y")


def _contents(prefix, reader=IndexedDataset):
    ds = reader(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _pair(prefix):
    return tuple(Path(prefix + ext).read_bytes() for ext in (".bin", ".idx"))


# Killed just before the at-th rename or unlink that names m.bin/m.idx or their aside files (m.idx.old-<host>-<pid>):
# in replace_dataset, 0 old .idx aside, 1 old .bin aside, 2 new .bin in, 3 new .idx in, 4 and 5 the aside
# files removed. Prints its pid, then the tag of its temporary and aside files' names ("-<host>-<pid>").
KILLER = textwrap.dedent("""
    import os, signal, sys
    from megatron_osp.data.merge import merge_datasets
    out, at = sys.argv[1], int(sys.argv[2])
    from megatron_osp.data.run_owner import tag
    names, calls = {out + ext + tail for ext in (".bin", ".idx") for tail in ("", f".old{tag()}")}, []
    def wrap(real):
        def op(*paths, **kw):
            if names & {os.fspath(p) for p in paths[:2] if isinstance(p, (str, os.PathLike))}:
                calls.append(paths)
                if len(calls) > at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*paths, **kw)
        return op
    os.replace, os.rename, os.unlink = wrap(os.replace), wrap(os.rename), wrap(os.unlink)
    print(os.getpid(), tag(), flush=True)
    merge_datasets(sys.argv[3:], out)
""")


@pytest.mark.parametrize("at", [0, 1, 2, 3])
def test_a_merge_killed_while_replacing_never_leaves_a_mismatched_pair(inputs, tmp_path, at):
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x, y], m)
    old, old_tokens = _pair(m), _contents(m)
    new_tokens = _contents(y) + _contents(x)
    r = subprocess.run([sys.executable, "-c", KILLER, m, str(at), y, x], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, -signal.SIGKILL), r.stderr
    if os.path.exists(m + ".bin") and os.path.exists(m + ".idx"):
        assert _pair(m) == old or _contents(m) == new_tokens, f"killed at {at}: a mismatched pair"
        expected = old_tokens if _pair(m) == old else new_tokens
        assert _contents(m) == expected and _contents(m, MegatronIndexedDataset) == expected
    else:
        with pytest.raises(FileNotFoundError, match=r"m\.(bin|idx) does not exist"):
            IndexedDataset(m)
    merge_datasets([y, x], m)  # the next run removes what the killed one left and writes the output
    assert _contents(m) == new_tokens and _contents(m, MegatronIndexedDataset) == new_tokens
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", "m.idx"]


def test_a_lone_bin_says_its_write_was_cut_short(inputs, tmp_path):
    x, _ = inputs
    m = str(tmp_path / "m")
    merge_datasets([x], m)
    os.unlink(m + ".idx")
    with pytest.raises(FileNotFoundError, match=r"m\.idx does not exist, but .*m\.bin does: .*cut short"):
        IndexedDataset(m)


@pytest.mark.parametrize("failing", [".bin", ".idx"])
def test_an_error_while_replacing_keeps_the_earlier_pair(inputs, tmp_path, monkeypatch, failing):
    """Renaming the new .bin or .idx in fails (an I/O error): the earlier pair is put back, whole."""
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x, y], m)
    old, old_tokens = _pair(m), _contents(m)
    replace = os.replace

    def fail(src, dst, *a, **kw):
        if os.fspath(dst) == m + failing and ".tmp" in os.fspath(src):
            raise OSError(5, "Input/output error")
        return replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="Input/output error"):
        merge_datasets([y, x], m)
    monkeypatch.undo()
    assert _pair(m) == old and _contents(m) == old_tokens and _contents(m, MegatronIndexedDataset) == old_tokens
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", "m.idx"]


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools/merge_datasets.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_input_dir_refuses_a_lone_bin_but_replaces_the_outputs(inputs, tmp_path):
    """A .bin without its .idx in --input-dir was left out of the merge without a word; now it is refused
    by name, unless it is the output prefix's (a merge into the directory cut short), which is replaced."""
    d = Path(inputs[0]).parent
    expected = _contents(inputs[0]) + _contents(inputs[1])
    (d / "z.bin").write_bytes(b"\x01\x00")
    r = _cli("--input-dir", d, "--output-prefix", tmp_path / "m")
    assert r.returncode == 1 and f"{d / 'z.bin'}: has no .idx beside it" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["in"]
    os.rename(d / "z.bin", d / "all.bin")  # the output's own, left by a merge killed while replacing
    r = _cli("--input-dir", d, "--output-prefix", d / "all")
    assert r.returncode == 0, r.stderr
    assert f"replaced {d / 'all'}.bin, left without its .idx by a write that was cut short" in r.stdout
    assert _contents(str(d / "all")) == expected
