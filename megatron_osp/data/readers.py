"""Corpus files as records with their locations: JSON lines (plain, .gz, .zst) and Parquet.

Every record carries ``file:line`` (``file:row N`` for Parquet) so an error can say where it is. A
record that cannot be used (bad JSON, bad UTF-8, a lone surrogate, a null) is a ``BadRecord`` the
caller may skip; a
file that cannot be read on (corrupt or truncated compressed stream, unreadable Parquet, a missing
column, a Parquet column whose type cannot hold text) raises ``CorruptInput``, which is never
skippable: what follows it is unknown. A Parquet binary column is read as UTF-8, as a string column is.

zstandard's ``stream_reader`` ends silently on a truncated frame, so .zst is decoded frame by frame
here and an unfinished frame at the end of the file is an error, not a short corpus. Frames may ask
for any window the format allows (``zstd --long=31`` on a stream: 2 GiB), not only the library's
default limit of 128 MiB, which refused them as "too much memory".
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import zlib
from pathlib import Path

READ_BYTES = 1 << 20
ZSTD_MAX_WINDOW = 1 << 31  # the largest window a zstd frame may declare (ZSTD_WINDOWLOG_MAX on 64-bit)


class BadRecord(ValueError):
    """A record that cannot be tokenized; the message is ``location: reason``."""


class CorruptInput(BadRecord):
    """The file cannot be read past this point; never skipped."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenized, or None. JSON's ``\\ud800`` escapes decode to lone surrogates,
    which are not Unicode characters: no UTF-8 form, and SentencePiece's binding cannot take them."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return f"lone surrogate \\u{ord(m.group()):04x} at character {m.start()} (not valid Unicode)"


