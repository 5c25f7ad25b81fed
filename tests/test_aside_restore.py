"""A replace killed after the old .idx went aside: the next run puts the earlier pair back, never deletes it.

``replace_dataset`` moves the old pair aside (``m.idx.old-<host>-<pid>``, then the .bin), the new .bin
in, the new .idx last, then removes the aside files. Killed before the new .idx was in, ``m`` had no .idx
and the earlier dataset lived only in the aside files, which the next merge or preprocessing run on ``m``
deleted as a dead run's temporaries, before writing anything: if that run failed too, the earlier result
was gone. Now (replace.restore_aside, called by shardset.clean_stale_temporaries) they are renamed back
first, so a run that then fails leaves the earlier pair whole; beside a complete new pair they are
removed as before. A live run's aside files, and other prefixes', are left alone; the reader's refusal
names the aside files."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
from test_merge_replace import KILLER, _contents, _pair, inputs  # noqa: F401 (inputs: the fixture)

from megatron_osp.data import shardset
from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.merge import merge_datasets
from megatron_osp.training.data_checks import _missing

REPO = Path(__file__).resolve().parents[1]


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _killed_merge(out, at, *inputs):
    """test_merge_replace's KILLER: killed before the at-th operation on m's names; returns its pid and the
    tag its temporary and aside files carry."""
    r = subprocess.run([sys.executable, "-c", KILLER, out, str(at), *inputs], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    pid, tag = r.stdout.split()[:2]
    assert tag.endswith(f"-{pid}"), tag
    return int(pid), tag


AFTER = {1: "the old .idx went aside", 2: "the old .bin went aside", 3: "the new .bin went in",
         4: "the new .idx went in", 5: "one aside file was removed"}


@pytest.mark.parametrize("at", sorted(AFTER))
def test_the_next_merge_puts_the_earlier_pair_back_before_it_fails(inputs, tmp_path, at):
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x, y], m)
    old, old_tokens = _pair(m), _contents(m)
    new_tokens = _contents(y) + _contents(x)
    pid, t = _killed_merge(m, at, y, x)
    cut_short = at <= 3  # killed before the new .idx was in: m has no .idx
    assert os.path.exists(m + ".idx") != cut_short, AFTER[at]
    if cut_short:  # the refusal names where the earlier dataset is, and how it comes back
        with pytest.raises(FileNotFoundError, match=rf"m\.(bin|idx) does not exist.*m\.idx\.old{re.escape(t)}.*puts it back"):
            IndexedDataset(m)
        assert any(f"m.idx.old{t}" in p for p in _missing([m], "data.paths"))
    # the next merge is refused (an id outside the vocabulary) after it has cleaned up the prefix
    with pytest.raises(ValueError, match="outside the vocabulary") as refused:
        merge_datasets([y, x], m, vocab_size=10)
    restored = [n for n in refused.value.cleanup_notes if n.startswith("restored")]  # said with the refusal
    assert len(restored) == cut_short, refused.value.cleanup_notes
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", "m.idx"], AFTER[at]
    expected = old_tokens if cut_short else new_tokens
    if cut_short:
        assert _pair(m) == old, f"killed after {AFTER[at]}: the earlier pair is not back byte for byte"
    assert _contents(m) == expected and _contents(m, MegatronIndexedDataset) == expected


def test_a_refused_merge_tool_says_what_it_restored(inputs, tmp_path):
    """tools/merge_datasets.py said only "no output was written": the earlier pair it had put back
    went unmentioned."""
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x, y], m)
    pid, t = _killed_merge(m, 2, y, x)  # both old files aside, m has neither .bin nor .idx
    r = subprocess.run([sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input", y, str(tmp_path / "no"),
                        "--output-prefix", m], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no output was written" in r.stderr, r.stderr
    assert f"restored {m}.bin/.idx from {m}.idx.old{t} and {m}.bin.old{t}" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", "m.idx"]


def test_a_successful_merge_after_the_kill_says_what_it_restored(inputs, tmp_path):
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x, y], m)
    pid, t = _killed_merge(m, 3, y, x)  # the new .bin is in, beside both aside files
    info = merge_datasets([x, y], m)
    assert any(n.startswith(f"restored {m}.bin/.idx from {m}.idx.old{t} and {m}.bin.old{t}") and
               f"did not finish (pid {pid})" in n for n in info["notes"]), info["notes"]
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", "m.idx"]
    assert _contents(m) == _contents(x) + _contents(y)


def test_only_the_idx_aside_is_restored_beside_the_bin_still_in_place(inputs, tmp_path):
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x, y], m)
    old = _pair(m)
    pid, t = _killed_merge(m, 1, y, x)
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", f"m.bin.tmp{t}", f"m.idx.old{t}", f"m.idx.tmp{t}"]
    notes = shardset.clean_stale_temporaries(m)
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", "m.idx"]
    assert [n for n in notes if n.startswith("restored")] == [
        f"restored {m}.idx from {m}.idx.old{t} (beside its .bin, which was still in place), left by a run that "
        f"did not finish (pid {pid})"]
    assert _pair(m) == old


def test_a_live_runs_aside_files_are_left_alone(inputs, tmp_path):
    x, _ = inputs
    m = str(tmp_path / "m")
    merge_datasets([x], m)
    live = subprocess.Popen(["sleep", "60"])
    try:
        for ext in (".bin", ".idx"):
            os.replace(m + ext, f"{m}{ext}.old{live.pid}")  # a replace in progress in another process
        before = sorted(os.listdir(tmp_path))
        notes = shardset.clean_stale_temporaries(m)
        assert sorted(os.listdir(tmp_path)) == before
        assert notes == [f"left {m}.idx.old{live.pid}, {m}.bin.old{live.pid}: process {live.pid} is replacing {m} now"]
    finally:
        live.kill()
        live.wait()


def test_another_prefixs_aside_files_are_left_alone(inputs, tmp_path):
    """restore_aside matches the prefix exactly (shard names share the base); a merge into m cleans only
    m and the datasets named m_..., and puts back, not deletes, the earlier pair of one of those."""
    x, y = inputs
    for name in ("m", "mx", "m_1"):
        merge_datasets([x], str(tmp_path / name))
    dead = _dead_pid()
    for name in ("mx", "m_1"):
        for ext in (".bin", ".idx"):
            os.replace(tmp_path / f"{name}{ext}", tmp_path / f"{name}{ext}.old{dead}")
    before = sorted(os.listdir(tmp_path))
    assert shardset.restore_aside(tmp_path / "m") == [] and sorted(os.listdir(tmp_path)) == before
    info = merge_datasets([y], str(tmp_path / "m"))
    assert f"mx.bin.old{dead}" in os.listdir(tmp_path) and f"mx.idx.old{dead}" in os.listdir(tmp_path)
    assert any(n.startswith(f"restored {tmp_path / 'm_1'}.bin/.idx") for n in info["notes"]), info["notes"]
    assert _contents(str(tmp_path / "m_1")) == _contents(x) and _contents(str(tmp_path / "m")) == _contents(y)


def test_aside_files_of_several_dead_runs_are_kept_not_guessed(inputs, tmp_path):
    """Which .bin belongs to which .idx is not known: nothing is put back, nothing removed, and the note
    says how to do it by hand."""
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x], m)
    a, b = _dead_pid(), _dead_pid()
    os.replace(m + ".idx", f"{m}.idx.old{a}")
    os.replace(m + ".bin", f"{m}.bin.old{b}")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        merge_datasets([y], m, vocab_size=10)
    assert sorted(os.listdir(tmp_path)) == before
    notes = shardset.clean_stale_temporaries(m)
    assert len(notes) == 1 and "which .bin belongs to which .idx is not known" in notes[0] and "by hand" in notes[0]
    assert sorted(os.listdir(tmp_path)) == before


def test_an_idx_aside_that_does_not_fit_the_bin_is_not_paired_with_it(inputs, tmp_path):
    x, y = inputs
    m = str(tmp_path / "m")
    merge_datasets([x], m)
    dead = _dead_pid()
    os.replace(m + ".idx", f"{m}.idx.old{dead}")
    Path(m + ".bin").write_bytes(b"\x01\x00" * 3)  # another .bin than the one that index describes
    notes = shardset.restore_aside(m)
    assert len(notes) == 1 and "does not account for" in notes[0]
    assert not os.path.exists(m + ".idx") and os.path.exists(f"{m}.idx.old{dead}")


def test_preprocessing_puts_back_a_pair_of_its_output_name_before_it_fails(inputs, tmp_path):
    """A plain merge into out/c_text_document killed midway; preprocessing into out/c (whose output that
    name is) then fails on a bad record: the earlier pair is back, whole."""
    from megatron_osp.data.preprocess import preprocess
    from megatron_osp.data.tokenizer import train_sentencepiece

    x, y = inputs
    out = tmp_path / "out"
    out.mkdir()
    m = str(out / "c_text_document")
    merge_datasets([x, y], m)
    old, old_tokens = _pair(m), _contents(m)
    pid, t = _killed_merge(m, 2, y, x)
    assert not os.path.exists(m + ".idx") and os.path.exists(f"{m}.bin.old{t}")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} lorem ipsum dolor"}) + "\n" for i in range(50)))
    tok = train_sentencepiece(corpus, tmp_path / "tok", vocab_size=300)
    corpus.write_text(corpus.read_text() + '{"text": "half\n')
    with pytest.raises(Exception, match="c.jsonl:51"):
        preprocess([str(corpus)], str(tok), str(out / "c"), progress=False)
    assert sorted(os.listdir(out)) == ["c_text_document.bin", "c_text_document.idx"]
    assert _pair(m) == old and _contents(m) == old_tokens and _contents(m, MegatronIndexedDataset) == old_tokens
