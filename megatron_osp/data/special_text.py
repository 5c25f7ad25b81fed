"""Special tokens written out in a document's text (``<|endoftext|>`` in a scraped web page), and what
preprocessing does with them: ``--special-tokens-in-text``.

- ``encode`` (the default): as the tokenizer library encodes it. A Hugging Face tokenizer turns the
  text of one of its special tokens into that token's id (as Megatron-LM's preprocessing does), so an
  EOD can appear inside a document. The default, so that rerunning an existing pipeline gives the ids
  it gave before.
- ``split``: such text is encoded as ordinary text (``tokenizers``' ``encode_special_tokens``): no id
  of a special token comes from a document's text, and decoding gives the text back.
- ``refuse``: a record whose text holds a special token is a bad record: the run stops naming its
  file, line (Parquet: row), key and the token, and publishes nothing (``--skip-bad-records``: it
  is skipped and counted).

An EOD that is an ordinary vocabulary entry (a Hugging Face tokenizer without it among its special
tokens) is encoded from its text like any word. Under ``split`` and ``refuse`` a text that encodes to
the EOD id is a bad record (``eod_from_text``), so neither writes an EOD inside a document.

Which tokens: a Hugging Face tokenizer's added tokens marked special. Its added tokens not marked
special (added words) are matched in text in every mode, as the library does. SentencePiece never
turns text into a control piece (``<s>``, ``</s>``): it encodes their text as characters, so
``encode`` and ``split`` give the same ids; ``refuse`` stops on the text of its control and unknown
pieces (``<s>``, ``</s>``, ``<unk>``) all the same.

The mode is recorded in the output's manifest (``special_tokens_in_text``; a manifest without it was
made as ``encode``). Merging and training refuse an ``encode`` and a ``split`` dataset of a Hugging
Face tokenizer together: one text, two different ids. A ``refuse`` dataset holds no such text, so its
ids are what either mode gives, and it mixes with both.
"""

from __future__ import annotations

import re

MODES = ("encode", "split", "refuse")
DEFAULT = "encode"
FIELD = "special_tokens_in_text"

HELP = ("what the text of a special token in a document (<|endoftext|> in a web page) becomes. encode (default, "
        "so existing pipelines keep their ids; as the library and Megatron-LM's preprocessing): a Hugging Face "
        "tokenizer's special token id, e.g. an EOD mid-document; split: ordinary text, no special id comes from "
        "text; refuse: stop at the first such record, naming file, line and token, and write nothing "
        "(--skip-bad-records: skip it). SentencePiece encodes such text as characters in every mode (encode = "
        "split); refuse stops on <s>, </s>, <unk> in its text too. Recorded in the manifest: encode and split "
        "datasets are refused together")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"special_tokens_in_text {mode!r}: must be one of {', '.join(MODES)}")
    return mode


class SpecialTextScan:
    """Finds the first special token written in a text. ``tokens``: (content, whether the library
    matches it on normalized text); ``normalize``: the tokenizer's normalizer as a str -> str
    function, or None. A token the library matches on normalized text is looked for in the normalized
    text too, so the scan finds every text the library would turn into a special id (and may stop on
    a few it would not: a ``single_word`` token inside a word)."""

    def __init__(self, tokens: list[tuple[str, bool]], normalize=None):
        self.tokens = [t for t, _ in tokens if t]
        normed = [t for t, n in tokens if t and n]
        self._raw = _trie_pattern(self.tokens)
        self._normed = _trie_pattern(normed) if normalize is not None else None
        self._normalize = normalize

    def find(self, text: str) -> tuple[str, int | None] | None:
        """(token, character offset) of the first special token in ``text``, None if there is none; the
        offset is None where the token was found only in the normalized text."""
        m = self._raw.search(text) if self._raw is not None else None
        if m is not None:
            return m.group(), m.start()
        if self._normed is not None:
            m = self._normed.search(self._normalize(text))
            if m is not None:
                return m.group(), None
        return None