def json_kind(value) -> str:
    """A parsed JSON value's kind in JSON's words (null, a number, an array), not Python's (NoneType, int, list)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__)


def parse_json_record(location: str, line: str, keys: list[str]) -> list[str] | BadRecord:
    """A JSON line -> its texts (one per key), or the ``BadRecord`` saying why not."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(f"{location}: malformed JSON ({e.msg} at column {e.colno})")
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits, nesting too deep
        return BadRecord(f"{location}: unreadable JSON ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(record, dict):
        return BadRecord(f"{location}: expected a JSON object, got {json_kind(record)}")
    texts = []
    for key in keys:
        if key not in record:
            return BadRecord(f"{location}: missing key {key!r}")
        if not isinstance(record[key], str):
            return BadRecord(f"{location}: key {key!r} is {json_kind(record[key])}, not a string")
        texts.append(record[key])
    if "\\u" in line:  # only an escape can give a surrogate: strict UTF-8 decoding refuses them
        for key, text in zip(keys, texts):
            problem = text_problem(text)
            if problem:
                return BadRecord(f"{location}: key {key!r} holds a {problem}")
    return texts


def input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".gz":
        return "gzip"
    if suffix in (".zst", ".zstd"):
        return "zstd"
    return "jsonl"


def _zstd_blocks(f, path: Path):
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    frame, in_frame = dctx.decompressobj(), False
    while data := f.read(READ_BYTES):
        while data:
            in_frame = True
            out = frame.decompress(data)
            if out:
                yield out
            if frame.eof:  # a file may hold several frames (pzstd, concatenated files)
                data, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
            else:
                data = b""
    if in_frame:
        raise CorruptInput(f"{path}: truncated zstd stream (the last frame is incomplete)")


def _lines_of(blocks):
    """Byte lines of decompressed blocks. A line that spans blocks is gathered as a list of its pieces,
    joined once: adding each block to it was quadratic in its length (a 128 MiB line took 9 s, 1 GiB
    minutes)."""
    pending: list[bytes] = []
    for block in blocks:
        parts = block.split(b"\n")
        if len(parts) == 1:
            pending += [block] if block else []
            continue
        if pending:
            parts[0] = b"".join(pending + [parts[0]])
        last = parts.pop()
        pending = [last] if last else []
        for part in parts:
            yield part + b"\n"
    if pending:
        yield b"".join(pending)


# How files a plain JSON-lines reader would turn into garbage lines begin (a compressed file without
# its suffix, a format not read here, Windows' UTF-16 text).
_SIGNATURES = (
    (b"\x1f\x8b", "gzip-compressed data"), (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (b"BZh", "bzip2-compressed data"), (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x04\x22\x4d\x18", "lz4-compressed data"),
    (b"PK\x03\x04", "a zip archive"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive"), (b"PAR1", "Parquet data"),
    (b"\xff\xfe", "UTF-16 text"), (b"\xfe\xff", "UTF-16 text"),
)


def _binary_kind(head: bytes) -> str | None:
    kind = next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)
    # A tar header's magic, POSIX or GNU (a NUL in it: no JSON text has one). Read as lines, a tar's members'
    # first and last lines, glued to headers, were bad records, and its other lines documents.
    if kind is None and (head[257:263] == b"ustar\x00" or head[257:265] == b"ustar  \x00"):
        return "a tar archive"
    return kind


def _refuse_binary(path: Path, head: bytes, compressed: str | None = None) -> None:
    """``CorruptInput`` if ``head`` (a file's first bytes; of a compressed one, decompressed) is a binary
    format a JSON-lines reader would turn into garbage lines."""
    kind = _binary_kind(head)
    if kind is not None:
        inside = f" inside its {compressed} compression" if compressed else ""
        hint = ("extract its files and give those as inputs" if kind == "a tar archive" else
                "plain UTF-8 text, or named .gz, .zst, .parquet for those formats")
        raise CorruptInput(f"{path}: holds {kind}{inside}, not JSON lines ({hint})")


def _raw_lines(path: Path, fmt: str):
    """Byte lines of a JSON-lines file; decompression errors become ``CorruptInput``."""
    line_no = 0
    try:
        if fmt == "gzip":
            with gzip.open(path, "rb") as f:
                _refuse_binary(path, f.peek(512)[:512], "gzip")
                for line_no, raw in enumerate(f, start=1):
                    yield raw
        elif fmt == "zstd":
            try:
                import zstandard
            except ImportError:
                raise CorruptInput(f"{path}: .zst input needs the zstandard package (pip install zstandard)") from None
            with open(path, "rb") as f:
                try:
                    blocks = _zstd_blocks(f, path)
                    first = next(blocks, b"")
                    _refuse_binary(path, first[:512], "zstd")
                    for line_no, raw in enumerate(_lines_of(itertools.chain([first], blocks)), start=1):
                        yield raw
                except zstandard.ZstdError as e:
                    raise CorruptInput(f"{path}: corrupt zstd stream after line {line_no}: {e}") from None
        else:
            with open(path, "rb") as f:
                # peek, not read and seek back: a pipe (a FIFO, /dev/stdin, bash's <(zstdcat ...)) cannot seek
                _refuse_binary(path, f.peek(512)[:512])
                yield from f
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptInput(f"{path}: corrupt or truncated gzip stream after line {line_no}: {e}") from None


_BOM = b"\xef\xbb\xbf"
_JSON_SPACE = b" \t\r\n"  # JSON's whitespace: a line of only these is blank


def jsonl_chunks(path: Path, keys: list[str], chunk_size: int):
    """``(path, first line, items, keys)``: items are decoded lines, ``BadRecord``s (bad UTF-8), or
    None for a blank line (JSON whitespace only), which holds no record and is skipped by callers.

    A UTF-8 byte-order mark opening the file (Windows editors and exporters write one) is dropped: it
    is not part of the first record, and JSON parsers refuse it. A file without a record (no lines,
    or blank ones only) is an empty file."""
    first, items, line_no, records = 1, [], 0, 0
    for line_no, raw in enumerate(_raw_lines(path, input_format(path)), start=1):
        if line_no == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if not raw.strip(_JSON_SPACE):
            items.append(None)
        else:
            records += 1
            items.append(_decode(path, line_no, raw))
        if len(items) == chunk_size:
            yield (str(path), first, items, keys)
            first, items = line_no + 1, []
    if items:
        yield (str(path), first, items, keys)
    if records == 0:
        raise empty_file(path, line_no > 0)


def _decode(path, line_no: int, raw: bytes) -> str | BadRecord:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})")


def empty_file(path, blank_lines: bool) -> BadRecord:
    """A JSON-lines file without a record (no line, or ``blank_lines`` only): never skipped."""
    return BadRecord(f"{path}:1: empty file" + (" (blank lines only)" if blank_lines else ""))


def corpus_form_problem(path: Path, keys: list[str], first_record: bool = False) -> str | None:
    """Why a JSON-lines input is no JSONL corpus at all (one JSON object per line), judged from its first
    lines, or None: a pretty-printed JSON document (its first line ``{`` or ``[`` alone: a tokenizer.json,
    a config, a manifest), and of a file named ``.json``, a JSON array or one JSON value that is not a
    record with ``keys`` (a tokenizer.json or config.json written on one line). Its lines were read as
    records: it stopped the run at ``file:1`` as if one record were bad, or with skip_bad_records was
    dropped line by line. Parquet and what is not a regular file (a pipe must not lose its first line here)
    are not read: None. A file whose first line is a bad record among others, or a ``.jsonl`` of one bad
    record, is a corpus with a bad record, which reading names; with ``first_record`` (a run that stops at a
    bad record), its first record is judged here and a bad one raised (a shard exported with another key).
    A file without a record (``empty_file``) raises it here: the run would stop there, after the files
    before it."""
    if input_format(path) == "parquet" or not os.path.isfile(path):
        return None
    raw_lines = _raw_lines(path, input_format(path))
    read = 0

    def nonblank():
        nonlocal read
        for raw in raw_lines:
            read += 1
            raw = raw.removeprefix(_BOM) if read == 1 else raw  # as jsonl_chunks reads it
            if raw.strip(_JSON_SPACE):
                yield raw

    lines = nonblank()
    try:
        first = next(lines, None)
        if first is None:
            raise empty_file(path, read > 0)
        line_no = read
        problem = _bare_cr_problem(first) or _form_problem(path, keys, first.decode("utf-8", "replace").strip(), lines)
    finally:
        raw_lines.close()  # the file, now: not when the generator is collected
    if problem is None and first_record:
        record = _decode(path, line_no, first)
        record = record if isinstance(record, BadRecord) else parse_json_record(f"{path}:{line_no}", record, keys)
        if isinstance(record, BadRecord):
            raise record
    return problem


def _bare_cr_problem(first: bytes) -> str | None:
    """Lines ended by a bare carriage return (old Mac line endings) are one line to a reader splitting at
    "\\n": the whole file was one malformed record, with skip_bad_records one "bad record" for all its
    documents. Judged on the first non-blank line: a bare CR in it after a whole JSON value, the line as a
    whole no JSON (a CR as whitespace inside one record is JSON and left alone)."""
    body = first.rstrip(b"\r\n")
    at = body.find(b"\r")
    if at < 0 or not _is_json(body[:at]) or _is_json(body):
        return None
    return ("its records are separated by bare carriage returns ('\\r', old Mac line endings), not by '\\n', so "
            "the whole file would be read as one line; convert its line endings (e.g. tr '\\r' '\\n')")


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


def _form_problem(path: Path, keys: list[str], text: str, lines) -> str | None:
    """corpus_form_problem's judgement of a file whose first non-blank line is ``text`` (``lines``: the
    non-blank lines after it)."""
    if text in ("{", "["):
        return f"its first line is {text!r} alone: one pretty-printed JSON document, not one object per line"
    if not path.name.lower().endswith(".json"):
        return None  # named JSON lines: its first line is a record, good or bad
    if text.startswith("["):
        return "it begins with '[': a JSON array, not one object per line"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None  # a malformed first record: reading names its line
    if next(lines, None) is not None or (isinstance(value, dict) and all(k in value for k in keys)):
        return None  # several lines: a corpus, its records judged one by one
    if isinstance(value, dict):
        names = list(value)
        held = f"keys {', '.join(map(repr, names[:6]))}{', ...' if len(names) > 6 else ''}" if names else "no keys"
        return f"its only line is one JSON object ({held}) without {next(k for k in keys if k not in value)!r}"
    return f"its only line is {json_kind(value)}, not a JSON object"


def check_corpus_form(paths, keys, first_records: bool = False) -> None:
    """``corpus_form_problem`` of every input, as ``CorruptInput`` (never skipped) naming the first file that
    has one: before any output is written, not at its first line after the files before it were tokenized.
    A Parquet file's footer is read: a missing, repeated or non-text column of ``keys``, or no rows, is named
    now, not when the run reaches it after the files before it; an empty JSON-lines file too, and with
    ``first_records`` (a run that stops at a bad record) a JSON-lines file whose first record is bad."""
    for path in map(Path, paths):
        if input_format(path) == "parquet":
            if path.is_file():
                _open_parquet(path, keys)
            continue
        problem = corpus_form_problem(path, keys, first_records)
        if problem:
            raise CorruptInput(f"{path}: does not look like a JSONL corpus (one JSON object per line, with "
                               f"{' and '.join(map(repr, keys))}): {problem}; if it is not part of the corpus, "
                               "leave it out of --input (move it out of the directory given, or name the corpus "
                               "files with a glob)")


def parquet_chunks(path: Path, keys: list[str], chunk_size: int):
    """``(path, first row, items, keys)``: items are lists of texts (one per key) or ``BadRecord``s."""
    import pyarrow as pa

    pf = _open_parquet(path, keys)
    row = 1
    try:
        for batch in pf.iter_batches(batch_size=chunk_size, columns=list(keys)):
            values = [_column_values(batch.column(k)) for k in keys]
            items = []
            for i, texts in enumerate(zip(*values)):
                bad = next(((k, t) for k, t in zip(keys, texts) if not isinstance(t, str)), None)
                if bad is None:
                    items.append(list(texts))
                elif isinstance(bad[1], UnicodeDecodeError):
                    e = bad[1]
                    items.append(BadRecord(f"{path}:row {row + i}: key {bad[0]!r} is not valid UTF-8 "
                                           f"({e.reason} at byte {e.start})"))
                else:
                    kind = "null" if bad[1] is None else f"{type(bad[1]).__name__}, not a string"
                    items.append(BadRecord(f"{path}:row {row + i}: key {bad[0]!r} is {kind}"))
            yield (str(path), row, items, keys)
            row += len(items)
    except (pa.ArrowException, OSError) as e:
        raise CorruptInput(f"{path}: corrupt Parquet data after row {row - 1}: {e}") from None


def _open_parquet(path: Path, keys: list[str]):
    """``path``'s ``pyarrow.parquet.ParquetFile`` (its footer read), each of ``keys`` one text column in it;
    ``CorruptInput`` naming the file and column otherwise, ``BadRecord`` if it has no rows (never skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorruptInput(f"{path}: not a readable Parquet file: {e}") from None
    columns = pf.schema_arrow.names
    missing = [k for k in keys if k not in columns]
    if missing:
        raise CorruptInput(f"{path}: missing column {missing[0]!r} (columns: {', '.join(columns)})")
    repeated = [k for k in keys if columns.count(k) > 1]
    if repeated:  # Parquet allows it; which one holds the text is anyone's guess (pyarrow raised a KeyError)
        at = [i for i, c in enumerate(columns) if c == repeated[0]]
        raise CorruptInput(f"{path}: column {repeated[0]!r} appears {len(at)} times (columns number "
                           f"{', '.join(str(i + 1) for i in at)} of {len(columns)}); which one is the text is "
                           "ambiguous: rename or drop the others")
    wrong = [p for p in (_text_column_problem(pf.schema_arrow.field(k)) for k in keys) if p]
    if wrong:  # every row would be a bad record, which --skip-bad-records would drop without a word
        raise CorruptInput(f"{path}: {wrong[0]}")
    if pf.metadata.num_rows == 0:
        raise BadRecord(f"{path}: empty file (no rows)")
    return pf


_STRING_TYPES = ("is_string", "is_large_string", "is_string_view")
_BINARY_TYPES = ("is_binary", "is_large_binary", "is_binary_view")


def _type_is(arrow_type, checks) -> bool:
    """Whether ``pyarrow.types.<check>`` holds for any of ``checks`` (a check this pyarrow lacks: no)."""
    import pyarrow as pa

    return any(getattr(pa.types, check, lambda _: False)(arrow_type) for check in checks)


def _text_column_problem(field) -> str | None:
    """Why a Parquet column cannot hold text, or None: strings, binary (read as UTF-8, as a string
    column is) and dictionary-encoded either can; an all-null column is left to its rows."""
    import pyarrow as pa

    t = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
    if _type_is(t, _STRING_TYPES + _BINARY_TYPES + ("is_null",)):
        return None
    return f"column {field.name!r} holds {field.type}, not text (a string or binary column)"


def _column_values(column) -> list:
    """A column's Python values as text; a string or binary column holding invalid UTF-8 (Arrow does
    not check it when reading Parquet) gives that row's ``UnicodeDecodeError`` in place of its text."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not _type_is(column.type, _BINARY_TYPES):
        try:
            return column.to_pylist()
        except UnicodeDecodeError:
            pass
    out = []
    for raw in column.cast(pa.large_binary()).to_pylist():
        try:
            out.append(raw if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.append(e)
    return out


def _stamp(path) -> tuple | None:
    """What says a regular file is as it was: device, inode, size, modification time (None: a pipe)."""
    import os
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def record_chunks(path: Path, keys: list[str], chunk_size: int):
    """The chunks of ``path`` (jsonl_chunks, parquet_chunks). A regular file that changed while it was
    read (written to, truncated, replaced or removed: a download or an export still running) is
    ``CorruptInput``, checked after each chunk is read: what was read may be part old and part new, or cut
    short (a line cut by a truncation is not reported as a bad record)."""
    before = _stamp(path)
    for chunk in (parquet_chunks if input_format(path) == "parquet" else jsonl_chunks)(path, keys, chunk_size):
        _check_unchanged(path, before)
        yield chunk
    _check_unchanged(path, before)


def _check_unchanged(path, before) -> None:
    after = _stamp(path) if before is not None else None
    if after != before:
        what = ("it was removed" if after == () else "it was replaced by another file" if after[:2] != before[:2]
                else f"its size went from {before[2]:,} to {after[2]:,} bytes" if after[2] != before[2]
                else "it was written to")
        raise CorruptInput(f"{path}: changed while it was read ({what}): the records read may be part old and part "
                           "new, or cut short; run again once it is complete")


def name_inputs(paths) -> str:
    """Inputs as an error names them: all of up to three, else their count and the first and last."""
    return ", ".join(map(str, paths)) if len(paths) <= 3 else f"{len(paths)} inputs ({paths[0]} ... {paths[-1]})"


def no_documents(paths, stats) -> BadRecord:
    """The error of a run whose inputs held no document to write: every input named (their count and the
    first and last when many) and what became of their records (``stats``: bad_records, bad_locations,
    empty_documents), so that an input of only bad records skipped is not taken for an empty one."""
    names = name_inputs(paths)
    what = []
    if stats.bad_records:
        what.append(f"{stats.bad_records:,} bad record{'s' * (stats.bad_records != 1)} skipped "
                    f"(first: {', '.join(stats.bad_locations)})")
    if stats.empty_documents:
        what.append(f"{stats.empty_documents:,} empty document{'s' * (stats.empty_documents != 1)} dropped")
    return BadRecord(f"{names}: no non-empty documents in the input" + (f"; {'; '.join(what)}" if what else ""))
