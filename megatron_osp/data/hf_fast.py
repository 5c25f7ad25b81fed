r"""Exact fast path for Hugging Face byte-level BPE tokenizers (GPT-2 style ``tokenizer.json``).

Where the time goes (measured on a byte-level BPE, vocabulary 8000, trained on the builtin corpus,
one process): almost all of it is inside the Rust ``encode`` itself (~5 s for 12 MB); turning the
results into Python (``.ids``, numpy) is ~2%, and batching changes nothing per worker (one call per
document or one ``encode_batch`` per 256 documents cost the same). The library's own pre-tokenizer
called from Python (``pre_tokenize_str``) is slower than encoding. So, as for SentencePiece
(``word_cache.py``), the gain is in encoding each distinct word once.

For a byte-level BPE the ids of a document are the concatenation of the ids of its pre-tokenized
words (the regex split of the ByteLevel pre-tokenizer), because the BPE model works on each word
alone. That holds only when nothing else looks across words; ``unsupported_reason`` checks it from
the tokenizer's own JSON definition: no normalizer, no truncation or padding, a ``ByteLevel``
pre-tokenizer with its regex and no added prefix space, a BPE model without dropout, a post-processor
that adds ids only with special tokens (we encode without). Added tokens are matched by the library
in the raw text before pre-tokenizing, so a document that contains one goes to the library whole
(with ``encode_special_tokens`` set, only one not marked special: the library then reads the special
ones as ordinary text, and so does the cache).

Words are found by ``re`` with the GPT-2 pattern written for ASCII with explicit character classes.
The classes are not taken on trust: at load, every ASCII character is split in several contexts by
the library's own pre-tokenizer and by ours, and the encoder is refused unless all agree. A
non-ASCII character can only be told apart by the pattern through its class (\p{L}, \p{N}, \s or
none: it never equals one of the pattern's ASCII literals), so a document with such characters is
split on a same-length shadow in which each is replaced by an ASCII character of its class; the
class of each new character is read off the library's split and verified in a dozen contexts, and a
character that fails sends its documents to the library. Then whole probe texts are encoded both
ways. A word not yet cached is encoded alone by the library, and it must come back as one
pre-tokenized word. Anything that fails logs why and falls back to ``Tokenizer.encode_batch``.
"""

from __future__ import annotations

import itertools
import json
import logging
import re

import numpy as np

log = logging.getLogger(__name__)

_WS = r"\t\n\x0b\x0c\r "
# GPT-2's pattern ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) for
# ASCII text: \p{L} -> A-Za-z, \p{N} -> 0-9, \s -> the six ASCII whitespace characters.
ASCII_PATTERN = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")

# Post-processors that add ids only when asked to add special tokens (we never are).
_QUIET_POST_PROCESSORS = {"ByteLevel", "TemplateProcessing", "RobertaProcessing", "BertProcessing"}

PROBES = (
    "Hello,  world!\n\tThis is\r\na  test  ",
    "   leading and trailing   ",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "I'm sure they'll say it's 'quoted' and we've done what you'd do'S",
    "12345 3.14159 1e-10 0xFF\x00\x01\x7f\x1c\x1f\x0b\x0c",
    "",
    "\n\n   \t",
    "a" * 300 + " " + "b c " * 50 + "    ",
    "café, naïve, 日本語, emoji 🙂 e\u0301",
)


def unsupported_reason(definition: dict) -> str | None:
    """Why ids would not be a concatenation of per-word ids for this ``tokenizer.json``; None if they are."""
    if definition.get("truncation"):
        return "truncation is set"
    if definition.get("padding"):
        return "padding is set"
    if definition.get("normalizer") is not None:
        return f"normalizer {definition['normalizer'].get('type')} (the cache needs none)"
    pre = definition.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        return f"pre-tokenizer {pre.get('type')} (the cache supports ByteLevel only)"
    if not pre.get("use_regex", True):
        return "ByteLevel pre-tokenizer without its regex"
    if pre.get("add_prefix_space"):
        return "ByteLevel add_prefix_space"
    model = definition.get("model") or {}
    if model.get("type") != "BPE":
        return f"model {model.get('type')} (the cache is for BPE)"
    if model.get("dropout"):
        return f"BPE dropout {model['dropout']}"
    post = definition.get("post_processor")
    if post is not None and post.get("type") not in _QUIET_POST_PROCESSORS:
        return f"post-processor {post.get('type')}"
    return None


