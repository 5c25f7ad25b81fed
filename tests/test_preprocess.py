"""Corpus -> tokenizer -> indexed dataset, and every kind of bad input stops cleanly with file:line."""

import gzip
import json

import numpy as np
import pytest

from megatron_osp.data.builtin_corpus import write_corpus
from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.preprocess import BadRecord, preprocess
from megatron_osp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    n_docs, n_chars = write_corpus(d / "corpus.jsonl", max_documents=400)
    assert n_docs == 400 and n_chars > 100_000
    return str(train_sentencepiece(d / "corpus.jsonl", d / "tok", vocab_size=512))


def test_tokenizer_round_trips_text(tokenizer_model):
    tok = SentencePieceTokenizer(tokenizer_model)
    assert tok.vocab_size == 512 and tok.eod == 2 and tok.pad == -1
    text = "Return the absolute value of a number. Ünïcödé falls back to bytes: 漢字"
    assert tok.decode(tok.encode(text)) == text


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_preprocess_writes_what_the_tokenizer_produces(tmp_path, tokenizer_model):
    texts = ["hello world, this is a test", "", "another document with words", "x"]
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    prefix = str(tmp_path / "out")
    stats = preprocess([str(src)], tokenizer_model, prefix, append_eod=True, workers=2, progress=False)
    assert (stats.documents, stats.empty_documents) == (3, 1)
    tok = SentencePieceTokenizer(tokenizer_model)
    ds = IndexedDataset(prefix + "_text_document")
    kept = [t for t in texts if t]
    assert len(ds) == 3
    for i, t in enumerate(kept):
        np.testing.assert_array_equal(ds[i], tok.encode(t) + [tok.eod])
    assert stats.tokens == ds.num_tokens


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"text": "ok"}, "{not json"], "in.jsonl:2: malformed JSON"),
        ([{"text": "ok"}, {"body": "x"}], "in.jsonl:2: missing key 'text'"),
        ([{"text": 5}], "in.jsonl:1: key 'text' is a number, not a string"),
        ([[1, 2]], "in.jsonl:1: expected a JSON object, got an array"),
        ([], "in.jsonl:1: empty file"),
    ],
)
def test_bad_input_stops_with_location_and_leaves_no_output(tmp_path, tokenizer_model, records, message):
    src = _jsonl(tmp_path / "in.jsonl", records)
    with pytest.raises(BadRecord, match=message):
        preprocess([src], tokenizer_model, str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_non_utf8_input_is_named(tmp_path, tokenizer_model):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadRecord, match="in.jsonl:2: not valid UTF-8"):
        preprocess([str(src)], tokenizer_model, str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_skip_bad_records_counts_and_locates_them(tmp_path, tokenizer_model):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "good one"}, "{bad", {"text": None}, {"text": "good two"}])
    with open(src, "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n{"text": "good three"}\n')
    stats = preprocess([src], tokenizer_model, str(tmp_path / "out"), skip_bad_records=True, progress=False)
    assert stats.documents == 3 and stats.bad_records == 3
    assert stats.bad_locations == [f"{src}:2", f"{src}:3", f"{src}:5"]
    assert "bad records skipped: 3" in stats.summary()
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 3


def test_cli_reports_error_and_exit_code(tmp_path, tokenizer_model):
    import subprocess
    import sys

    src = _jsonl(tmp_path / "in.jsonl", [{"text": "ok"}, "{oops"])
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", src, "--tokenizer-model", tokenizer_model,
         "--output-prefix", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert f"{src}:2: malformed JSON" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"text": "ok"}] * 600 + ["{not json"], r"in.jsonl:601: malformed JSON"),
        ([], "in.jsonl:1: empty file"),
    ],
)
def test_bad_input_with_workers_stops_the_same_way(tmp_path, tokenizer_model, records, message):
    src = _jsonl(tmp_path / "in.jsonl", records)
    with pytest.raises(BadRecord, match=message):
        preprocess([src], tokenizer_model, str(tmp_path / "out"), workers=2, chunk_lines=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_workers_keep_document_order_across_files(tmp_path, tokenizer_model):
    texts = [f"document number {i} " + "word " * (i % 7) for i in range(500)]
    a = _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:300]])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[300:]])
    stats = preprocess([a, b], tokenizer_model, str(tmp_path / "out"), workers=2, chunk_lines=16, progress=False)
    assert stats.documents == 500
    tok = SentencePieceTokenizer(tokenizer_model)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    for i in (0, 17, 299, 300, 499):
        np.testing.assert_array_equal(ds[i], tok.encode(texts[i]) + [tok.eod])


