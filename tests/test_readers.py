"""Every input format gives the same datasets as plain JSONL; every bad or damaged input is named and
leaves no output; HF tokenizers and sharded outputs."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megatron_osp.data.builtin_corpus import write_corpus
from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.preprocess import BadRecord, CorruptInput, preprocess
from megatron_osp.data.tokenizer import HFTokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"document number {i}: " + "lorem ipsum dolor " * (i % 7) + "é漢" * (i % 3) for i in range(300)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_corpus(d / "corpus.jsonl", max_documents=300)
    return str(train_sentencepiece(d / "corpus.jsonl", d / "tok", vocab_size=400))


def _lines(records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def write_jsonl(path, records):
    path.write_bytes(_lines(records))
    return path


def write_gz(path, records):
    path.write_bytes(gzip.compress(_lines(records)))
    return path


def write_zst(path, records, frames=1):
    data = _lines(records)
    cut = [len(data) * i // frames for i in range(frames + 1)]
    cctx = zstandard.ZstdCompressor()
    path.write_bytes(b"".join(cctx.compress(data[a:b]) for a, b in zip(cut, cut[1:])))
    return path


def write_parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=50)
    return path


def _datasets(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _run(src, model, out, **kw):
    kw.setdefault("progress", False)
    return preprocess([str(src)], model, str(out), **kw)


@pytest.mark.parametrize("fmt", ["gz", "zst", "zst3", "parquet"])
def test_every_format_gives_the_plain_jsonl_result(tmp_path, sp_model, fmt):
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    _run(write_jsonl(tmp_path / "ref.jsonl", records), sp_model, tmp_path / "ref")
    writer = {"gz": write_gz, "zst": write_zst, "parquet": write_parquet,
              "zst3": lambda p, r: write_zst(p, r, frames=3)}[fmt]
    src = writer(tmp_path / f"in.{fmt.rstrip('3')}", records)
    stats = _run(src, sp_model, tmp_path / "out", workers=2, chunk_lines=32)
    assert stats.documents == len(TEXTS)
    assert _datasets(tmp_path / "out_text_document") == _datasets(tmp_path / "ref_text_document")


def _corrupt_zst(path, records):
    data = bytearray(zstandard.ZstdCompressor().compress(_lines(records)))
    data[len(data) // 2: len(data) // 2 + 40] = b"\x00" * 40
    path.write_bytes(bytes(data))
    return path


def _truncated(writer):
    def write(path, records):
        writer(path, records)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        return path
    return write


GOOD = [{"text": t} for t in TEXTS[:200]]


@pytest.mark.parametrize(
    "name, writer, records, error, message",
    [
        ("in.jsonl.gz", write_gz, [{"text": "a"}, "{oops"], BadRecord, r"in\.jsonl\.gz:2: malformed JSON"),
        ("in.jsonl.zst", write_zst, [{"text": "a"}, {"t": 1}], BadRecord, r"in\.jsonl\.zst:2: missing key 'text'"),
        ("in.jsonl.zst", write_zst, [{"text": ["x"]}], BadRecord, r"in\.jsonl\.zst:1: key 'text' is an array, not a string"),
        ("in.jsonl.gz", write_gz, [], BadRecord, r"in\.jsonl\.gz:1: empty file"),
        ("in.jsonl.zst", write_zst, [], BadRecord, r"in\.jsonl\.zst:1: empty file"),
        ("in.jsonl.gz", _truncated(write_gz), GOOD, CorruptInput, r"in\.jsonl\.gz: corrupt or truncated gzip stream after line \d+"),
        ("in.jsonl.zst", _truncated(write_zst), GOOD, CorruptInput, r"in\.jsonl\.zst: truncated zstd stream"),
        ("in.jsonl.zst", _corrupt_zst, GOOD, CorruptInput, r"in\.jsonl\.zst: corrupt zstd stream after line \d+"),
        ("in.parquet", write_parquet, [{"body": "x"}], CorruptInput, r"in\.parquet: missing column 'text' \(columns: body\)"),
        ("in.parquet", write_parquet, [{"text": "a"}, {"text": None}], BadRecord, r"in\.parquet:row 2: key 'text' is null"),
        ("in.parquet", write_parquet, [{"text": 7}], CorruptInput,
         r"in\.parquet: column 'text' holds int64, not text \(a string or binary column\)"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_is_named_and_leaves_no_output(tmp_path, sp_model, name, writer, records, error, message, workers):
    src = writer(tmp_path / name, records)
    with pytest.raises(error, match=message):
        _run(src, sp_model, tmp_path / "out", workers=workers, chunk_lines=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_empty_and_unreadable_parquet_and_bad_utf8_in_zst(tmp_path, sp_model):
    empty = write_parquet(tmp_path / "empty.parquet", [], schema=pa.schema([("text", pa.string())]))
    with pytest.raises(BadRecord, match=r"empty\.parquet: empty file \(no rows\)"):
        _run(empty, sp_model, tmp_path / "o1")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all")
    with pytest.raises(CorruptInput, match=r"junk\.parquet: not a readable Parquet file"):
        _run(junk, sp_model, tmp_path / "o2")
    z = tmp_path / "bad.jsonl.zst"
    z.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'))
    with pytest.raises(BadRecord, match=r"bad\.jsonl\.zst:2: not valid UTF-8"):
        _run(z, sp_model, tmp_path / "o3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl.zst", "empty.parquet", "junk.parquet"]


def test_a_binary_parquet_column_is_read_as_utf8_text_and_a_numeric_one_is_refused_even_when_skipping(tmp_path, sp_model):
    """A binary column used to give a bad record per row ("bytes, not a string"), and a numeric one too:
    with --skip-bad-records both dropped the whole file with only a count to show for it."""
    texts = [t for t in TEXTS[:40]] + ["wörld ✓"]
    as_text = write_parquet(tmp_path / "s.parquet", [{"text": t} for t in texts])
    as_bytes = write_parquet(tmp_path / "b.parquet", [{"text": t.encode()} for t in texts] + [{"text": b"\xff"}],
                             schema=pa.schema([("text", pa.binary())]))
    as_dict = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), as_dict)
    expected = _run(as_text, sp_model, tmp_path / "s")
    stats = _run(as_bytes, sp_model, tmp_path / "b", skip_bad_records=True)
    assert (stats.documents, stats.bad_locations) == (expected.documents, [f"{as_bytes}:row {len(texts) + 1}"])
    _run(as_dict, sp_model, tmp_path / "d")
    tokens = {name: (tmp_path / f"{name}_text_document.bin").read_bytes() for name in "sbd"}
    assert tokens["b"] == tokens["s"] == tokens["d"] and tokens["s"]
    numbers = write_parquet(tmp_path / "n.parquet", [{"text": 1.5}, {"text": 2.0}])
    with pytest.raises(CorruptInput, match=r"n\.parquet: column 'text' holds double, not text"):
        _run(numbers, sp_model, tmp_path / "n", skip_bad_records=True)
    assert not list(tmp_path.glob("n_*"))


def test_a_parquet_text_column_named_twice_is_refused_naming_the_file_and_column(tmp_path, sp_model):
    """Parquet (and pyarrow) allow two columns of one name: which one is the text was a guess (it ended in
    pyarrow's KeyError and a traceback). A repeated column that is not a key is not read and does no harm."""
    twice = tmp_path / "twice.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), pa.array(["c"])],
                                        names=["text", "id", "text"]), twice)
    with pytest.raises(CorruptInput, match=rf"^{twice}: column 'text' appears 2 times \(columns number 1, 3 of 3\)"):
        _run(twice, sp_model, tmp_path / "t", skip_bad_records=True)
    assert not list(tmp_path.glob("t_*"))
    ids_twice = tmp_path / "ids.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a b"]), pa.array([1]), pa.array([2])],
                                        names=["text", "id", "id"]), ids_twice)
    assert _run(ids_twice, sp_model, tmp_path / "i").documents == 1


