"""Tokenizers: SentencePiece (trained here on a JSONL corpus) and Hugging Face ``tokenizer.json``,
behind the small interface the tools use (``vocab_size``, ``eod``, ``encode_flat``, ``encode_batch``).

Ids follow SentencePiece's defaults: 0 <unk>, 1 <s>, 2 </s>. The end-of-sequence id is the
end-of-document (EOD) token that separates documents in the indexed dataset; no pad id is defined,
so no real token is ever masked as padding.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megatron_osp.data.flat import flatten as _flatten
from megatron_osp.data.flat import split_flat
from megatron_osp.data.special_text import DEFAULT as SPECIAL_DEFAULT
from megatron_osp.data.special_text import SpecialTextScan, check_mode
from megatron_osp.data.sp_training import train_sentencepiece  # noqa: F401  (its home before sp_training.py)


class SentencePieceTokenizer:
    """The few calls preprocessing and training need; ``pad`` is -1 (none defined), see above.

    ``word_cache``: ``encode_batch`` goes through ``WordCacheEncoder`` (same ids, several times
    faster) when the model qualifies; False always calls SentencePiece. ``special_tokens_in_text``
    (data/special_text.py) changes no id: SentencePiece encodes ``</s>`` in text as characters.
    """

    def __init__(self, model_file: str | os.PathLike, word_cache: bool = True,
                 special_tokens_in_text: str = SPECIAL_DEFAULT):
        self.special_tokens_in_text = check_mode(special_tokens_in_text)
        if not os.path.exists(model_file):
            raise FileNotFoundError(f"tokenizer model {model_file} does not exist")
        self.model_file = str(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except Exception as e:  # noqa: BLE001  (SentencePiece raises RuntimeError/OSError variants)
            raise ValueError(f"{model_file}: not a SentencePiece model{_what_it_is(model_file)} ({str(e).strip()}); a "
                             "Hugging Face tokenizer is given as its tokenizer.json (or the directory holding it)") from None
        self._word_cache = None if word_cache else False  # built on first use (it holds the cache)
        self._why: list[str] = []  # why the word cache is not used (encoding_path)
        self._scan = None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def find_special(self, text: str):
        """(piece, offset) of the first control or unknown piece (``<s>``, ``</s>``, ``<unk>``) written
        in ``text``, or None; SentencePiece encodes them as characters, ``refuse`` stops on them."""
        if self._scan is None:
            sp = self._sp
            self._scan = SpecialTextScan([(sp.id_to_piece(i), False) for i in range(sp.get_piece_size())
                                          if sp.is_control(i) or sp.is_unknown(i)])
        return self._scan.find(text)

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
            self.encoding_path()
        if self._word_cache:
            return self._word_cache.encode_flat(texts)
        return _flatten(self._sp.encode(texts, num_threads=threads))

    def encoding_path(self) -> str:
        """How texts are encoded, and why not through the word cache when not (built here if it is not yet)."""
        if self._word_cache is None:
            from megatron_osp.data.word_cache import WordCacheEncoder

            self._word_cache = WordCacheEncoder.for_model(self.model_file, self._why) or False
        if self._word_cache:
            return "exact word cache (data/word_cache.py)"
        return f"SentencePiece, document by document ({self._why[0] if self._why else '--no-word-cache'})"

    def encode_batch(self, texts: list[str], threads: int = -1) -> list[np.ndarray]:
        return split_flat(*self.encode_flat(texts, threads))

    def decode(self, ids) -> str:
        return self._sp.decode(list(ids))


# End-of-document tokens of common HF tokenizers, tried in order when none is named.
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


def guess_hf_eod(tok, file) -> tuple[str, int, bool]:
    """(token, id, whether it is a special token) of the first of ``HF_EOD_CANDIDATES`` that is a
    special token of ``tok``, else (older files list none as special) the first in its vocabulary. A
    special token comes first: a vocabulary may also hold one of the other spellings as an ordinary
    piece learned from text (HTML's ``</s>`` in a Gemma-style vocabulary whose EOS is ``<eos>``)."""
    special = [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.special]
    present = [(t, tok.token_to_id(t)) for t in HF_EOD_CANDIDATES if tok.token_to_id(t) is not None]
    for token, i in present:
        if token in special:
            return token, i, True
    if present:
        return present[0][0], present[0][1], False
    raise ValueError(f"{file}: no end-of-document token among {', '.join(HF_EOD_CANDIDATES)}; pass --eod-token"
                     + (f" (its special tokens: {', '.join(special[:12])}{', ...' if len(special) > 12 else ''})"
                        if special else ""))


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``), batched in Rust; no special tokens added.

    The EOD id is ``eod_token``'s if given, else guessed (``guess_hf_eod``: a special token first).
    ``word_cache``: ``encode_flat`` goes through ``HFWordCache`` (megatron_osp/data/hf_fast.py: same
    ids, faster) when the tokenizer qualifies; False always calls the library's ``encode_batch``.
    ``special_tokens_in_text`` (data/special_text.py): ``split`` sets the library's
    ``encode_special_tokens`` on the one ``Tokenizer`` every encode path here and in the word cache
    calls, so a special token's text is encoded as ordinary text.
    """

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None, word_cache: bool = True,
                 special_tokens_in_text: str = SPECIAL_DEFAULT):
        from tokenizers import Tokenizer

        self.special_tokens_in_text = check_mode(special_tokens_in_text)

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            sp = path / "tokenizer.model" if path.is_dir() else None
            also = f"; {sp} is there: give that file to use it as a SentencePiece model" if sp and sp.is_file() else ""
            raise FileNotFoundError(f"tokenizer {file} does not exist{also}")
        self.model_file = str(file)
        try:
            self._tok = Tokenizer.from_file(self.model_file)
        except Exception as e:  # noqa: BLE001  (the Rust library raises plain Exception)
            raise ValueError(f"{file}: not a Hugging Face tokenizer.json{_what_it_is(file)}: {e}") from None
        if eod_token:
            self.eod_token, self._eod = eod_token, self._tok.token_to_id(eod_token)
            if self._eod is None:
                raise ValueError(f"{file}: no end-of-document token {eod_token!r} in the vocabulary")
            self.eod_special = any(t.special and t.content == eod_token
                                   for t in self._tok.get_added_tokens_decoder().values())
        else:
            self.eod_token, self._eod, self.eod_special = guess_hf_eod(self._tok, file)
        # A tokenizer.json saved for a model's inputs may set truncation (encode_batch would cut every
        # document to max_length, silently) or padding (pad ids, varying with the batch): neither has a
        # place in pretraining data, so both are turned off. ``switched_off`` says which were set.
        self.switched_off = []
        if self._tok.truncation is not None:
            self.switched_off.append(f"truncation to {self._tok.truncation.get('max_length')} tokens")
            self._tok.no_truncation()
        if self._tok.padding is not None:
            self.switched_off.append("padding")
            self._tok.no_padding()
        if self.special_tokens_in_text == "split":
            if not hasattr(self._tok, "encode_special_tokens"):
                import tokenizers

                raise ValueError("--special-tokens-in-text split needs a tokenizers library with "
                                 f"Tokenizer.encode_special_tokens; this is tokenizers {tokenizers.__version__}")
            self._tok.encode_special_tokens = True
        self._scan = None
        # One more than the largest id: the count of tokens falls short when the ids have gaps (an added
        # token at an id past the rest), and the output dtype and range checks need every id to fit.
        ids = self._tok.get_vocab(with_added_tokens=True).values()
        self._id_bound = max(self._tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        self._word_cache = None if word_cache else False  # built on first use (it holds the cache)
        self._why: list[str] = []  # why the word cache is not used (encoding_path)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (the number of tokens when the ids have no gaps)."""
        return self._id_bound

    @property
    def eod(self) -> int:
        return self._eod

    def find_special(self, text: str):
        """(token, offset) of the first of the tokenizer's special tokens (added tokens marked special)
        written in ``text``, or None (data/special_text.py: what ``refuse`` stops on)."""
        if self._scan is None:
            specials = [t for t in self._tok.get_added_tokens_decoder().values() if t.special]
            normalizer = self._tok.normalizer
            self._scan = SpecialTextScan([(t.content, bool(t.normalized)) for t in specials],
                                         normalizer.normalize_str if normalizer is not None else None)
        return self._scan.find(text)

    @property
    def pad(self) -> int:
        return -1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_flat(self, texts: list[str], threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """As SentencePieceTokenizer's. One batched call into Rust either way; its thread pool
        follows TOKENIZERS_PARALLELISM, which preprocessing's pool workers set to false."""
        del threads
        if self._word_cache is None:
            self.encoding_path()
        if self._word_cache:
            return self._word_cache.encode_flat(texts)
        return _flatten([e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)])

    def encoding_path(self) -> str:
        """How texts are encoded, and why not through the word cache when not (built here if it is not yet)."""
        if self._word_cache is None:
            from megatron_osp.data.hf_fast import HFWordCache

            self._word_cache = HFWordCache.for_tokenizer(self._tok, self.model_file, self._why) or False
        if self._word_cache:
            return "exact word cache (data/hf_fast.py)"
        return f"the tokenizers library's encode_batch ({self._why[0] if self._why else '--no-word-cache'})"

    def encode_batch(self, texts: list[str], threads: int = -1) -> list[np.ndarray]:
        return split_flat(*self.encode_flat(texts, threads))

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _what_it_is(file) -> str:
    """What a file given as a tokenizer holds instead, as a clause ("" when it is not recognized): the
    files beside a model's tokenizer.json that are given for it by mistake."""
    try:
        with open(file, "rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    lines = head.split(b"\n")[:3]
    if len(lines) > 1 and all(re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", line) for line in lines[:-1]):
        return (": it is a tiktoken BPE file (base64 token and rank per line, like Llama 3's original/tokenizer.model), "
                "which is not supported: give the model's tokenizer.json")
    if not head.lstrip().startswith(b"{"):
        return ""
    try:
        data = json.loads(Path(file).read_bytes())
    except ValueError:
        return ""
    if not isinstance(data, dict) or isinstance(data.get("model"), dict):
        return ""
    if data and all(isinstance(v, int) for v in data.values()):
        return ": it is a token -> id map (a vocab.json), not a whole tokenizer: give the model's tokenizer.json"
    if "tokenizer_class" in data or "added_tokens_decoder" in data:
        return ": it is a tokenizer_config.json: give the tokenizer.json beside it"
    return ""


def load_tokenizer(path: str | os.PathLike, eod_token: str | None = None, word_cache: bool = True,
                   special_tokens_in_text: str = SPECIAL_DEFAULT):
    """A SentencePiece ``.model`` or an HF ``tokenizer.json`` (or a directory holding one)."""
    p = Path(path)
    if p.suffix == ".json" or p.is_dir():
        return HFTokenizer(p, eod_token, word_cache=word_cache, special_tokens_in_text=special_tokens_in_text)
    if eod_token is not None:
        raise ValueError(f"--eod-token applies to Hugging Face tokenizers; {p} is SentencePiece (its EOD is </s>)")
    return SentencePieceTokenizer(p, word_cache=word_cache, special_tokens_in_text=special_tokens_in_text)
