"""Property-based tests (hypothesis) of the readers and preprocessing, against a small oracle.

Random files (random bytes, random JSON, random Unicode with lone surrogates, as JSON escapes and as
raw CESU-8 bytes), plain/.gz/.zst, whole or truncated at a random byte: every outcome is either the
right output (ids equal to SentencePiece's own encode of each text, EOD appended, empty documents
dropped) or an error that names ``file:line`` (the first bad line) or, for a damaged compressed
stream, the file, and leaves no file behind.
"""

import gzip
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.preprocess import BadRecord, preprocess
from megatron_osp.data.readers import _binary_kind, record_chunks
from megatron_osp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

# Small and fixed for CI; OSP_HYPOTHESIS_EXAMPLES=500 searches further, with fresh random examples.
_DEEP = int(os.environ.get("OSP_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_DEEP or 30, deadline=None, derandomize=not _DEEP,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

any_char = st.characters(codec=None, exclude_categories=())  # surrogates and controls included
texts = st.one_of(
    st.text(alphabet=any_char, max_size=30),
    st.text(alphabet="abc xyz\n\t.,é漢", max_size=60),
    st.builds(lambda a, s, b: a + s + b,
              st.text(max_size=10), st.integers(0xD800, 0xDFFF).map(chr), st.text(max_size=10)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: (st.lists(inner, max_size=3)
                   | st.dictionaries(st.sampled_from(["text", "id", "x"]), inner, max_size=3)),
    max_leaves=6,
)


def _encode_json(value, ascii_: bool) -> bytes:
    # ensure_ascii=False keeps a surrogate as a character; surrogatepass writes its (invalid) bytes.
    return json.dumps(value, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")


BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark
lines = st.one_of(
    st.builds(lambda t, a: _encode_json({"text": t, "id": 1}, a), texts, st.booleans()),  # usually good
    st.builds(lambda t, a: _encode_json({"text": t}, a), texts, st.booleans()),
    st.builds(_encode_json, json_values, st.booleans()),  # random JSON, mostly bad
    st.binary(max_size=24),  # random bytes
    st.sampled_from([b"", b"  ", b"\r", b" \t\r"]),  # blank lines: no record
)
files = st.builds(lambda bom, ls, nl: bom + b"\n".join(ls) + (b"\n" if nl else b""),
                  st.sampled_from([b"", b"", b"", BOM]), st.lists(lines, min_size=0, max_size=8), st.booleans())
MAX_LINES = 8


@pytest.fixture(scope="module")
def sp(sp_model):
    return SentencePieceTokenizer(sp_model, word_cache=False)  # SentencePiece itself: the reference


def _record(raw: bytes) -> bool:
    """Whether a line holds a record: one of JSON whitespace only is blank."""
    return bool(raw.strip(b" \t\r\n"))


def oracle(data: bytes, path: str, tok):
    """('ok', documents, bad line numbers) or ('bad', location, reason words) for a JSON-lines file."""
    if _binary_kind(data[:512]):  # a file holding gzip, UTF-16, a tar, ... (inside its compression too): refused
        return "bad", f"{path}: ", "not JSON lines", []
    raw_lines = data.split(b"\n")
    if data.endswith(b"\n"):
        raw_lines.pop()
    if raw_lines and raw_lines[0].startswith(BOM):  # a byte-order mark opening the file is dropped
        raw_lines[0] = raw_lines[0][len(BOM):]
    if not any(map(_record, raw_lines)):
        return "bad", f"{path}:1: ", "empty file", []
    docs, bad, first_bad = [], [], None
    for i, raw in enumerate(raw_lines, start=1):
        if not _record(raw):
            continue
        reason = None
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
            if not isinstance(record, dict):
                reason = "expected a JSON object"
            elif "text" not in record:
                reason = "missing key 'text'"
            elif not isinstance(record["text"], str):
                reason = "not a string"
            elif any(0xD800 <= ord(c) <= 0xDFFF for c in record["text"]):
                reason = "lone surrogate"
        except UnicodeDecodeError:
            reason = "not valid UTF-8"
        except ValueError:
            reason = "JSON"
        if reason is not None:
            bad.append(i)
            first_bad = first_bad or (f"{path}:{i}: ", reason)
            continue
        ids = tok.encode(record["text"])
        if ids:
            docs.append(ids + [tok.eod])
    if first_bad:
        return "bad", first_bad[0], first_bad[1], (docs, bad)
    if not docs:
        return "bad", f"{path}: ", "no non-empty documents", (docs, bad)
    return "ok", docs, None, bad


def _compress(data: bytes, fmt: str) -> bytes:
    if fmt == "jsonl.gz":
        return gzip.compress(data, mtime=0)
    if fmt == "jsonl.zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _datasets(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@SETTINGS
@given(data=files, fmt=st.sampled_from(["jsonl", "jsonl.gz", "jsonl.zst"]), skip=st.booleans())
def test_preprocessing_gives_the_right_output_or_names_the_line(sp_model, sp, data, fmt, skip):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / f"in.{fmt}"
        src.write_bytes(_compress(data, fmt))
        outcome, what, reason, extra = oracle(data, str(src), sp)
        out = Path(d) / "out" / "o"
        try:
            stats = preprocess([str(src)], sp_model, str(out), skip_bad_records=skip, progress=False, chunk_lines=3)
        except BadRecord as e:
            if skip and outcome == "bad" and extra and extra[0]:
                raise AssertionError(f"skipping should have kept {len(extra[0])} documents: {e}") from None
            if outcome == "ok":
                raise AssertionError(f"good input refused: {e}") from None
            if not skip or reason in ("empty file", "no non-empty documents", "not JSON lines"):
                assert str(e).startswith(what) and reason in str(e), (str(e), what, reason)
            else:  # every line bad or empty: nothing left to write
                assert "no non-empty documents" in str(e)
            assert sorted(p.name for p in Path(d).rglob("*")) == [src.name]
            return
        if outcome == "ok":
            docs, bad = what, extra
        else:
            assert skip, f"bad input accepted ({what}{reason})"
            docs, bad = extra
        assert _datasets(f"{out}_text_document") == docs
        assert stats.bad_records == len(bad) and stats.documents == len(docs)
        assert sorted(p.name for p in out.parent.iterdir()) == ["o_text_document.bin", "o_text_document.idx",
                                                                "o_text_document.shards.json"]


@SETTINGS
@given(data=files.filter(bool), fmt=st.sampled_from(["jsonl.gz", "jsonl.zst"]), cut=st.floats(0, 1, exclude_max=True),
       skip=st.booleans())
def test_a_truncated_compressed_file_is_named_and_leaves_nothing(sp_model, data, fmt, cut, skip):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / f"in.{fmt}"
        whole = _compress(data, fmt)
        src.write_bytes(whole[: int(len(whole) * cut)])
        with pytest.raises(BadRecord) as info:
            preprocess([str(src)], sp_model, str(Path(d) / "o"), skip_bad_records=skip, progress=False)
        assert str(info.value).startswith(str(src)), str(info.value)
        assert os.listdir(d) == [src.name]


@SETTINGS
@given(data=files, fmt=st.sampled_from(["jsonl", "jsonl.gz", "jsonl.zst"]), chunk=st.integers(1, 5))
def test_the_reader_yields_every_line_in_order_with_its_number(data, fmt, chunk):
    """Every line comes out once, in order, numbered; bad UTF-8 is a BadRecord at its line, a blank line None."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / f"in.{fmt}"
        src.write_bytes(_compress(data, fmt))
        expected = data.split(b"\n")
        if data.endswith(b"\n"):
            expected.pop()
        if expected and expected[0].startswith(BOM):
            expected[0] = expected[0][len(BOM):]
        got, numbers = [], []
        try:
            for path, first, items, _ in record_chunks(src, ["text"], chunk):
                assert path == str(src) and len(items) <= chunk
                numbers += range(first, first + len(items))
                got += items
        except BadRecord as e:
            if _binary_kind(data[:512]):
                assert str(e).startswith(f"{src}: holds ") and "not JSON lines" in str(e)
                return
            assert not any(map(_record, expected)) and str(e).startswith(f"{src}:1: empty file")
            return
        assert numbers == list(range(1, len(expected) + 1))
        for n, item, raw in zip(numbers, got, expected):
            if not _record(raw):
                assert item is None, (n, item)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                assert isinstance(item, BadRecord) and str(item).startswith(f"{src}:{n}: not valid UTF-8")
                continue
            assert item.rstrip("\n") == text


@SETTINGS
@given(rows=st.lists(st.one_of(st.none(), st.text(max_size=30)), min_size=1, max_size=12),
       chunk=st.integers(1, 5))
def test_parquet_rows_come_out_as_written(sp_model, sp, rows, chunk):
    """Parquet strings cannot hold surrogates (Arrow refuses them on write); nulls are named by row."""
    with pytest.raises(Exception):
        pa.array(["a\ud800"])
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.parquet"
        pq.write_table(pa.table({"text": pa.array(rows, type=pa.string())}), src, row_group_size=4)
        items = [item for _, _, chunk_items, _ in record_chunks(src, ["text"], chunk) for item in chunk_items]
        assert len(items) == len(rows)
        for i, (item, row) in enumerate(zip(items, rows), start=1):
            if row is None:
                assert isinstance(item, BadRecord) and str(item) == f"{src}:row {i}: key 'text' is null"
            else:
                assert item == [row]
        docs = [sp.encode(r) + [sp.eod] for r in rows if r is not None and sp.encode(r)]
        try:
            preprocess([str(src)], sp_model, str(Path(d) / "o"), skip_bad_records=True, progress=False)
        except BadRecord as e:
            assert not docs and "no non-empty documents" in str(e)
            assert os.listdir(d) == [src.name]
            return
        assert _datasets(str(Path(d) / "o_text_document")) == docs


@settings(SETTINGS, max_examples=_DEEP or 12)
@given(data=files, fmt=st.sampled_from(["jsonl", "jsonl.zst"]), skip=st.booleans())
def test_tokenizer_training_names_the_bad_line_or_trains(sp, data, fmt, skip):
    """Bad records stop training at their line (or are skipped); anything else SentencePiece refuses
    (too little text for the vocabulary) is said in our terms, never as its internal check."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / f"c.{fmt}"
        if data and not data.endswith(b"\n"):
            data += b"\n"
        data += b"".join(_encode_json({"text": t}, True) + b"\n" for t in FILLER)
        src.write_bytes(_compress(data, fmt))
        outcome, what, reason, _ = oracle(data, str(src), sp)
        try:
            model = train_sentencepiece(src, Path(d) / "tok", vocab_size=300, skip_bad_records=skip)
        except ValueError as e:
            message = str(e)
            assert "INTERNAL" not in message and "sentences_" not in message, message
            if outcome == "bad" and reason not in ("empty file", "no non-empty documents") and not skip:
                assert message.startswith(what) and reason in message, (message, what, reason)
            else:
                assert "--vocab-size 300" in message or "no text to train on" in message, message
            assert os.listdir(d) == [src.name]
            return
        assert skip or outcome == "ok", (what, reason)
        assert SentencePieceTokenizer(model).vocab_size == 300


# Appended after the random lines so that most examples have enough text for a 300-piece vocabulary.
FILLER = [f"filler line {i}: abc xyz the quick brown fox jumps over the lazy dog {i * 13}" for i in range(200)]