def test_skip_bad_records_in_parquet_and_zst(tmp_path, sp_model):
    rows = [{"text": "fine"}, {"text": None}, {"text": ""}, {"text": "also fine"}, {"text": None}]
    stats = _run(write_parquet(tmp_path / "p.parquet", rows), sp_model, tmp_path / "p", skip_bad_records=True)
    assert (stats.documents, stats.empty_documents, stats.bad_records) == (2, 1, 2)
    assert stats.bad_locations == [f"{tmp_path}/p.parquet:row 2", f"{tmp_path}/p.parquet:row 5"]
    src = write_zst(tmp_path / "z.jsonl.zst", [{"text": "a"}, "{bad", {"text": "b"}])
    stats = _run(src, sp_model, tmp_path / "z", skip_bad_records=True)
    assert (stats.documents, stats.bad_records, stats.bad_locations) == (2, 1, [f"{src}:2"])


def test_a_truncated_file_stops_even_when_skipping_bad_records(tmp_path, sp_model):
    src = _truncated(write_gz)(tmp_path / "t.jsonl.gz", GOOD)
    with pytest.raises(CorruptInput):
        _run(src, sp_model, tmp_path / "out", skip_bad_records=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl.gz"]


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_json_with_workers(tmp_path, hf_tokenizer_json):
    from tokenizers import Tokenizer

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    stats = _run(src, str(hf_tokenizer_json), tmp_path / "out", workers=2, chunk_lines=20)
    ref = Tokenizer.from_file(str(hf_tokenizer_json))
    eod = ref.token_to_id("<|endoftext|>")
    expected = [ref.encode(t, add_special_tokens=False).ids + [eod] for t in TEXTS]
    assert _datasets(tmp_path / "out_text_document") == expected
    assert stats.tokens == sum(map(len, expected))
    assert HFTokenizer(hf_tokenizer_json.parent).eod == eod  # a directory holding tokenizer.json works too
    with pytest.raises(ValueError, match=r"no end-of-document token '<eos>' in the vocabulary"):
        HFTokenizer(hf_tokenizer_json, eod_token="<eos>")


def test_shards_concatenate_to_the_unsharded_output(tmp_path, sp_model):
    records = [{"text": t, "title": t[:12]} for t in TEXTS]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    _run(src, sp_model, tmp_path / "whole", json_keys=("text", "title"))
    stats = _run(src, sp_model, tmp_path / "sh", json_keys=("text", "title"), max_shard_tokens=1500, workers=2)
    for key in ("text", "title"):
        shards = sorted(tmp_path.glob(f"sh_{key}_document_*.idx"))
        assert len(shards) > 2
        joined = [doc for s in shards for doc in _datasets(str(s)[:-4])]
        assert joined == _datasets(tmp_path / f"whole_{key}_document")
    sizes = [sum(map(len, _datasets(str(s)[:-4]))) for s in sorted(tmp_path.glob("sh_text_document_*.idx"))]
    assert all(s >= 1500 for s in sizes[:-1])  # every shard but the last reached the limit
    assert len(stats.outputs) == 2 * len(sizes)


def test_a_failure_after_finished_shards_removes_them(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS] + ["{broken"])
    with pytest.raises(BadRecord, match=rf"in\.jsonl:{len(TEXTS) + 1}: malformed JSON"):
        _run(src, sp_model, tmp_path / "sh", max_shard_tokens=500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_cli_expands_globs_and_directories(tmp_path, sp_model):
    d = tmp_path / "corpus"
    d.mkdir()
    write_zst(d / "b.jsonl.zst", [{"text": t} for t in TEXTS[100:]])
    write_gz(d / "a.jsonl.gz", [{"text": t} for t in TEXTS[:100]])
    (d / "README.txt").write_text("not a corpus file")
    write_jsonl(tmp_path / "ref.jsonl", [{"text": t} for t in TEXTS])
    _run(tmp_path / "ref.jsonl", sp_model, tmp_path / "ref")
    for spec, out in ((str(d), "dir"), (str(d / "*.jsonl.*"), "glob")):
        r = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", spec,
                            "--tokenizer-model", sp_model, "--output-prefix", str(tmp_path / out),
                            "--append-eod", "--no-progress"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert _datasets(tmp_path / f"{out}_text_document") == _datasets(tmp_path / "ref_text_document")
    r = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(tmp_path / "nothing*"),
                        "--tokenizer-model", sp_model, "--output-prefix", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no corpus files match" in r.stderr
    assert np.all([not p.name.startswith("x_") for p in tmp_path.iterdir()])


def test_tokenizer_trains_on_every_format_alike(tmp_path):
    from megatron_osp.data.tokenizer import SentencePieceTokenizer

    records = [{"text": t} for t in TEXTS]
    sources = [write_jsonl(tmp_path / "c.jsonl", records), write_zst(tmp_path / "c.jsonl.zst", records),
               write_parquet(tmp_path / "c.parquet", records)]
    models = [train_sentencepiece(src, tmp_path / f"tok_{i}", vocab_size=300, sample_documents=250)
              for i, src in enumerate(sources)]
    encoded = [SentencePieceTokenizer(m).encode(TEXTS[-1]) for m in models]
    assert encoded[0] == encoded[1] == encoded[2]
    bad = write_zst(tmp_path / "bad.jsonl.zst", records[:5] + ["{nope"])
    with pytest.raises(ValueError, match=r"bad\.jsonl\.zst:6: malformed JSON"):
        train_sentencepiece(bad, tmp_path / "tok_bad", vocab_size=300)
    assert not list(tmp_path.glob("tok_bad*"))


def test_a_parquet_file_without_a_text_column_is_refused_before_any_file_is_read(tmp_path, sp_model):
    """A Parquet file's missing, repeated or non-text column was found only when the run reached the file,
    after tokenizing every file before it (hours), and `--plan` (which the SLURM example runs before
    queueing) passed it. Its footer names its columns: checked with the inputs' form, before any work."""
    from megatron_osp.data.readers import check_corpus_form

    good = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:5]])
    cases = {
        "nokey.parquet": (pa.table({"content": ["x"]}), r"missing column 'text' \(columns: content\)"),
        "ints.parquet": (pa.table({"text": [1, 2]}), r"column 'text' holds int64, not text"),
        "twice.parquet": (pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]),
                          r"column 'text' appears 2 times"),
    }
    for name, (table, message) in cases.items():
        pq.write_table(table, tmp_path / name)
        with pytest.raises(CorruptInput, match=rf"^{tmp_path / name}: {message}"):
            check_corpus_form([good, tmp_path / name], ["text"])
    check_corpus_form([good, write_parquet(tmp_path / "ok.parquet", [{"text": "x", "n": 1}])], ["text"])
    r = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(good),
                        str(tmp_path / "nokey.parquet"), "--tokenizer-model", sp_model, "--output-prefix",
                        str(tmp_path / "out" / "o"), "--num-tasks", "2", "--plan"], capture_output=True, text=True)
    assert r.returncode == 1 and f"{tmp_path / 'nokey.parquet'}: missing column 'text'" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_an_empty_input_file_is_refused_before_any_file_is_read(tmp_path):
    """An empty file stops the run (never skipped), but was found only when the run reached it, after
    tokenizing the files before it; `--plan` passed it. A failed download leaves one among many."""
    from megatron_osp.data.readers import check_corpus_form

    good = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:5]])
    (tmp_path / "zero.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \r\n")
    write_gz(tmp_path / "blank.jsonl.gz", ["", " "])
    write_zst(tmp_path / "zero.jsonl.zst", [])
    write_parquet(tmp_path / "rows.parquet", [], schema=pa.schema([("text", pa.string())]))
    cases = {"zero.jsonl": ":1: empty file$", "blank.jsonl": r":1: empty file \(blank lines only\)",
             "blank.jsonl.gz": r":1: empty file \(blank lines only\)", "zero.jsonl.zst": ":1: empty file$",
             "rows.parquet": r": empty file \(no rows\)"}
    for name, message in cases.items():
        with pytest.raises(BadRecord, match=rf"^{tmp_path / name}{message}"):
            check_corpus_form([good, tmp_path / name], ["text"])
    check_corpus_form([good, write_gz(tmp_path / "ok.jsonl.gz", ["", {"text": "x"}])], ["text"])


