"""Tokenizers: SentencePiece (trained here on a JSONL corpus) and Hugging Face ``tokenizer.json``,
behind the small interface the tools use (``vocab_size``, ``eod``, ``encode_flat``, ``encode_batch``).

Ids follow SentencePiece's defaults: 0 <unk>, 1 <s>, 2 </s>. The end-of-sequence id is the
end-of-document (EOD) token that separates documents in the indexed dataset; no pad id is defined,
so no real token is ever masked as padding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megatron_osp.data.flat import flatten as _flatten
from megatron_osp.data.flat import split_flat


class SentencePieceTokenizer:
    """The few calls preprocessing and training need; ``pad`` is -1 (none defined), see above.

    ``word_cache``: ``encode_batch`` goes through ``WordCacheEncoder`` (same ids, several times
    faster) when the model qualifies; False always calls SentencePiece.
    """

    def __init__(self, model_file: str | os.PathLike, word_cache: bool = True):
        if not os.path.exists(model_file):
            raise FileNotFoundError(f"tokenizer model {model_file} does not exist")
        self.model_file = str(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self._word_cache = None if word_cache else False  # built on first use (it holds the cache)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_flat(self, texts: list[str], threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated, and each text's count. ``threads``: SentencePiece's own pool
        (-1: all cores) when it is called; preprocessing workers use 1."""
        if self._word_cache is None:
            from megatron_osp.data.word_cache import WordCacheEncoder

            self._word_cache = WordCacheEncoder.for_model(self.model_file) or False
        if self._word_cache:
            return self._word_cache.encode_flat(texts)
        return _flatten(self._sp.encode(texts, num_threads=threads))

    def encode_batch(self, texts: list[str], threads: int = -1) -> list[np.ndarray]:
        return split_flat(*self.encode_flat(texts, threads))

    def decode(self, ids) -> str:
        return self._sp.decode(list(ids))


# End-of-document tokens of common HF tokenizers, tried in order when none is named.
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``), batched in Rust; no special tokens added.

    The EOD id is ``eod_token`` if given, else the first of ``HF_EOD_CANDIDATES`` in the vocabulary.
    """

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"tokenizer {file} does not exist")
        self.model_file = str(file)
        try:
            self._tok = Tokenizer.from_file(self.model_file)
        except Exception as e:  # noqa: BLE001  (the Rust library raises plain Exception)
            raise ValueError(f"{file}: not a Hugging Face tokenizer.json: {e}") from None
        candidates = (eod_token,) if eod_token else HF_EOD_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids) if i is not None]
        if not found:
            raise ValueError(
                f"{file}: no end-of-document token "
                + (f"{eod_token!r} in the vocabulary" if eod_token else f"among {', '.join(HF_EOD_CANDIDATES)}; pass --eod-token")
            )
        self.eod_token, self._eod = found[0]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return -1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_flat(self, texts: list[str], threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """As SentencePieceTokenizer's. One batched call into Rust either way; its thread pool
        follows TOKENIZERS_PARALLELISM, which preprocessing's pool workers set to false."""
        del threads
        return _flatten([e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)])

    def encode_batch(self, texts: list[str], threads: int = -1) -> list[np.ndarray]:
        return split_flat(*self.encode_flat(texts, threads))

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike, eod_token: str | None = None, word_cache: bool = True):
    """A SentencePiece ``.model`` or an HF ``tokenizer.json`` (or a directory holding one)."""
    p = Path(path)
    if p.suffix == ".json" or p.is_dir():
        return HFTokenizer(p, eod_token)
    if eod_token is not None:
        raise ValueError(f"--eod-token applies to Hugging Face tokenizers; {p} is SentencePiece (its EOD is </s>)")
    return SentencePieceTokenizer(p, word_cache=word_cache)


def _training_lines(corpus: Path, key: str, max_documents: int | None, errors: list):
    """Documents split into lines: SentencePiece skips 'sentences' longer than a few KB.

    Any input format preprocessing reads (JSON lines plain/.gz/.zst, Parquet). A bad record ends
    the iteration and is put in ``errors``: raised inside the iterator, it would come back out of
    SentencePiece's C++ as an opaque RuntimeError.
    """
    from megatron_osp.data.readers import BadRecord, record_chunks

    n = 0
    try:
        for path, first, items, _ in record_chunks(corpus, [key], 256):
            for i, item in enumerate(items):
                if max_documents is not None and n >= max_documents:
                    return
                n += 1
                if isinstance(item, BadRecord):
                    raise item
                if isinstance(item, list):
                    text = item[0]
                else:
                    try:
                        record = json.loads(item)
                    except json.JSONDecodeError as e:
                        raise BadRecord(f"{path}:{first + i}: malformed JSON ({e.msg} at column {e.colno})") from None
                    text = record.get(key) if isinstance(record, dict) else None
                if isinstance(text, str):
                    for part in text.splitlines():
                        if part.strip():
                            yield part
    except BadRecord as e:
        errors.append(ValueError(str(e)))


def train_sentencepiece(
    input_jsonl: str | os.PathLike,
    output_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    sample_documents: int | None = None,
    character_coverage: float = 0.9995,
) -> Path:
    """Train a byte-fallback BPE/unigram model; writes ``<output_prefix>.model`` atomically."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be 'bpe' or 'unigram', got {model_type!r}")
    input_jsonl, output_prefix = Path(input_jsonl), Path(output_prefix)
    if not input_jsonl.exists():
        raise FileNotFoundError(f"{input_jsonl} does not exist")
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 (256 byte-fallback pieces + specials), got {vocab_size}")
    tmp_prefix = output_prefix.with_name(output_prefix.name + f".tmp{os.getpid()}")
    try:
        _train(input_jsonl, json_key, sample_documents, tmp_prefix, vocab_size, model_type, character_coverage)
        # Not with_suffix(): a prefix such as "tok.v2" must give "tok.v2.model".
        model = Path(f"{output_prefix}.model")
        os.replace(f"{tmp_prefix}.vocab", f"{output_prefix}.vocab")
        os.replace(f"{tmp_prefix}.model", model)
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(f"{tmp_prefix}{ext}"):
                os.unlink(f"{tmp_prefix}{ext}")
    return model


def _train(input_jsonl, json_key, sample_documents, tmp_prefix, vocab_size, model_type, character_coverage):
    errors: list[Exception] = []
    try:
        _run_trainer(_training_lines(input_jsonl, json_key, sample_documents, errors), tmp_prefix, vocab_size,
                     model_type, character_coverage)
    except RuntimeError as e:
        if errors:
            raise errors[0] from e
        raise
    if errors:
        raise errors[0]


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
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