def _table_mismatch(pre_tokenizer) -> str | None:
    """The first ASCII context where our split differs from the library's pre-tokenizer, or None."""
    for c in map(chr, range(128)):
        for text in (f"a{c}b", f"{c}{c}", f" {c}", f"{c} a", f"1{c}2", f"'{c}s", f"{c}  x", f"x{c}  ", f"{c}'ll"):
            theirs = [text[s:e] for _, (s, e) in pre_tokenizer.pre_tokenize_str(text)]
            if theirs != ASCII_PATTERN.findall(text):
                return f"split of {text!r}: library {theirs}, ours {ASCII_PATTERN.findall(text)}"
    return None


class _NotOneWord(Exception):
    pass


# A non-ASCII character is never one of the pattern's literal ASCII characters, so all the pattern
# can tell about it is which of its four disjoint classes it is in: \p{L}, \p{N}, \s, or none. Such a
# character is replaced, in a same-length shadow of the document, by an ASCII character of the same
# class; the shadow's split gives the document's words. The class is read off the library.
_SHADOW = {"L": "a", "N": "0", "S": "\t", "O": "#"}


def _classify(pre_tokenizer, c: str) -> str | None:
    """The pattern class of the non-ASCII character ``c`` by the library's own split, verified in
    several contexts against the shadow's split; None if it is not exactly one class or disagrees."""
    def split(text):
        return [text[s:e] for _, (s, e) in pre_tokenizer.pre_tokenize_str(text)]

    try:
        found = [k for k, text in (("L", "a" + c), ("N", "0" + c), ("O", c + "#"), ("S", "\t" + c + "\t"))
                 if split(text) == [text]]
        if len(found) != 1:
            return None
        r = _SHADOW[found[0]]
        for text in (f"a{c}b", f"{c}{c}", f" {c}", f"{c} a", f"1{c}2", f"'{c}s", f"{c}  x", f"x{c}  ", f"{c}'ll",
                     f"!{c}!", f"\n{c}\n", f" {c}{c} ", f"{c} \u00e9"):
            shadow = text.replace(c, r)
            if split(text) != [text[s:e] for s, e in _spans(shadow)]:
                return None
    except Exception:  # noqa: BLE001  (a lone surrogate: the library refuses it; so will the fallback)
        return None
    return found[0]


def _spans(text: str) -> list[tuple[int, int]]:
    out, pos = [], 0
    for w in ASCII_PATTERN.findall(text):
        out.append((pos, pos + len(w)))
        pos += len(w)
    return out


