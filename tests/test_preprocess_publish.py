"""Issue 14 case 1: a preprocessing run's output is one unit. A rerun into the same prefix replaces
every shard of the earlier run (sharded or not), a failed or killed run leaves the earlier output as
it was, temporaries of dead runs are removed, and merge --input-dir takes exactly the published set."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.preprocess import preprocess
from megatron_osp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
N_DOCS = 300
TEXTS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(N_DOCS)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t + " the quick brown fox"}) + "\n" for t in TEXTS))
    return str(train_sentencepiece(corpus, d / "tok", vocab_size=300))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


def _cli(tool, *args, check=True):
    r = subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _preprocess(corpus, tok, prefix, *extra, check=True):
    return _cli("preprocess_data.py", "--input", corpus, "--tokenizer-model", tok, "--output-prefix", prefix,
                "--append-eod", "--no-progress", *extra, check=check)


def _snapshot(directory):
    """Every file under the directory (hidden ones included) with its content hash."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _merged_docs(tmp_path, directory):
    out = tmp_path / "merged" / "all"
    r = _cli("merge_datasets.py", "--input-dir", directory, "--output-prefix", out)
    return _docs(out), r.stdout


def _expected(tok):
    t = SentencePieceTokenizer(tok)
    return [t.encode(x) + [t.eod] for x in TEXTS]