def test_a_file_whose_first_record_is_bad_stops_the_run_before_any_file_is_read(tmp_path, sp_model):
    """A shard exported with another key ('content' for 'text') stopped a run that does not skip bad records
    at its first line, but only once the run reached it, after every file before it; `--plan` passed it.
    With --skip-bad-records its records are skipped and counted as before."""
    from megatron_osp.data.readers import check_corpus_form

    good = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:5]])
    other = tmp_path / "b.jsonl.gz"
    other.write_bytes(gzip.compress(b"\xef\xbb\xbf\n  \n" + _lines([{"content": "x"}, {"text": "y"}])))
    r = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(good), str(other),
                        "--tokenizer-model", sp_model, "--output-prefix", str(tmp_path / "out" / "o"), "--plan"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"{other}:3: missing key 'text'" in r.stderr, r.stdout + r.stderr
    with pytest.raises(BadRecord, match=rf"^{other}:3: missing key 'text'$"):
        check_corpus_form([good, other], ["text"], first_records=True)
    check_corpus_form([good, other], ["text"])  # skipping bad records: reading skips it
    assert _run(other, sp_model, tmp_path / "o", skip_bad_records=True).bad_locations == [f"{other}:3"]
    bom_then_record = tmp_path / "c.jsonl"
    bom_then_record.write_bytes(b"\xef\xbb\xbf\n" + _lines([{"text": "fine"}]))
    check_corpus_form([bom_then_record], ["text"], first_records=True)