class HFWordCache:
    """``encode_flat(texts)``: the same ids as ``tok.encode_batch(texts, add_special_tokens=False)``."""

    def __init__(self, tok, name: str = "tokenizer", max_entries: int = 1 << 20):
        self.name, self._tok, self.max_entries = name, tok, max_entries
        definition = json.loads(tok.to_str())
        reason = unsupported_reason(definition)
        if reason is None:
            reason = _table_mismatch(tok.pre_tokenizer)
        if reason is not None:
            raise ValueError(f"{name}: word cache not exact for this tokenizer: {reason}")
        # With encode_special_tokens set (--special-tokens-in-text split, data/tokenizer.py) the library
        # matches only the added tokens not marked special; the special ones are ordinary text then.
        split = bool(getattr(tok, "encode_special_tokens", False))
        self._added_tokens = [a["content"] for a in definition.get("added_tokens") or [] if a.get("content")]
        added = [a["content"] for a in definition.get("added_tokens") or []
                 if a.get("content") and not (split and a.get("special"))]
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._cache: dict[str, int] = {}  # word -> its index (see _fill)
        self._clear()
        self._shadow: dict[int, str] = {}  # non-ASCII code point -> its class's ASCII stand-in
        self._unsupported: set[str] = set()  # non-ASCII characters that could not be classified
        self.disabled = False

    @classmethod
    def for_tokenizer(cls, tok, name: str = "tokenizer", why: list | None = None) -> HFWordCache | None:
        """The encoder, or None (logged, and the reason appended to ``why``) when the tokenizer does not
        qualify or fails the self-check."""
        try:
            enc = cls(tok, name)
        except ValueError as e:
            log.info("%s; encoding with the library's encode_batch", e)
            if why is not None:
                why.append(str(e).removeprefix(f"{name}: "))
            return None
        probes = list(PROBES) + [p + q for p in PROBES for q in PROBES[:4]]
        probes += [f"a{t} b{t}{t}\n{t}" for t in enc._added_tokens[:20]]
        expected = [e.ids for e in tok.encode_batch(probes, add_special_tokens=False)]
        flat, lengths = enc.encode_flat(probes)
        got = [list(x) for x in np.split(flat, np.cumsum(lengths)[:-1])]
        if got != expected:
            log.warning("%s: word cache disagrees with the library on a probe text; not used", name)
            if why is not None:
                why.append("word cache disagrees with the library on a probe text")
            return None
        return enc

    def _words(self, text: str) -> list[str] | None:
        """The pre-tokenized words of ``text``, or None when it must go to the library whole."""
        if self._added is not None and self._added.search(text):
            return None  # added tokens are matched in the raw text, across words
        if text.isascii():
            return ASCII_PATTERN.findall(text)
        for c in set(text):
            if c.isascii() or ord(c) in self._shadow:
                continue
            if c in self._unsupported:
                return None
            kind = _classify(self._tok.pre_tokenizer, c)
            if kind is None:
                self._unsupported.add(c)
                return None
            self._shadow[ord(c)] = _SHADOW[kind]
        ends = list(itertools.accumulate(map(len, ASCII_PATTERN.findall(text.translate(self._shadow)))))
        return list(map(text.__getitem__, map(slice, [0] + ends[:-1], ends)))

    def _clear(self) -> None:
        self._cache.clear()
        self._store = np.zeros(1 << 16, np.int64)  # every cached word's ids, back to back
        self._start, self._len = np.zeros(1 << 12, np.int64), np.zeros(1 << 12, np.int64)  # per word index
        self._used = 0

    def _fill(self, words: set[str]) -> None:
        """Cache the words not yet cached: word -> index; its ids are _store[_start[i]:][:_len[i]]."""
        new = [w for w in words if w not in self._cache]
        if len(self._cache) + len(new) > self.max_entries:
            self._clear()
            new = list(words)
        if not new:
            return
        encoded = self._tok.encode_batch(new, add_special_tokens=False)
        for w, e in zip(new, encoded):
            wid = e.word_ids
            if wid and wid.count(wid[0]) != len(wid):
                raise _NotOneWord(w)
        ids = [e.ids for e in encoded]
        lens = np.fromiter(map(len, ids), np.int64, count=len(ids))
        first, n, need = len(self._cache), len(new), self._used + int(lens.sum())
        if first + n > len(self._start):
            size = max(2 * len(self._start), first + n)
            self._start, self._len = np.resize(self._start, size), np.resize(self._len, size)
        if need > len(self._store):
            self._store = np.resize(self._store, max(2 * len(self._store), need))
        self._store[self._used:need] = np.fromiter(itertools.chain.from_iterable(ids), np.int64, count=need - self._used)
        self._start[first:first + n] = self._used + np.cumsum(lens) - lens
        self._len[first:first + n] = lens
        self._used = need
        self._cache.update(zip(new, range(first, first + n)))

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids (int64) concatenated, and each text's count (int64)."""
        words = [None if self.disabled else self._words(t) for t in texts]
        try:
            self._fill(set(itertools.chain.from_iterable(ws for ws in words if ws)))
        except _NotOneWord as e:  # the argument above failed: say so and stop using the cache
            log.warning("%s: word %r is not one word alone; word cache disabled", self.name, str(e))
            self._clear()
            self.disabled, words = True, [None] * len(texts)
        cached = [ws if ws is not None else () for ws in words]
        counts = np.fromiter(map(len, cached), np.int64, count=len(cached))  # words per text
        index = np.fromiter(map(self._cache.__getitem__, itertools.chain.from_iterable(cached)), np.int64,
                            count=int(counts.sum()))
        lens, starts = self._len[index], self._start[index]
        ends = np.cumsum(lens)
        flat = self._store[np.repeat(starts - (ends - lens), lens) + np.arange(int(ends[-1]) if len(ends) else 0)]
        bounds = np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(counts)])]
        lengths = np.diff(bounds)  # tokens per text (0 for the texts that go to the library)
        slow = [i for i, ws in enumerate(words) if ws is None]
        if slow:
            parts = np.split(flat, bounds[1:-1])
            for i, e in zip(slow, self._tok.encode_batch([texts[i] for i in slow], add_special_tokens=False)):
                parts[i] = np.asarray(e.ids, dtype=np.int64)
            lengths = np.fromiter(map(len, parts), np.int64, count=len(parts))
            flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return flat, lengths

    def __len__(self) -> int:
        return len(self._cache)
