"""Training a byte-fallback SentencePiece model (BPE or unigram) on a corpus preprocessing can read.

The corpus is one file or several (files, globs and directories as preprocess_data.py takes them,
megatron_osp/data/inputs.py; a file given twice is refused), read in the order given: several files train
the tokenizer their concatenation would. ``sample_documents`` N takes the first N records of one file;
of several, ``sample_shares``: each file's share of N in proportion to its size in bytes.

Records are read as preprocessing reads them (megatron_osp/data/readers.py): a malformed line, a
missing ``json_key``, a non-string or invalid text (bad UTF-8, a lone surrogate) is a bad record named
``file:line``, which stops training unless ``skip_bad_records``. SentencePiece's own refusals of a
vocabulary size are turned into messages that say what the size must be: byte fallback takes 259
ids (256 byte pieces, <unk>, <s>, </s>) plus one per character the coverage keeps. The model is
written under temporary names and renamed at the end, and the output directory is checked writable
before any work.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from megatron_osp.data.inputs import expand_inputs
from megatron_osp.data.readers import BadRecord, check_corpus_form, name_inputs, parse_json_record, record_chunks

META_PIECES = 259  # 256 byte-fallback pieces + <unk>, <s>, </s>
SENTENCE_BYTES = 4192  # SentencePiece's max_sentence_length (its default): a longer line is skipped without a word
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def sample_shares(sizes: list[int | None], n: int) -> list[int]:
    """``--sample-documents n`` over files of ``sizes`` bytes: the first records of each file, in number
    proportional to its size (the cumulative shares rounded down, so they add up to n; all of n for one
    file); equal shares when a size is unknown (a pipe) or all are 0. A file holding fewer records than its
    share passes what is left of it on to the next file (done while reading, by ``_Reading``)."""
    weights = sizes if all(s for s in sizes) else [1] * len(sizes)
    total, cum, shares = sum(weights), 0, []
    for w in weights:
        shares.append(n * (cum + w) // total - n * cum // total)
        cum += w
    return shares


class _Reading:
    """The training text of a corpus, as lines; what went wrong is kept for after SentencePiece."""

    def __init__(self, corpus: list[Path], key: str, max_documents: int | None, skip_bad_records: bool):
        self.corpus, self.key, self.max_documents, self.skip = corpus, key, max_documents, skip_bad_records
        self.error: Exception | None = None
        self.bad: list[str] = []
        self.documents = self.lines = 0

    def __iter__(self):
        """Documents split into lines, and a line longer than ``SENTENCE_BYTES`` into pieces (``_pieces``):
        SentencePiece skips a longer 'sentence' without a word, so a corpus of long lines (a paragraph of
        CJK text, minified pages) trained the tokenizer of its short lines only. An error
        is kept, then raised to stop SentencePiece at once; it comes out of SentencePiece's C++ as
        an opaque RuntimeError, which ``_train`` replaces by the kept one."""
        shares = [None] * len(self.corpus)
        if self.max_documents is not None:
            sizes = [p.stat().st_size if p.is_file() else None for p in self.corpus]
            shares = sample_shares(sizes, self.max_documents)
        left = 0  # of the earlier files' shares, for a file short of records
        try:
            for corpus, share in zip(self.corpus, shares):
                if share is None:
                    yield from self._file(corpus, None)
                    continue
                left += share
                left -= yield from self._file(corpus, left)
        except BadRecord as e:
            self.error = ValueError(str(e))
            raise

    def _file(self, corpus: Path, limit: int | None):
        """The lines of up to ``limit`` records of one file (None: all); returns how many records it read."""
        n = 0
        if limit == 0:
            return n
        for path, first, items, _ in record_chunks(corpus, [self.key], 256):
            for i, item in enumerate(items):
                if item is None:  # a blank line: no record
                    continue
                if limit is not None and n >= limit:
                    return n
                n += 1
                if isinstance(item, str):
                    item = parse_json_record(f"{path}:{first + i}", item, [self.key])
                if isinstance(item, BadRecord):
                    if not self.skip:
                        raise item
                    self.bad.append(str(item))
                    continue
                self.documents += 1
                for line in item[0].splitlines():
                    for part in _pieces(line):
                        if part.strip():
                            self.lines += 1
                            yield part
        return n


def _pieces(line: str, limit: int = SENTENCE_BYTES):
    """``line`` in pieces of at most ``limit`` UTF-8 bytes, each cut before a space where there is one
    (SentencePiece splits at spaces anyway, and a space opening a piece is the one it would mark), else
    at a character boundary."""
    data = line.encode("utf-8")
    if len(data) <= limit:
        yield line
        return
    start = 0
    while len(data) - start > limit:
        cut = data.rfind(b" ", start + 1, start + limit + 1)
        if cut <= start:
            cut = start + limit
            while data[cut] & 0xC0 == 0x80:  # inside a character: back to its first byte
                cut -= 1
        yield data[start:cut].decode("utf-8")
        start = cut
    yield data[start:].decode("utf-8")


def _record_prefix(model_file: str, prefix: str) -> None:
    """SentencePiece records the prefix it wrote to (``trainer_spec.model_prefix``): the temporary one,
    which names this host and process, so two trainings of one corpus gave different files. It is set
    to the output prefix: the same command gives the same bytes."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    proto.trainer_spec.model_prefix = prefix
    Path(model_file).write_bytes(proto.SerializeToString())