def _trie_pattern(tokens: list[str]):
    """One regex matching any of ``tokens``, the longest where several start at one place, written as a
    trie (``<\\|(?:endoftext\\|>|im_start\\|>)``): re tries an alternation of 256 literals (Llama 3's
    reserved tokens) at every position, 20x slower than this. None for no tokens."""
    tree: dict = {}
    for t in tokens:
        node = tree
        for c in t:
            node = node.setdefault(c, {})
        node[""] = {}  # a token ends here

    def emit(node) -> str:
        ends = "" in node
        alternatives = [re.escape(c) + emit(child) for c, child in sorted(node.items()) if c]
        if not alternatives:
            return ""
        if len(alternatives) == 1 and not ends:
            return alternatives[0]
        return "(?:" + "|".join(alternatives) + ")" + ("?" if ends else "")  # greedy: the longer token first

    return re.compile(emit(tree)) if tree else None


def refused_record(location: str, key: str, found: tuple[str, int | None]) -> str:
    """The bad-record message for a special token found in a record's text."""
    token, at = found
    where = f"at character {at}" if at is not None else "in its normalized text"
    return (f"{location}: key {key!r} holds the special token {token!r} written out ({where}); "
            "--special-tokens-in-text refuse stops on it (split: encode it as ordinary text; encode: as its id)")


def eod_from_text(tokenizer, encoded) -> dict[int, tuple[int, int]]:
    """{document: (key index, token offset)} of the documents whose text encoded to ``tokenizer``'s EOD
    id, under ``split`` or ``refuse``, which promise that no special id comes from a text. ``encoded``:
    per key, (all documents' ids, their lengths). Only an EOD that is an ordinary vocabulary entry (not
    among a Hugging Face tokenizer's special tokens) can, so for any other tokenizer this is {}."""
    if tokenizer.special_tokens_in_text == "encode" or getattr(tokenizer, "eod_special", True):
        return {}
    import numpy as np

    hits: dict[int, tuple[int, int]] = {}
    for k, (ids, lengths) in enumerate(encoded):
        at = np.flatnonzero(ids == tokenizer.eod)
        if at.size:
            ends = np.cumsum(lengths)
            for doc, pos in zip(np.searchsorted(ends, at, side="right").tolist(), at.tolist()):
                hits.setdefault(doc, (k, pos - int(ends[doc] - lengths[doc])))
    return hits


def eod_record(tokenizer, location: str, key: str, offset: int) -> str:
    """The bad record of a text that encoded to the EOD id (``eod_from_text``)."""
    return (f"{location}: key {key!r} encodes to the end-of-document id {tokenizer.eod} "
            f"({getattr(tokenizer, 'eod_token', None)!r}, an ordinary vocabulary entry of this tokenizer, not one "
            f"of its special tokens) at token {offset}: --special-tokens-in-text {tokenizer.special_tokens_in_text} "
            "writes no end-of-document id from a document's text (--skip-bad-records skips the record; encode "
            "keeps the id)")


def compatible(a: str, b: str, kind: str | None) -> bool:
    """Whether datasets made in modes ``a`` and ``b`` of one tokenizer may be mixed. ``kind``: the
    tokenizer's fingerprint scheme (``sp1``: SentencePiece, where encode and split give the same ids),
    None when no manifest of the pair says."""
    if a == b or "refuse" in (a, b):
        return True
    return kind is not None and kind.startswith("sp") and {a, b} <= {"encode", "split"}


def merged_mode(modes) -> str:
    """The mode a merge of datasets made in ``modes`` (already found ``compatible``) records: a
    ``refuse`` dataset holds no special token text, so the merge is what the others are (``refuse``
    if all are); ``encode`` with ``split`` (SentencePiece only, where they give the same ids) is
    ``encode``, what a SentencePiece dataset of either mode holds."""
    rest = set(modes) - {"refuse"}
    if not rest:
        return "refuse"
    return rest.pop() if len(rest) == 1 else DEFAULT


__all__ = ["MODES", "DEFAULT", "FIELD", "HELP", "check_mode", "SpecialTextScan", "refused_record", "eod_from_text",
           "eod_record", "compatible", "merged_mode"]
