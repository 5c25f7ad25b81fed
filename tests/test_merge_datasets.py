"""merge_datasets equals Megatron-Core's own merge byte for byte; bad merges are named and leave nothing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_osp.data.merge import merge_datasets

REPO = Path(__file__).resolve().parents[1]


def _megatron_dataset(prefix, rng, n_docs, dtype=np.uint16, split_docs=False):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for _ in range(n_docs):
        n = int(rng.integers(1, 60))
        tokens = rng.integers(0, 1000, n).astype(dtype)
        if split_docs and n > 3:  # one document of two sequences, like Megatron's sentence splitting
            cut = int(rng.integers(1, n - 1))
            builder.add_document(tokens, [cut, n - cut])
        else:
            builder.add_document(tokens, [n])
    builder.finalize(prefix + ".idx")
    return prefix


def _ours(prefix, rng, n_docs):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(n_docs):
            w.add_document(rng.integers(0, 1000, int(rng.integers(0, 60))))
    return prefix


@pytest.mark.parametrize("split_docs", [False, True])
def test_merge_is_byte_identical_to_megatron_core(tmp_path, split_docs):
    rng = np.random.default_rng(0)
    parts = [_megatron_dataset(str(tmp_path / "a"), rng, 50, split_docs=split_docs),
             _ours(str(tmp_path / "b"), rng, 40),
             _megatron_dataset(str(tmp_path / "c"), rng, 30, split_docs=split_docs)]
    info = merge_datasets(parts, str(tmp_path / "ours"))

    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in parts:
        ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext

    merged = MegatronIndexedDataset(str(tmp_path / "ours"))
    expected = [IndexedDataset(p)[i].tolist() for p in parts for i in range(len(IndexedDataset(p)))]
    assert [merged[i].tolist() for i in range(len(merged))] == expected
    assert info["sequences"] == len(expected) and info["tokens"] == sum(map(len, expected))


def test_dtype_mismatch_and_self_merge_are_named_and_leave_nothing(tmp_path):
    rng = np.random.default_rng(1)
    a = _megatron_dataset(str(tmp_path / "a"), rng, 5)
    b = _megatron_dataset(str(tmp_path / "b"), rng, 5, dtype=np.int32)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"b: token dtype int32 differs from .*a's uint16"):
        merge_datasets([a, b], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"a: the output prefix is also an input"):
        merge_datasets([a, str(tmp_path / "c")], a)
    with pytest.raises(ValueError, match=r"names a directory, not a file prefix"):  # wrote tmp_path/.bin, .idx
        merge_datasets([a], str(tmp_path) + os.sep)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_damaged_input_is_refused_by_name(tmp_path):
    rng = np.random.default_rng(2)
    a = _ours(str(tmp_path / "a"), rng, 10)
    b = _ours(str(tmp_path / "b"), rng, 10)
    data = (tmp_path / "b.bin").read_bytes()
    (tmp_path / "b.bin").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"b\.bin"):
        merge_datasets([a, b], str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))


def test_cli_merges_a_directory_in_name_order(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "shards"
    parts = [_ours(str(d / f"s_{i:05d}"), rng, 7) for i in range(3)]
    r = subprocess.run([sys.executable, str(REPO / "tools/merge_datasets.py"), "--input-dir", str(d),
                        "--output-prefix", str(tmp_path / "all")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    merged = IndexedDataset(str(tmp_path / "all"))
    expected = [IndexedDataset(p)[i].tolist() for p in parts for i in range(7)]
    assert [merged[i].tolist() for i in range(len(merged))] == expected
    r = subprocess.run([sys.executable, str(REPO / "tools/merge_datasets.py"), "--input-dir", str(tmp_path / "none"),
                        "--output-prefix", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "is not a directory" in r.stderr
    # The README's form, output inside the input directory: run twice, the second replaces the first
    # (it used to stop: "the output prefix is also an input")
    for run in range(2):
        r = subprocess.run([sys.executable, str(REPO / "tools/merge_datasets.py"), "--input-dir", str(d),
                            "--output-prefix", str(d / "all")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert ("skipped " + str(d / "all") + ": the output prefix, in the input directory" in r.stdout) == (run == 1)
        merged = IndexedDataset(str(d / "all"))
        assert [merged[i].tolist() for i in range(len(merged))] == expected


def _word_tokenizer(path, words):
    """A word-level tokenizer.json: ids in the order of ``words``; "<|endoftext|>" and "</s>" end it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *words, "<|endoftext|>", "</s>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_preprocessed_inputs_of_other_tokenizers_or_eod_settings_are_refused_by_name(tmp_path):
    """Same vocabulary size, so the dtype and size checks pass: the manifests' tokenizer hash, EOD id and
    append_eod tell them apart."""
    from megatron_osp.data.preprocess import preprocess

    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello world"}\n{"text": "world fox"}\n')
    a = _word_tokenizer(tmp_path / "a.json", ["hello", "world", "fox"])
    b = _word_tokenizer(tmp_path / "b.json", ["fox", "world", "hello"])

    def run(name, tok, **kw):
        preprocess([str(src)], tok, str(tmp_path / name), progress=False, **kw)
        return str(tmp_path / f"{name}_text_document")

    base, again = run("base", a), run("again", a)
    cases = [(run("other", b), "made with another tokenizer than"),
             (run("noeod", a, append_eod=False), "its documents do not end with an EOD token"),
             (run("s", a, eod_token="</s>"), "its documents end with EOD id 5, ")]
    for other, message in cases:
        with pytest.raises(ValueError, match=re.escape(f"{other}: {message}")):
            merge_datasets([base, other], str(tmp_path / "m"))
        assert not list(tmp_path.glob("m*"))
    merge_datasets([base, again], str(tmp_path / "m"))  # the same tokenizer and settings merge
    assert len(IndexedDataset(str(tmp_path / "m"))) == 4
    r = subprocess.run([sys.executable, str(REPO / "tools/merge_datasets.py"), "--input", base,
                        "--output-prefix", str(tmp_path / "m2"), "--tokenizer-model", b],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"{base}: made with another tokenizer (its manifest" in r.stderr, r.stderr
    assert not list(tmp_path.glob("m2*"))


def test_preprocessed_inputs_of_one_tokenizer_in_byte_different_files_merge(tmp_path):
    """The same tokenizer.json re-saved (other key order and whitespace, another padding of the JSON):
    other sha256, same ids, so the datasets merge; one that encodes differently is still refused. A
    manifest without a fingerprint (written before them) is held to the file's sha256."""
    import json

    from megatron_osp.data.preprocess import preprocess

    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello world"}\n{"text": "world fox"}\n')
    a = _word_tokenizer(tmp_path / "a.json", ["hello", "world", "fox"])
    definition = json.loads(Path(a).read_text())
    (tmp_path / "a2.json").write_text(json.dumps(dict(reversed(list(definition.items()))), indent=3))
    b = _word_tokenizer(tmp_path / "b.json", ["fox", "world", "hello"])

    def run(name, tok):
        preprocess([str(src)], tok, str(tmp_path / name), progress=False)
        return str(tmp_path / f"{name}_text_document")

    base, copy, other = run("base", a), run("copy", str(tmp_path / "a2.json")), run("other", b)
    manifests = {p: json.loads(Path(p + ".shards.json").read_text()) for p in (base, copy)}
    assert manifests[base]["tokenizer_sha256"] != manifests[copy]["tokenizer_sha256"]
    assert manifests[base]["tokenizer_fingerprint"] == manifests[copy]["tokenizer_fingerprint"]
    merge_datasets([base, copy], str(tmp_path / "m"))
    assert len(IndexedDataset(str(tmp_path / "m"))) == 4
    with pytest.raises(ValueError, match=re.escape(f"{other}: made with another tokenizer than {base} (their "
                                                   "manifests record tokenizer files of sha256 ")):
        merge_datasets([base, copy, other], str(tmp_path / "m3"))
    for tok, inputs, ok in ((tmp_path / "a2.json", [base], True), (a, [copy], True), (b, [copy], False)):
        r = subprocess.run([sys.executable, str(REPO / "tools/merge_datasets.py"), "--input", *inputs,
                            "--output-prefix", str(tmp_path / "m2"), "--tokenizer-model", str(tok)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == (0 if ok else 1), r.stderr
        if not ok:
            assert f"{copy}: made with another tokenizer (its manifest records sha256 " in r.stderr
            assert "which encodes differently" in r.stderr
    m = manifests[copy]
    del m["tokenizer_fingerprint"]
    Path(copy + ".shards.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=re.escape(f"{copy}: made with another tokenizer than {base}")):
        merge_datasets([base, copy], str(tmp_path / "m4"))
    assert not list(tmp_path.glob("m3*")) and not list(tmp_path.glob("m4*"))


def test_a_dataset_given_twice_is_refused(tmp_path):
    """Directly, or as a shard of a sharded output's prefix and by its own name: its documents used to be
    merged twice."""
    from megatron_osp.data.preprocess import preprocess

    src = tmp_path / "c.jsonl"
    src.write_text("".join(f'{{"text": "hello world {i % 3 * "fox "}"}}\n' for i in range(12)))
    tok = _word_tokenizer(tmp_path / "a.json", ["hello", "world", "fox"])
    preprocess([str(src)], tok, str(tmp_path / "s"), progress=False, max_shard_tokens=10)
    family = str(tmp_path / "s_text_document")
    shard = family + "_00001"
    assert os.path.exists(shard + ".bin")
    for inputs, message in (([shard, shard], f"{shard}: given twice as input;"),
                            ([family, shard], f"{shard}: given twice as input (as {family} and as {shard})")):
        with pytest.raises(ValueError, match=re.escape(message)):
            merge_datasets(inputs, str(tmp_path / "m"))
        assert not list(tmp_path.glob("m*"))


def test_a_file_name_for_a_prefix_is_refused_with_the_prefix(tmp_path):
    """``--output-prefix all.bin`` wrote all.bin.bin and all.bin.idx; ``--input x.bin`` said x.bin.idx does
    not exist."""
    from megatron_osp.data.indexed import IndexedDatasetWriter
    from megatron_osp.data.merge import merge_datasets

    with IndexedDatasetWriter(tmp_path / "x") as w:
        w.add_document(np.arange(1, 5))
    x = str(tmp_path / "x")
    with pytest.raises(ValueError, match=rf"output prefix {re.escape(x)}\.bin: a file name, not a dataset prefix: "
                                         rf"give the prefix without \.bin, {re.escape(x)} "):
        merge_datasets([x], x + ".bin")
    with pytest.raises(ValueError, match=rf"input {re.escape(x)}\.idx: a file name, .* without \.idx, {re.escape(x)} "):
        merge_datasets([x + ".idx"], str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]


def test_a_dataset_given_twice_through_a_link_is_refused(tmp_path):
    """A symbolic or hard link of a dataset's files under another prefix (a directory of links that
    organizes datasets) is the same dataset, as training takes it: it was merged twice."""
    a = _ours(str(tmp_path / "a"), np.random.default_rng(0), 5)
    links = tmp_path / "links"
    links.mkdir()
    for ext in (".bin", ".idx"):
        os.symlink(a + ext, links / f"sym{ext}")
        os.link(a + ext, links / f"hard{ext}")
    for other in (str(links / "sym"), str(links / "hard")):
        with pytest.raises(ValueError, match=re.escape(f"{other}: given twice as input (as {a} and as {other})")):
            merge_datasets([a, other], str(tmp_path / "m"))
        assert not list(tmp_path.glob("m*"))
    b = _ours(str(tmp_path / "b"), np.random.default_rng(1), 5)
    assert merge_datasets([a, b], str(tmp_path / "m"))["datasets"] == 2
