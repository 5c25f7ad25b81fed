"""Corpus files as real-world tools write them: each variant gives the documents of the same plain
JSON-lines file, or the README's stated error.

- .zst from a stream with a long window (``cat x | zstd --long=31``: the frame declares its window,
  beyond the library's default 128 MiB limit), several frames, skippable frames (pzstd);
- .gz of several members (``cat a.gz b.gz``);
- Parquet with the text as large_string, dictionary-encoded, over several row groups, next to a nested
  column.
"""

import gzip
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.preprocess import BadRecord, preprocess
from megatron_osp.data.tokenizer import train_sentencepiece

TEXTS = [f"doc {i}: the quick brown fox é漢 " * (1 + i % 4) for i in range(40)]


def _lines(texts=TEXTS) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _docs(src, model, out, **kw):
    preprocess([str(src)], model, str(out), progress=False, chunk_lines=16, **kw)
    ds = IndexedDataset(f"{out}_text_document")
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def plain(sp_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    (d / "c.jsonl").write_bytes(_lines())
    return _docs(d / "c.jsonl", sp_model, d / "o")


def _zst_stream(data: bytes, window_log: int) -> bytes:
    """As ``cat file | zstd --long=N`` writes: the content size unknown, so the frame declares the whole window."""
    params = zstandard.ZstdCompressionParameters(window_log=window_log)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as w:
        w.write(data)
    return out.getvalue()


def _skippable(payload: bytes) -> bytes:
    return (0x184D2A50).to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


def _frames(data: bytes) -> bytes:
    """pzstd-like: frames cut mid-line, each after a skippable frame, and an empty frame."""
    c = zstandard.ZstdCompressor()
    cut = [0, 7, len(data) // 2, len(data)]
    return b"".join(_skippable(b"size") + c.compress(data[a:b]) for a, b in zip(cut, cut[1:])) + c.compress(b"")


def _gz_members(data: bytes) -> bytes:
    """``cat a.gz b.gz c.gz``, cut mid-line, with an empty member."""
    cut = len(data) // 3
    return gzip.compress(data[:cut]) + gzip.compress(b"") + gzip.compress(data[cut:])


@pytest.mark.parametrize("name, make", [
    ("long.jsonl.zst", lambda d: _zst_stream(d, 28)),
    ("frames.jsonl.zst", _frames),
    ("members.jsonl.gz", _gz_members),
])
def test_compressed_variants_give_the_plain_documents(tmp_path, sp_model, plain, name, make):
    src = tmp_path / name
    src.write_bytes(make(_lines()))
    if name.startswith("long"):
        assert zstandard.get_frame_parameters(src.read_bytes()).window_size == 1 << 28
    assert _docs(src, sp_model, tmp_path / "o") == plain


@pytest.mark.parametrize("column", [
    pa.array(TEXTS, pa.large_string()),
    pa.array(TEXTS).dictionary_encode(),
    pa.array(TEXTS, pa.string_view()),
])
def test_parquet_text_columns_of_every_string_type_give_the_plain_documents(tmp_path, sp_model, plain, column):
    nested = pa.array([{"source": "web", "tags": ["a", "b"][: i % 3]} for i in range(len(TEXTS))])
    src = tmp_path / "c.parquet"
    pq.write_table(pa.table({"meta": nested, "text": column}), src, row_group_size=7)
    assert pq.ParquetFile(src).metadata.num_row_groups == 6
    assert _docs(src, sp_model, tmp_path / "o") == plain


@pytest.mark.parametrize("name, compress", [("bom.jsonl", bytes), ("bom.jsonl.gz", gzip.compress),
                                            ("bom.jsonl.zst", zstandard.ZstdCompressor().compress)])
def test_a_utf8_byte_order_mark_opening_the_file_is_not_part_of_the_first_record(tmp_path, sp_model, plain, name,
                                                                                  compress):
    src = tmp_path / name
    src.write_bytes(compress(b"\xef\xbb\xbf" + _lines()))
    assert _docs(src, sp_model, tmp_path / "o") == plain


def _with_blank_lines(data: bytes) -> bytes:
    """CRLF endings, blank lines (empty, spaces and tabs, a lone CR) between records, two at the end,
    the last record without a newline."""
    lines = data.decode().splitlines()
    blank = ["", "   ", "\t", "\r", " \t "]
    out = [line + "\r\n" + blank[i % 5] + ("\n" if i % 3 == 0 else "") for i, line in enumerate(lines)]
    return ("".join(out) + "\n\n" + '{"text": "last"}').encode()


@pytest.mark.parametrize("workers", [1, 2])
def test_blank_lines_hold_no_record_and_are_skipped(tmp_path, sp_model, plain, workers):
    """README: blank lines are not records (not bad records either); line numbers still count them."""
    from megatron_osp.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(sp_model)
    src = tmp_path / "c.jsonl.gz"
    src.write_bytes(gzip.compress(_with_blank_lines(_lines())))
    assert _docs(src, sp_model, tmp_path / "o", workers=workers) == plain + [tok.encode("last") + [tok.eod]]
    stats = preprocess([str(src)], sp_model, str(tmp_path / "s"), progress=False, skip_bad_records=True)
    assert (stats.documents, stats.bad_records) == (len(TEXTS) + 1, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a"}\n\n  \n{oops\n')
    with pytest.raises(BadRecord, match=r"bad\.jsonl:4: malformed JSON"):
        preprocess([str(bad)], sp_model, str(tmp_path / "b"), progress=False)


@pytest.mark.parametrize("skip", [False, True])
def test_a_file_of_blank_lines_only_is_an_empty_file(tmp_path, sp_model, skip):
    good, blank = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_bytes(_lines())
    blank.write_bytes(b"\xef\xbb\xbf\r\n\n   \n")
    with pytest.raises(BadRecord, match=r"b\.jsonl:1: empty file \(blank lines only\)"):
        preprocess([str(good), str(blank)], sp_model, str(tmp_path / "o"), progress=False, skip_bad_records=skip)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_tokenizer_training_skips_blank_lines(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_bytes(_with_blank_lines(_lines()))
    model = train_sentencepiece(src, tmp_path / "tok", vocab_size=300)
    assert model.exists()


def test_a_key_given_twice_takes_its_last_value_and_null_or_non_objects_are_bad_records(tmp_path, sp_model):
    """README: the last value of a repeated key (as Python's json and Megatron-LM); a null text, an
    array or a number line are bad records, named, or skipped and counted."""
    from megatron_osp.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(sp_model)
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "first", "id": 1, "text": "second"}\n{"text": null}\n["text"]\n7\n{"text": "ok"}\n')
    with pytest.raises(BadRecord, match=r"c\.jsonl:2: key 'text' is null, not a string"):
        preprocess([str(src)], sp_model, str(tmp_path / "o"), progress=False)
    stats = preprocess([str(src)], sp_model, str(tmp_path / "o"), progress=False, skip_bad_records=True)
    assert stats.bad_locations == [f"{src}:{i}" for i in (2, 3, 4)]
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in ("second", "ok")]


@pytest.mark.parametrize("name, encode, holds", [
    ("c.jsonl.bz2", lambda d: __import__("bz2").compress(d), "bzip2-compressed data"),
    ("c.jsonl.xz", lambda d: __import__("lzma").compress(d), "xz-compressed data"),
    ("c.jsonl", gzip.compress, "gzip-compressed data"),  # downloaded without its .gz
    ("c.json", lambda d: d.decode().encode("utf-16"), "UTF-16 text"),  # PowerShell 5's `>`
])
@pytest.mark.parametrize("skip", [False, True])
def test_a_file_that_is_not_json_lines_text_is_named_not_read_as_garbage_lines(tmp_path, sp_model, name, encode, holds,
                                                                              skip):
    """Read as plain lines, such a file was bad UTF-8 at line 1, or with --skip-bad-records a run of
    skipped 'bad records' and none of its documents."""
    from megatron_osp.data.preprocess import CorruptInput

    src = tmp_path / name
    src.write_bytes(encode(_lines()))
    with pytest.raises(CorruptInput, match=rf"{name}: holds {holds}, not JSON lines"):
        preprocess([str(src)], sp_model, str(tmp_path / "o"), progress=False, skip_bad_records=skip)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_directory_input_lists_every_file_the_readers_read(tmp_path):
    """NDJSON, .zstd and upper-case names were read when named but silently left out of a directory."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("preprocess_data", Path(__file__).parents[1] / "tools/preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    names = ["a.jsonl", "b.ndjson", "c.jsonl.zstd", "D.JSONL.GZ", "e.ndjson.gz", "f.parquet", "g.json.zst"]
    for name in names + ["notes.txt", "out_text_document.shards.json", "out_text_document.bin"]:
        (tmp_path / name).touch()
    assert tool.expand_inputs([str(tmp_path)]) == sorted(str(tmp_path / n) for n in names)


def test_an_input_file_named_with_glob_characters_is_read_as_named(tmp_path):
    """``data[1].jsonl`` given by name was expanded as a pattern, to ``data1.jsonl``: another file was
    tokenized in its place, silently. A name that exists is the file; a pattern still expands."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("preprocess_data", Path(__file__).parents[1] / "tools/preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name in ("data[1].jsonl", "data1.jsonl", "what?.jsonl", "whatX.jsonl"):
        (tmp_path / name).touch()
    assert tool.expand_inputs([str(tmp_path / "data[1].jsonl")]) == [str(tmp_path / "data[1].jsonl")]
    assert tool.expand_inputs([str(tmp_path / "what?.jsonl")]) == [str(tmp_path / "what?.jsonl")]
    assert tool.expand_inputs([str(tmp_path / "data[0-9].jsonl")]) == [str(tmp_path / "data1.jsonl")]
    assert tool.expand_inputs([str(tmp_path / "what*.jsonl")]) == sorted(
        str(tmp_path / n) for n in ("what?.jsonl", "whatX.jsonl"))


def test_a_directory_input_follows_linked_subdirectories_and_refuses_broken_links(tmp_path):
    """A subdirectory that is a symbolic link (a corpus spread over disks) was left out of a directory
    input without a word, and so was a broken link to a corpus file; a glob or a name refused the latter."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("preprocess_data", Path(__file__).parents[1] / "tools/preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.jsonl").touch()
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").touch()
    (d / "disk2").symlink_to(tmp_path / "elsewhere")
    (d / "back").symlink_to(d)  # a link back up: walked once, not forever
    assert tool.expand_inputs([str(d)]) == [str(d / "a.jsonl"), str(d / "disk2" / "b.jsonl")]
    (d / "c.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{d / 'c.jsonl'}: a broken symbolic link")):
        tool.expand_inputs([str(d)])


@pytest.mark.parametrize("name, compress, inside", [
    ("corpus.tar.gz", gzip.compress, " inside its gzip compression"),
    ("corpus.tar.zst", lambda d: zstandard.ZstdCompressor().compress(d), " inside its zstd compression"),
    ("corpus.jsonl", lambda d: d, ""),
])
def test_a_tar_archive_of_json_lines_is_refused_not_read_as_lines(tmp_path, sp_model, name, compress, inside):
    """A .tar.gz of JSON-lines files is picked up as a .gz (in a directory input too). Read as lines, each
    member's first line was glued to its tar header and its last to the padding: with --skip-bad-records
    those documents were dropped as 'bad records' and the rest written, the archive never named."""
    import tarfile

    from megatron_osp.data.preprocess import CorruptInput

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            data = _lines(TEXTS[i * 5:(i + 1) * 5])
            info = tarfile.TarInfo(f"part{i}.jsonl")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = tmp_path / name
    src.write_bytes(compress(buf.getvalue()))
    with pytest.raises(CorruptInput, match=rf"{name}: holds a tar archive{inside}, not JSON lines \(extract"):
        preprocess([str(src)], sp_model, str(tmp_path / "o"), progress=False, skip_bad_records=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    double = tmp_path / "double.jsonl.gz"
    double.write_bytes(gzip.compress(gzip.compress(_lines())))
    with pytest.raises(CorruptInput, match=r"double\.jsonl\.gz: holds gzip-compressed data inside its gzip"):
        preprocess([str(double)], sp_model, str(tmp_path / "o"), progress=False, skip_bad_records=True)