def test_a_rerun_with_another_shard_size_replaces_every_shard(tmp_path, tok, corpus):
    out = tmp_path / "out"
    total = sum(map(len, _expected(tok)))
    _preprocess(corpus, tok, out / "c", "--max-shard-tokens", total // 4 + 1)
    assert len(list(out.glob("c_text_document_*.idx"))) == 4
    r = _preprocess(corpus, tok, out / "c", "--max-shard-tokens", total // 2 + 1)
    assert "wrote 2 datasets" in r.stdout
    assert sorted(p.name for p in out.glob("*.idx")) == ["c_text_document_00000.idx", "c_text_document_00001.idx"]
    docs, _ = _merged_docs(tmp_path, out)
    assert len(docs) == N_DOCS and docs == _expected(tok)


def test_sharded_and_unsharded_runs_replace_each_other(tmp_path, tok, corpus):
    out = tmp_path / "out"
    preprocess([corpus], tok, str(out / "c"), max_shard_tokens=1500, progress=False)
    preprocess([corpus], tok, str(out / "c"), progress=False)
    assert sorted(p.name for p in out.glob("*.idx")) == ["c_text_document.idx"]
    assert _docs(out / "c_text_document") == _expected(tok)
    stats = preprocess([corpus], tok, str(out / "c"), max_shard_tokens=3000, progress=False)
    assert sorted(p.name for p in out.glob("*.idx")) == sorted(Path(p).name + ".idx" for p in stats.outputs)
    assert not (out / "c_text_document.bin").exists()
    joined = [d for p in stats.outputs for d in _docs(p)]
    assert joined == _expected(tok)
    # Megatron-Core reads the published shards as they are.
    meg = MegatronIndexed(stats.outputs[0])
    np.testing.assert_array_equal(meg[0], _expected(tok)[0])


def test_a_failed_rerun_leaves_the_earlier_output_untouched(tmp_path, tok, corpus):
    out = tmp_path / "out"
    _preprocess(corpus, tok, out / "c", "--max-shard-tokens", 2000)
    before = _snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(corpus).read_text() + "{broken\n")
    r = _preprocess(str(bad), tok, out / "c", "--max-shard-tokens", 700, "--overwrite", check=False)
    assert r.returncode == 1 and f"{bad}:{N_DOCS + 1}: malformed JSON" in r.stderr
    assert _snapshot(out) == before


def test_a_killed_run_leaves_the_earlier_output_and_the_next_run_cleans_up(tmp_path, tok, corpus):
    out = tmp_path / "out"
    _preprocess(corpus, tok, out / "c", "--max-shard-tokens", 2000)
    before = _snapshot(out)
    # SIGKILL while the second shard of the new run is being finished: shards are done, none published.
    killer = (
        "import os, signal, sys\n"
        "from megatron_osp.data import indexed\n"
        "from megatron_osp.data.preprocess import preprocess\n"
        "real, calls = indexed.IndexedDatasetWriter.finalize, []\n"
        "def finalize(self):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(self)\n"
        "indexed.IndexedDatasetWriter.finalize = finalize\n"
        f"preprocess([{corpus!r}], {tok!r}, {str(out / 'c')!r}, max_shard_tokens=1000, progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == -9, r.stderr[-2000:]
    visible = {k: v for k, v in _snapshot(out).items() if not k.startswith(".")}
    assert visible == before  # the earlier output is whole; the dead run's files are out of sight
    docs, _ = _merged_docs(tmp_path, out)
    assert docs == _expected(tok)
    r = _preprocess(corpus, tok, out / "c", "--max-shard-tokens", 1000)
    assert "removed" in r.stdout and "did not finish" in r.stdout
    names = [p.name for p in out.rglob("*")]
    assert not [n for n in names if n.startswith(".") or ".tmp" in n], names


def test_old_style_temporaries_of_dead_runs_are_removed(tmp_path, tok, corpus):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name in (f"c_text_document_00001.bin.tmp{dead.pid}", f"c_text_document_00001.idx.tmp{dead.pid}"):
        (out / name).write_bytes(b"partial")
    alive = out / f"c_text_document_00002.bin.tmp{os.getpid()}"  # a live run's: left alone
    alive.write_bytes(b"in progress")
    stats = preprocess([corpus], tok, str(out / "c"), progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [alive.name, "c_text_document.bin", "c_text_document.idx", "c_text_document.shards.json"])
    assert any(f"pid {dead.pid}" in n for n in stats.notes) and "did not finish" in stats.summary()


def test_merge_input_dir_takes_only_the_published_set(tmp_path, tok, corpus):
    out = tmp_path / "out"
    stats = preprocess([corpus], tok, str(out / "c"), max_shard_tokens=2500, progress=False)
    stale = out / "c_text_document_00009"  # a leftover someone copied in, named like a shard
    for ext in (".bin", ".idx"):
        (out / f"c_text_document_00009{ext}").write_bytes(Path(stats.outputs[0] + ext).read_bytes())
        (out / f"other{ext}.tmp12345").write_bytes(b"junk")
    docs, stdout = _merged_docs(tmp_path, out)
    assert docs == _expected(tok)
    assert f"skipped {stale}" in stdout
    with pytest.raises(ValueError, match="not among the datasets .*c_text_document.shards.json lists"):
        IndexedDataset(stale)


def test_the_family_prefix_of_a_sharded_output_names_its_shards(tmp_path, tok, corpus):
    out = tmp_path / "out"
    stats = preprocess([corpus], tok, str(out / "c"), max_shard_tokens=2500, progress=False)
    with pytest.raises(FileNotFoundError, match=r"c_text_document: this output is sharded; .* lists \d+ datasets"):
        IndexedDataset(out / "c_text_document")
    _cli("merge_datasets.py", "--input", out / "c_text_document", "--output-prefix", tmp_path / "m")
    assert _docs(tmp_path / "m") == _expected(tok) and len(stats.outputs) > 2


def test_an_interrupted_publish_is_refused_by_name(tmp_path, tok, corpus, monkeypatch):
    out = tmp_path / "out"
    preprocess([corpus], tok, str(out / "c"), max_shard_tokens=2500, progress=False)
    real, calls = os.replace, []

    def replace(src, dst):  # the publish dies after its first rename into the output directory
        if ".stage-" in str(src) and ".stage-" not in str(dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        preprocess([corpus], tok, str(out / "c"), max_shard_tokens=1200, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="c_text_document.shards.json: the run that wrote .* was interrupted"):
        IndexedDataset(out / "c_text_document_00000")
    r = _cli("merge_datasets.py", "--input-dir", out, "--output-prefix", tmp_path / "m", check=False)
    assert r.returncode == 1 and "interrupted while publishing" in r.stderr and "Traceback" not in r.stderr
    preprocess([corpus], tok, str(out / "c"), max_shard_tokens=1200, progress=False)  # a rerun repairs it
    docs, _ = _merged_docs(tmp_path, out)
    assert docs == _expected(tok)


def test_two_keys_are_published_together(tmp_path, tok):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t, "title": t[:11]}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    preprocess([str(src)], tok, str(out / "c"), json_keys=("text", "title"), max_shard_tokens=2000, progress=False)
    before = _snapshot(out)
    src.write_text(src.read_text() + json.dumps({"text": "fine", "title": 3}) + "\n")
    with pytest.raises(ValueError, match=rf"in\.jsonl:{N_DOCS + 1}: key 'title' is a number, not a string"):
        preprocess([str(src)], tok, str(out / "c"), json_keys=("text", "title"), progress=False)
    assert _snapshot(out) == before
    for key in ("text", "title"):
        manifest = json.loads((out / f"c_{key}_document.shards.json").read_text())
        assert manifest["state"] == "complete" and sum(d["documents"] for d in manifest["datasets"]) == N_DOCS


def test_a_family_manifest_is_read_once_for_all_its_shards_and_again_when_replaced(tmp_path, tok, corpus,
                                                                                  monkeypatch):
    """Opening each of N shards used to read (and parse) the N-entry manifest again: N^2 work, seconds
    at a few thousand shards before training or a merge started."""
    from megatron_osp.data import shardset
    from megatron_osp.data.merge import merge_datasets

    prefix = str(tmp_path / "out")
    _preprocess(corpus, tok, prefix, "--max-shard-tokens", "500")
    family = prefix + "_text_document"
    shards = shardset.expand(family)
    assert len(shards) >= 5
    reads = []
    real = shardset.read_manifest
    monkeypatch.setattr(shardset, "read_manifest", lambda f: reads.append(f) or real(f))
    merge_datasets([family], str(tmp_path / "m"))
    assert reads == []  # expand() above already read it
    _preprocess(corpus, tok, prefix, "--max-shard-tokens", "800")  # replaces the manifest
    assert shardset.expand(family) != shards and len(reads) == 1


def test_an_output_directory_that_takes_no_files_is_named_not_the_stage():
    """/proc takes no new entries: the error named the hidden stage directory (.foo.stage-<host>-<pid>)
    as if it were missing."""
    from megatron_osp.data import shardset

    with pytest.raises(FileNotFoundError, match=r"cannot create files in the output directory /proc \(No such file "
                                                r"or directory; tried \.foo\.stage-"):
        shardset.Stage("/proc/foo")
