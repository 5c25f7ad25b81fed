"""Temporary and aside files carry the host of the run that wrote them; only this host's dead runs' are cleaned.

On a filesystem shared by several nodes, the writer's ``PREFIX.bin.tmp<pid>`` and a replace's
``PREFIX.idx.old<pid>`` named a pid that means nothing on another node: a merge or preprocessing run there
found the pid "dead" and deleted a running writer's files, or renamed a replace's aside pair back while
that replace was moving its new pair in (a new .idx beside the earlier .bin). Now the names carry
``-<host>-<pid>`` (data/run_owner.py); a run on another host's files is left and named in a note; names of
the earlier form (``.tmp<pid>``) are still taken as this host's."""

import os
import subprocess
import sys

import pytest
from test_merge_replace import KILLER, _contents, _pair, inputs  # noqa: F401 (inputs: the fixture)

from megatron_osp.data import run_owner, shardset
from megatron_osp.data.indexed import IndexedDatasetWriter
from megatron_osp.data.merge import merge_datasets


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _on_host(name, script):
    """``script`` as a process whose host name is ``name``."""
    return f"import socket\nsocket.gethostname = lambda: {name!r}\n" + script


def test_names_carry_host_and_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(run_owner.socket, "gethostname", lambda: "gpu-node-07.cluster")
    assert run_owner.host() == "gpu_node_07.cluster" and run_owner.tag() == f"-gpu_node_07.cluster-{os.getpid()}"
    w = IndexedDatasetWriter(tmp_path / "d")
    try:
        assert sorted(os.listdir(tmp_path)) == [f"d.bin.tmp-gpu_node_07.cluster-{os.getpid()}"]
    finally:
        w.abort()
    long = "compute-node-0042.rack17.datacenter-west.example-hpc-cluster.org"
    monkeypatch.setattr(run_owner.socket, "gethostname", lambda: long)
    short = run_owner.host()
    assert len(short) == 40 and short.startswith("compute_node_0042.rack17.datace") and "-" not in short
    monkeypatch.setattr(run_owner.socket, "gethostname", lambda: long.replace(".org", ".net"))
    assert run_owner.host() != short  # the digest tells nodes whose names differ past the kept part
    pattern = shardset._WRITER_TMP
    for name, host, pid in ((f"a_1.bin.tmp-n.x_y-{12}", "n.x_y", "12"), ("a_1.idx.old345", None, "345")):
        m = pattern.match(name)
        assert m and m.group("name") == "a_1" and m.group("host") == host and m.group("pid") == pid, name


def test_another_hosts_temporaries_are_left_and_named(tmp_path):
    dead = _dead_pid()
    here = run_owner.host()
    mine = [f"m.bin.tmp-{here}-{dead}", f"m_00001.idx.tmp{dead}"]  # this host's, new and earlier form
    theirs = [f"m.bin.tmp-elsewhere-{dead}", f"m_00001.idx.tmp-elsewhere-{os.getpid()}"]
    for name in mine + theirs:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "m.bin").write_bytes(b"")
    (tmp_path / "m.idx").write_bytes(b"")
    notes = shardset.clean_stale_temporaries(tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == sorted(["m.bin", "m.idx"] + theirs)
    for name in theirs:
        assert f"left {tmp_path / name}: a run on host elsewhere (remove it if that run is over)" in notes, notes
    assert f"removed {tmp_path / mine[0]}, left by a run that did not finish (pid {dead})" in notes, notes


def test_remove_stale_temporaries_keeps_another_hosts_files(tmp_path):
    """The tokenizer trainer's and builtin_corpus's cleaner (no notes: it only removes)."""
    dead = _dead_pid()
    here = run_owner.host()
    gone = [f"tok.tmp-{here}-{dead}.model", f"tok.tmp{dead}.vocab"]
    kept = [f"tok.tmp-elsewhere-{dead}.model", f"tok.tmp-{here}-{os.getpid()}.model", f"tok2.tmp-{here}-{dead}.model"]
    for name in gone + kept:
        (tmp_path / name).write_bytes(b"x")
    shardset.remove_stale_temporaries(tmp_path, "tok", r"\.(model|vocab)")
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_a_replace_cut_short_on_another_host_is_not_undone_here(inputs, tmp_path):
    """A merge on host nodeB killed with the old pair aside and its new .bin in: a merge here (another host,
    refused on purpose after its cleaning) neither restores nor removes nodeB's files, and its notes say
    whose they are. A merge on nodeB, where that pid is gone, then puts the earlier pair back."""
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x, y], m)
    old, old_tokens = _pair(m), _contents(m)
    r = subprocess.run([sys.executable, "-c", _on_host("nodeB", KILLER), m, "3", y, x], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    pid, tag = r.stdout.split()[:2]
    assert tag == f"-nodeB-{pid}"
    aside = [f"m.bin.old{tag}", f"m.idx.old{tag}"]
    assert set(aside) <= set(os.listdir(tmp_path)) and not os.path.exists(m + ".idx")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="outside the vocabulary") as refused:
        merge_datasets([y, x], m, vocab_size=10)
    assert sorted(os.listdir(tmp_path)) == before, "a run of another host's files were touched"
    notes = refused.value.cleanup_notes
    assert any(n.startswith(f"left {m}.idx.old{tag}, {m}.bin.old{tag}: set aside by a run of pid {pid} on host nodeB")
               for n in notes), notes
    # on nodeB, that pid is dead: its next merge puts the earlier pair back, then is refused as asked
    script = _on_host("nodeB", "import sys\nfrom megatron_osp.data.merge import merge_datasets\n"
                               "try:\n    merge_datasets(sys.argv[2:], sys.argv[1], vocab_size=10)\n"
                               "except ValueError as e:\n    print(*e.cleanup_notes, sep='\\n')\n")
    r = subprocess.run([sys.executable, "-c", script, m, y, x], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"restored {m}.bin/.idx from {m}.idx.old{tag}" in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", "m.idx"]
    assert _pair(m) == old and _contents(m) == old_tokens