def _check_writable(directory: Path) -> None:
    """Fail now, naming the directory, rather than after training (SentencePiece writes at the end)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test."):
        pass


def train_sentencepiece(
    input_jsonl: str | os.PathLike | list[str | os.PathLike],
    output_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    sample_documents: int | None = None,
    character_coverage: float = 0.9995,
    skip_bad_records: bool = False,
    skipped: list[str] | None = None,
) -> Path:
    """Train a byte-fallback BPE/unigram model; writes ``<output_prefix>.model`` atomically. ``input_jsonl``:
    a corpus file, glob or directory, or a list of them (read in that order; a file given twice is refused).
    ``skipped`` receives the messages of the bad records skipped (``skip_bad_records``)."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be 'bpe' or 'unigram', got {model_type!r}")
    if str(output_prefix).endswith(("/", os.sep)) or os.path.basename(str(output_prefix)) in (".", ".."):
        # Path() drops a trailing "/": "tok/" wrote tok.model beside the directory, not in it; "tok/."
        # failed with "PosixPath('tok') has an empty name", "tok/.." wrote tok/...model
        raise ValueError(f"output prefix {str(output_prefix)!r} names a directory, not a file prefix "
                         "(e.g. tok/tokenizer writes tok/tokenizer.model)")
    from megatron_osp.data.preprocess import check_inputs

    specs = [input_jsonl] if isinstance(input_jsonl, (str, os.PathLike)) else list(input_jsonl)
    if not specs:
        raise ValueError("no input given: name corpus files, globs or directories")
    files = [Path(f) for f in expand_inputs([os.fspath(spec) for spec in specs])]
    check_inputs(files, "its documents would be trained on twice, weighing twice in the tokenizer")  # each exists
    check_corpus_form(files, [json_key], not skip_bad_records)  # a tokenizer.json or config.json given is no corpus
    output_prefix = Path(output_prefix)
    if vocab_size <= META_PIECES:
        raise ValueError(f"vocab_size must be more than {META_PIECES} (256 byte-fallback pieces + <unk>, <s>, </s>) "
                         f"plus one per character of the corpus, got {vocab_size}")
    if not 0 < character_coverage <= 1:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if sample_documents is not None and sample_documents < 1:
        raise ValueError(f"sample_documents must be >= 1, got {sample_documents}")
    _check_writable(output_prefix.parent)
    from megatron_osp.data.run_owner import tag
    from megatron_osp.data.shardset import remove_stale_temporaries

    remove_stale_temporaries(output_prefix.parent, output_prefix.name, r"\.(model|vocab)")
    tmp_prefix = output_prefix.with_name(output_prefix.name + f".tmp{tag()}")
    try:
        reading = _Reading(files, json_key, sample_documents, skip_bad_records)
        _train(reading, tmp_prefix, vocab_size, model_type, character_coverage)
        _record_prefix(f"{tmp_prefix}.model", str(output_prefix))
        if skipped is not None:
            skipped += reading.bad
        # Not with_suffix(): a prefix such as "tok.v2" must give "tok.v2.model".
        model = Path(f"{output_prefix}.model")
        # Two renames cannot swap a pair at once, and either order left one new and one old file after
        # a crash between them. So the old .vocab goes first: at every moment the .model (what is read)
        # has its own .vocab or none, never another model's; a rerun writes both.
        Path(f"{output_prefix}.vocab").unlink(missing_ok=True)
        os.replace(f"{tmp_prefix}.model", model)
        os.replace(f"{tmp_prefix}.vocab", f"{output_prefix}.vocab")
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(f"{tmp_prefix}{ext}"):
                os.unlink(f"{tmp_prefix}{ext}")
    return model


def _no_text(reading: _Reading) -> ValueError:
    where = name_inputs(reading.corpus)
    if reading.bad:
        return ValueError(f"{where}: no text to train on: all {len(reading.bad)} records read were bad "
                          f"(first: {reading.bad[0]})")
    return ValueError(f"{where}: no text to train on: key {reading.key!r} is empty in every record read")


def _train(reading: _Reading, tmp_prefix, vocab_size, model_type, character_coverage):
    try:
        _run_trainer(iter(reading), tmp_prefix, vocab_size, model_type, character_coverage)
    except RuntimeError as e:
        if reading.error is not None:
            raise reading.error from None
        if reading.lines == 0:
            raise _no_text(reading) from None
        raise _explain(str(e), vocab_size, model_type, character_coverage) from None
    if reading.error is not None:
        raise reading.error


def _explain(message: str, vocab_size: int, model_type: str, coverage: float) -> Exception:
    """SentencePiece's refusal of a vocabulary size, said in the terms of our options."""
    m = _TOO_SMALL.search(message)
    if m:
        need = int(m.group(2))
        return ValueError(
            f"--vocab-size {vocab_size} is too small for this corpus: byte fallback takes {META_PIECES} ids "
            f"(256 byte pieces + <unk>, <s>, </s>) and the text has {need - META_PIECES} characters that "
            f"--character-coverage {coverage} keeps, so it needs at least {need}; raise --vocab-size or "
            "lower --character-coverage")
    m = _TOO_HIGH.search(message)
    if m:
        return ValueError(
            f"--vocab-size {vocab_size} is more than this corpus supports: {model_type} training found at most "
            f"{m.group(2)} pieces in it; use --vocab-size {m.group(2)} or less, or train on more text")
    return RuntimeError(f"SentencePiece training failed: {message}")


def _run_trainer(lines, tmp_prefix, vocab_size, model_type, character_coverage):
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=str(tmp_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=SENTENCE_BYTES,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
