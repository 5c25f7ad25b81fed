"""A merge of preprocessing outputs keeps what their manifests record: merge_datasets publishes its output
with a manifest of the tokenizer and EOD settings its inputs agree on (megatron_osp/data/merge.py), so
training and later merges refuse to mix it with data of another tokenizer. Inputs without a manifest
give an output without one, as before; a failed merge leaves nothing and keeps an earlier result."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_merge_datasets import _ours, _word_tokenizer

from megatron_osp.data import shardset, special_text
from megatron_osp.data.content_identity import sample_record, sampled_documents
from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_osp.data.merge import merge_datasets
from megatron_osp.data.token_range import scan_token_range

REPO = Path(__file__).resolve().parents[1]
WORDS = ["hello", "world", "fox"]


@pytest.fixture
def made(tmp_path):
    """Preprocessing outputs: a1, a2 and the sharded as (tokenizer a), b (tokenizer b, same size)."""
    from megatron_osp.data.preprocess import preprocess

    src = tmp_path / "c.jsonl"
    src.write_text("".join(f'{{"text": "hello world {i % 3 * "fox "}"}}\n' for i in range(12)))
    tok = {"a": _word_tokenizer(tmp_path / "a.json", WORDS), "b": _word_tokenizer(tmp_path / "b.json", WORDS[::-1])}

    def run(name, t, **kw):
        preprocess([str(src)], tok[t], str(tmp_path / name), progress=False, **kw)
        return str(tmp_path / f"{name}_text_document")

    return {"a1": run("a1", "a"), "a2": run("a2", "a"), "as": run("as", "a", max_shard_tokens=10),
            "b": run("b", "b"), "tok": tok, "src": src, "run": run}


def _files(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def test_a_merged_dataset_mixed_with_another_tokenizers_data_is_refused_naming_both(made, tmp_path):
    """It merged and trained silently: the merged output had no manifest, so no tokenizer to compare."""
    from megatron_osp.training.config import load_config
    from megatron_osp.training.data_checks import data_problems

    m, b = str(tmp_path / "m"), made["b"]
    info = merge_datasets([made["a1"], made["a2"]], m)
    message = f"{b}: made with another tokenizer than {m} (their manifests record tokenizer files of sha256 "
    with pytest.raises(ValueError, match=re.escape(message)):
        merge_datasets([m, b], str(tmp_path / "mb"))
    assert info["manifest"] == m + ".shards.json" and info["no_manifest"] is None
    assert not list(tmp_path.glob("mb*")) and not list(tmp_path.glob(".mb*"))
    problems = data_problems(load_config(None, ["model.vocab_size=64", f"data.paths=[{m},{b}]", "data.eod_id=4"]))
    assert problems and problems[0].startswith(f"data.paths: {message}"), problems
    assert data_problems(load_config(None, ["model.vocab_size=64", f"data.paths=[{m},{made['a1']}]",
                                            "data.eod_id=4"])) == []


def test_the_merged_manifest_records_what_the_inputs_agree_on(made, tmp_path):
    """Its recorded tokens are the inputs'; run options that differ between inputs are not claimed;
    merged_from names the datasets (a sharded input's shards) and their manifests; merged again, the same."""
    m = str(tmp_path / "m")
    shards = shardset.expand(made["as"])
    assert len(shards) > 1
    merge_datasets([made["a1"], made["as"]], m)
    want = shardset.recorded_tokens(made["a1"])
    assert shardset.recorded_tokens(m) == want == shardset.recorded_tokens(shards[0])
    assert set(want) == {"vocab_size", "tokenizer_sha256", "tokenizer_fingerprint", "eod", "append_eod",
                         special_text.FIELD}
    manifest = json.loads(Path(m + ".shards.json").read_text())
    assert manifest["state"] == "complete" and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"] == made["tok"]["a"]
    assert not {"inputs", "max_shard_tokens", "skip_bad_records", "array"} & set(manifest)
    assert manifest["merged_from"] == {
        "datasets": [made["a1"], *shards],
        "manifests": [made["a1"] + ".shards.json", made["as"] + ".shards.json"]}
    ds = IndexedDataset(m)  # checked against the manifest on open
    top = scan_token_range(ds)[1]
    # the content sample (data/content_identity.py): the union of the inputs', as hashing the merged documents gives
    docs = [ds[i] for i in range(len(ds))]
    sample = sample_record(h for _, h in sampled_documents(np.array([len(d) for d in docs]), np.concatenate(docs)))
    assert manifest["datasets"] == [{"name": "m", "documents": len(ds), "sequences": len(ds), "tokens": ds.num_tokens,
                                     "max_token_id": top, "bin_bytes": os.path.getsize(m + ".bin"),
                                     "idx_bytes": os.path.getsize(m + ".idx"), "content_sample": sample}]
    mm = str(tmp_path / "mm")
    merge_datasets([m, made["a2"]], mm)
    assert shardset.recorded_tokens(mm) == want
    assert json.loads(Path(mm + ".shards.json").read_text())["merged_from"]["manifests"] == [
        m + ".shards.json", made["a2"] + ".shards.json"]


def _entry(prefix):
    family = shardset.family_of(prefix)
    return shardset._listed(family)[1][os.path.basename(prefix)]


def test_the_merged_manifest_records_the_largest_id_taken_or_computed(made, tmp_path, monkeypatch):
    """Preprocessing records each dataset's max_token_id; a merge's entry lacked it. Now: the largest of
    the inputs' recorded values, read without a pass over the tokens; an input that does not record it
    (a merge written before) is scanned once, also through a merge of merges."""
    m, mm = str(tmp_path / "m"), str(tmp_path / "mm")
    inputs = [made["a1"], *shardset.expand(made["as"])]
    recorded = [_entry(p)["max_token_id"] for p in inputs]
    import megatron_osp.data.merge as merge_module

    scanned = []
    monkeypatch.setattr(merge_module, "scan_token_range", lambda ds: scanned.append(ds.prefix) or scan_token_range(ds))
    merge_datasets(inputs, m)
    assert _entry(m)["max_token_id"] == max(recorded) == scan_token_range(IndexedDataset(m))[1] and not scanned
    manifest = json.loads(Path(m + ".shards.json").read_text())
    del manifest["datasets"][0]["max_token_id"]  # as a merge before this change wrote it
    Path(m + ".shards.json").write_text(json.dumps(manifest))
    merge_datasets([m, made["a2"]], mm)
    assert scanned == [m] and _entry(mm)["max_token_id"] == scan_token_range(IndexedDataset(mm))[1]


def test_fields_the_inputs_record_differently_are_left_out(made, tmp_path):
    """Two files of one fingerprint: the fingerprint, no sha256. Without EOD, two EOD ids: no eod. A
    refuse dataset with an encode one: encode."""
    a = made["tok"]["a"]
    definition = json.loads(Path(a).read_text())
    (tmp_path / "a_copy.json").write_text(json.dumps(dict(reversed(list(definition.items()))), indent=3))
    made["tok"]["copy"] = str(tmp_path / "a_copy.json")
    copy = made["run"]("copy", "copy")
    merge_datasets([made["a1"], copy], str(tmp_path / "m"))
    got, want = shardset.recorded_tokens(str(tmp_path / "m")), shardset.recorded_tokens(made["a1"])
    assert shardset.recorded_tokens(copy)["tokenizer_sha256"] != want["tokenizer_sha256"]
    assert got == {k: v for k, v in want.items() if k != "tokenizer_sha256"}
    assert "tokenizer" not in json.loads(Path(str(tmp_path / "m") + ".shards.json").read_text())

    n1, n2 = made["run"]("n1", "a", append_eod=False), made["run"]("n2", "a", append_eod=False, eod_token="</s>")
    merge_datasets([n1, n2], str(tmp_path / "n"))
    got = shardset.recorded_tokens(str(tmp_path / "n"))
    assert "eod" not in got and got["append_eod"] is False and got["vocab_size"] == want["vocab_size"]

    r = made["run"]("r", "a", special_tokens_in_text="refuse")
    merge_datasets([r, made["a1"]], str(tmp_path / "re"))
    assert shardset.recorded_tokens(str(tmp_path / "re"))[special_text.FIELD] == "encode"
    merge_datasets([r], str(tmp_path / "rr"))
    assert shardset.recorded_tokens(str(tmp_path / "rr"))[special_text.FIELD] == "refuse"
    assert special_text.merged_mode(["encode", "split", "refuse"]) == "encode"  # SentencePiece only: same ids


def test_the_output_is_the_same_bytes_with_or_without_a_manifest_and_megatron_reads_it(made, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    plain = tmp_path / "plain"
    plain.mkdir()
    for p in (made["a1"], made["a2"]):
        for ext in (".bin", ".idx"):
            shutil.copy(p + ext, plain / (Path(p).name + ext))
    merge_datasets([made["a1"], made["a2"]], str(tmp_path / "m"))
    merge_datasets([str(plain / Path(p).name) for p in (made["a1"], made["a2"])], str(plain / "m"))
    assert (tmp_path / "m.shards.json").exists() and not (plain / "m.shards.json").exists()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (plain / f"m{ext}").read_bytes()
    ours, theirs = IndexedDataset(str(tmp_path / "m")), MegatronIndexedDataset(str(tmp_path / "m"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == [ours[i].tolist() for i in range(len(ours))]


def test_inputs_without_a_manifest_merge_as_before_with_none_and_say_why(made, tmp_path):
    rng = np.random.default_rng(0)
    x, y = _ours(str(tmp_path / "x"), rng, 5), _ours(str(tmp_path / "y"), rng, 5)
    info = merge_datasets([x, y], str(tmp_path / "p"))
    assert info["manifest"] is None and info["no_manifest"] == f"{tmp_path / 'p'}: written without a manifest: no input has one"
    assert not (tmp_path / "p.shards.json").exists() and len(IndexedDataset(str(tmp_path / "p"))) == 10
    m = str(tmp_path / "m")
    merge_datasets([made["a1"]], m)  # an earlier merge with a manifest, replaced by one that can have none
    before = _files(tmp_path)
    r = subprocess.run([sys.executable, str(REPO / "tools/merge_datasets.py"), "--input", made["a1"], x,
                        "--output-prefix", m], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == (f"{m}: written without a manifest: {x} has none (1 of 2 inputs lack one), "
                                         "so its tokenizer is unknown")
    assert not os.path.exists(m + ".shards.json") and shardset.recorded_tokens(m) == {}
    assert len(IndexedDataset(m)) == len(IndexedDataset(made["a1"])) + 5
    assert set(_files(tmp_path)) == set(before) - {"m.shards.json"}
    r = subprocess.run([sys.executable, str(REPO / "tools/merge_datasets.py"), "--input", made["a1"], made["a2"],
                        "--output-prefix", m], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.rstrip().endswith(f", manifest {m}.shards.json"), r.stdout
    assert shardset.recorded_tokens(m) == shardset.recorded_tokens(made["a1"])


def test_a_failed_merge_leaves_nothing_and_keeps_the_earlier_result(made, tmp_path, monkeypatch):
    m = str(tmp_path / "m")
    merge_datasets([made["a1"]], m)
    before = _files(tmp_path)
    assert "m.shards.json" in before
    add = IndexedDatasetWriter.add_dataset

    def fail_second(self, ds, *a, **kw):
        if self.num_documents:
            raise OSError(28, "No space left on device")
        return add(self, ds, *a, **kw)

    monkeypatch.setattr(IndexedDatasetWriter, "add_dataset", fail_second)
    for out in (m, str(tmp_path / "new" / "m2")):
        with pytest.raises(OSError, match="No space left"):
            merge_datasets([made["a1"], made["a2"]], out)
        assert _files(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted(before)  # no stage, no new/
    monkeypatch.undo()
    (tmp_path / "m_00000.bin").write_bytes(b"")  # publishing m would remove it: refused before writing
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'm_00000.bin'}: named like a shard of {m}")):
        merge_datasets([made["a2"]], m)
    (tmp_path / "m_00000.bin").unlink()
    assert _files(tmp_path) == before
    with pytest.raises(ValueError, match=re.escape(f"{made['a2']}: belongs to the preprocessing output")):
        merge_datasets([made["a1"]], made["a2"])  # a preprocessing output is never written over
    assert _files(tmp_path) == before


def test_a_publish_cut_short_is_refused_then_the_merge_reruns(made, tmp_path, monkeypatch):
    """Killed between removing the earlier files and renaming the new ones in: the manifest says
    "publishing" (readers refuse the prefix) and names the merge, so rerunning it replaces the prefix."""
    m = str(tmp_path / "m")
    merge_datasets([made["a1"]], m)
    replace = os.replace

    def cut(src, dst, *a, **kw):
        if ".stage-" in str(src) and ".stage-" not in str(dst):  # publishing, not the writer
            raise OSError(5, "Input/output error")
        return replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(OSError, match="Input/output error"):
        merge_datasets([made["a1"], made["a2"]], m)
    monkeypatch.undo()
    assert json.loads(Path(m + ".shards.json").read_text())["state"] == "publishing"
    with pytest.raises(ValueError, match="interrupted while publishing"):
        shardset.recorded_tokens(m)
    merge_datasets([made["a1"], made["a2"]], m)
    assert shardset.recorded_tokens(m) == shardset.recorded_tokens(made["a1"])
    assert len(IndexedDataset(m)) == 2 * len(IndexedDataset(made["a1"]))
    assert not [n for n in os.listdir(tmp_path) if ".stage-" in n or ".tmp" in n]


def test_an_input_merged_from_another_input_is_refused(made, tmp_path):
    """A merge output beside the datasets it was merged from (``--input-dir data/`` after an earlier
    ``--output-prefix data/all``), or two merges of one dataset, merged again: their documents went into
    the output twice, silently. Their manifests' merged_from says so; a rerun into the earlier output's
    own prefix still replaces it."""
    a1, a2, sharded = made["a1"], made["a2"], made["as"]
    d = tmp_path / "d"
    d.mkdir()
    for f in tmp_path.glob("a[12]_text_document*"):
        shutil.copy(f, d / f.name)
    a1, a2 = str(d / "a1_text_document"), str(d / "a2_text_document")
    merge_datasets([a1, a2], str(d / "all"))
    with pytest.raises(ValueError, match=re.escape(f"{d / 'all'}: was merged from {a1} (its manifest's merged_from), "
                                                   f"which is also an input ({a1})")):
        merge_datasets([str(d / "all"), a1, a2], str(d / "all2"))
    merge_datasets([str(d / "all"), sharded], str(tmp_path / "m2"))  # a merge of merges: theirs in turn
    with pytest.raises(ValueError, match="its documents would be in the output twice"):
        merge_datasets([str(tmp_path / "m2"), a2], str(tmp_path / "m3"))
    merge_datasets([a1], str(tmp_path / "only1"))
    with pytest.raises(ValueError, match=re.escape(f"both were merged from {a1}")):
        merge_datasets([str(d / "all"), str(tmp_path / "only1")], str(tmp_path / "m4"))
    shard = shardset.expand(sharded)[1]
    with pytest.raises(ValueError, match=re.escape(f"was merged from {os.path.abspath(shard)}")):
        merge_datasets([str(tmp_path / "m2"), shard], str(tmp_path / "m5"))
    assert not list(tmp_path.glob("m[345]*")) and not list(d.glob("all2*"))
    tool = [sys.executable, str(REPO / "tools/merge_datasets.py"), "--input-dir", str(d), "--output-prefix"]
    out = subprocess.run(tool + [str(d / "all")], capture_output=True, text=True)  # the rerun: replaced
    assert out.returncode == 0, out.stderr
    out = subprocess.run(tool + [str(d / "all3")], capture_output=True, text=True)
    assert out.returncode == 1 and "its documents would be in the output twice" in out.stderr
    assert len(IndexedDataset(str(d / "all"))) == len(IndexedDataset(a1)) + len(IndexedDataset(a2))