def test_tokenizer_cli_and_prefix_with_a_dot(tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "corpus.jsonl"
    assert subprocess.run([sys.executable, "tools/builtin_corpus.py", "--output", str(corpus),
                           "--max-documents", "150"], capture_output=True, text=True).returncode == 0
    assert len(corpus.read_text().splitlines()) == 150
    proc = subprocess.run(
        [sys.executable, "tools/train_tokenizer.py", "--input", str(corpus), "--output-prefix",
         str(tmp_path / "tok.v2"), "--vocab-size", "400", "--model-type", "unigram"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "tok.v2.model", "tok.v2.vocab"]
    assert SentencePieceTokenizer(tmp_path / "tok.v2.model").vocab_size == 400


def test_tokenizer_training_names_a_malformed_line(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"text": "fine text here"}] * 50 + ["{broken"])
    with pytest.raises(ValueError, match="c.jsonl:51: malformed JSON"):
        train_sentencepiece(src, tmp_path / "tok", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


@pytest.mark.parametrize("append_eod, max_shard_tokens", [(True, None), (False, 700)])
def test_word_cache_writes_the_same_bytes_as_sentencepiece(tmp_path, tokenizer_model, append_eod, max_shard_tokens):
    """Two keys, empty documents (in one key or both), shards: the fast path changes nothing."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "the", "  indented", "Ünïcödé", "漢字", "\n\n", "value,", "x=1;", "🙂"]
    records = []
    for i in range(300):
        text = " ".join(rng.choice(words, int(rng.integers(0, 30))))
        title = "" if i % 7 == 0 else f"Title {i}"
        records.append({"text": "" if i % 11 == 0 else text, "title": title})
    src = _jsonl(tmp_path / "in.jsonl", records)
    outputs = {}
    for word_cache in (True, False):
        prefix = str(tmp_path / f"out_{word_cache}")
        stats = preprocess([src], tokenizer_model, prefix, json_keys=("text", "title"), append_eod=append_eod,
                           workers=2, progress=False, max_shard_tokens=max_shard_tokens, word_cache=word_cache,
                           chunk_lines=37)
        outputs[word_cache] = (stats, [open(p + ext, "rb").read() for p in stats.outputs for ext in (".bin", ".idx")])
    (s1, b1), (s2, b2) = outputs[True], outputs[False]
    assert (s1.documents, s1.tokens, s1.empty_documents) == (s2.documents, s2.tokens, s2.empty_documents)
    tok = SentencePieceTokenizer(tokenizer_model, word_cache=False)
    assert s1.empty_documents == sum(not tok.encode(r["text"]) and not tok.encode(r["title"]) for r in records) >= 4
    assert len(b1) == len(b2) and all(x == y for x, y in zip(b1, b2))
    assert len(s1.outputs) == 2 if max_shard_tokens is None else len(s1.outputs) > 4


def test_every_key_of_a_kept_document_ends_with_eod(tmp_path, tokenizer_model):
    """A document is dropped only if all its keys are empty; otherwise each key gets its EOD."""
    records = [{"text": "hello world", "title": ""}, {"text": "", "title": ""},
               {"text": "", "title": "only a title"}, {"text": "a b c", "title": "t"}]
    src = _jsonl(tmp_path / "in.jsonl", records)
    stats = preprocess([src], tokenizer_model, str(tmp_path / "o"), json_keys=("text", "title"), progress=False)
    assert (stats.documents, stats.empty_documents) == (3, 1)
    tok = SentencePieceTokenizer(tokenizer_model, word_cache=False)
    for key in ("text", "title"):
        ds = IndexedDataset(str(tmp_path / f"o_{key}_document"))
        expected = [tok.encode(r[key]) + [tok.eod] for r in records if r["text"] or r["title"]]
        assert [ds[i].tolist() for i in range(len(ds))] == expected


def test_builtin_corpus_options_that_leave_no_document_write_nothing(tmp_path, monkeypatch):
    """They used to write an empty corpus (exit 0) over an earlier one, which preprocessing then refused;
    an output that is a directory or cannot be made ended in a traceback."""
    import subprocess
    import sys

    from megatron_osp.data import builtin_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "earlier corpus"}\n')
    (tmp_path / "d").mkdir()
    for output, options, rc, message in ((corpus, ["--max-documents", "0"], 2,
                                          "argument --max-documents: must be at least 1, got 0"),
                                         (tmp_path / "d", [], 1, "d: Is a directory")):
        r = subprocess.run([sys.executable, "tools/builtin_corpus.py", "--output", str(output), *options],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == rc and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    monkeypatch.setattr(builtin_corpus, "iter_documents", lambda *a: iter(()))  # a --min-chars nothing reaches
    with pytest.raises(ValueError, match="no docstring of this Python has 1000 characters or more"):
        builtin_corpus.write_corpus(corpus, min_chars=1000)
    assert corpus.read_text() == '{"text": "earlier corpus"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "d"] and not list((tmp_path / "d").iterdir())
