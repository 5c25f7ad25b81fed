"""Whose ids a model learned: the tokenizer a checkpoint records, and the refusal of a run or an
evaluation that would feed the model ids of another tokenizer.

Two tokenizers of one vocabulary size pass every size and range check (Llama 2's and Mistral's
SentencePiece models have 32,000 pieces each; two tokenizers trained on different corpora at one
size), and a run started from a checkpoint of one on data of the other trains, and an evaluation
scores, without a word: every token is read as another's embedding. The data's side is known (its
preprocessing manifest records the tokenizer, ``shardset.recorded_tokens``); this module gives the
model's side.

A *record* is ``{"tokenizer_sha256", "tokenizer_fingerprint", "source"}`` (the fingerprint as
data/tokenizer_identity.py makes it: the same ids whatever the file's bytes; ``source`` names the
file or manifest for messages). A save writes the run's record into the checkpoint's
``train_state.json`` (``"tokenizer"``); a checkpoint saved before that is judged by the files its
run config names, where they are still there. Nothing is refused where either side is unknown.
"""

from __future__ import annotations

import os

from megatron_osp.data import shardset
from megatron_osp.data.tokenizer_identity import same_tokenizer, tokenizer_file, tokenizer_fingerprint

KEY = "tokenizer"  # in train_state.json


_made: dict[tuple, dict] = {}  # file_record by (path, size, mtime): every save of a run asks again


def file_record(path: str | os.PathLike) -> dict | None:
    """The record of a tokenizer file (SentencePiece ``.model``, HF ``tokenizer.json`` or a directory
    holding one); None when it cannot be read."""
    file = os.path.abspath(tokenizer_file(path))
    try:
        st = os.stat(file)
        key = (file, st.st_size, st.st_mtime_ns)
        if key not in _made:
            _made[key] = {"tokenizer_sha256": shardset.sha256_file(file), "source": file}
            try:
                _made[key]["tokenizer_fingerprint"] = tokenizer_fingerprint(file)
            except (OSError, ValueError):  # not readable as a tokenizer: the sha256 alone names it
                pass
    except OSError:
        return None
    return dict(_made[key])


def data_record(prefixes: list[str]) -> dict | None:
    """The record of the first dataset whose preprocessing manifest names its tokenizer (training's
    data checks have refused datasets of different tokenizers side by side); None without one."""
    for prefix in prefixes:
        try:
            recorded = shardset.recorded_tokens(prefix)
        except (OSError, ValueError):
            continue
        kept = {k: recorded[k] for k in ("tokenizer_sha256", "tokenizer_fingerprint") if k in recorded}
        if kept:
            return {**kept, "source": f"the preprocessing manifest of {prefix}"}
    return None


def run_record(config) -> dict | None:
    """The tokenizer whose ids the run ``config`` trains on: ``data.tokenizer_model`` where it is a
    file, else its datasets' manifests."""
    from megatron_osp.training.data_checks import dataset_prefixes

    d = config.data
    if d.tokenizer_model and os.path.isfile(d.tokenizer_model):
        return file_record(d.tokenizer_model)
    try:
        return data_record(dataset_prefixes(d.paths or [], d.weights))
    except (OSError, ValueError):
        return None


def checkpoint_record(train_state: dict, saved_config) -> dict | None:
    """The tokenizer a checkpoint's model learned: its train state's record, else (saved before
    records were written) what its run config names, where the files are still there."""
    record = train_state.get(KEY)
    if isinstance(record, dict) and ("tokenizer_sha256" in record or "tokenizer_fingerprint" in record):
        return record
    return run_record(saved_config)


def same(a: dict | None, b: dict | None) -> bool | None:
    """Whether two records name tokenizers of the same ids; None when that cannot be told (a side
    unknown, or a SentencePiece model against a tokenizer.json: their fingerprints are of different
    kinds, and a converted tokenizer.json may encode as its .model does)."""
    if not a or not b:
        return None
    if kinds_differ(a, b):
        return True if a.get("tokenizer_sha256") == b.get("tokenizer_sha256") else None
    return same_tokenizer(a, b)


def kinds_differ(a: dict, b: dict) -> bool:
    """Both records have a fingerprint, of different kinds (a SentencePiece model, a tokenizer.json)."""
    fa, fb = a.get("tokenizer_fingerprint"), b.get("tokenizer_fingerprint")
    return isinstance(fa, str) and isinstance(fb, str) and fa.split(":")[0] != fb.split(":")[0]


# Text both tokenizers encode when their fingerprints are of different kinds (a SentencePiece model and
# a tokenizer.json): letters of several scripts, spaces, digits, punctuation. No special-token literals
# (<s>, <unk>): how those are read is the export's own setting, checked by convert/hf_tokenizer.py.
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. 0123456789, 3.14 & 1,000,000!\n"
              "  Two  spaces, a\ttab; (brackets) [x] {y} \"quotes\" 'apostrophes' - dash_under/slash\\ @#$%^*+=~`|?\n"
              "Café naïve façade Straße, Ελληνικά, Русский текст, 日本語のテキスト, 中文, 한국어, emoji 🙂 €£¥ …")


# More texts, each encoded on its own (a text's start and end are places of their own: a dummy prefix,
# stripped leading or trailing spaces): runs of spaces and newlines longer than PROBE_TEXT's, long digit
# runs, characters an NFKC normalization rewrites (full-width letters, a ligature, a circled digit, a
# fraction, NBSP, a zero-width space), a text of one character. Encoding them takes well under a second.
PROBE_TEXTS = (
    PROBE_TEXT,
    "   three leading spaces and three trailing   ",
    "runs   of     spaces\n\n\n\nand newlines\r\n\tand\t\ttabs",
    "12345678901234567890 007 3,141,592.65 1e-10 0x1F 2024-01-31",
    "ＦＵＬＬ ｗｉｄｔｈ ﬁne ① ½ x² ㎏ Å\u00a0nbsp\u200bzero width",
    "a",
)


def same_by_encoding(a: str | os.PathLike, b: str | os.PathLike, texts=PROBE_TEXTS) -> bool | None:
    """Whether two tokenizer files (of any kinds, data/tokenizer.py) turn each of ``texts`` into the same
    ids, as preprocessing encodes it; None when either cannot be loaded here."""
    from megatron_osp.data.tokenizer import load_tokenizer

    try:
        tokenizers = [load_tokenizer(p, word_cache=False) for p in (a, b)]
        ids = [[list(t.encode(text)) for text in texts] for t in tokenizers]
    except (OSError, ValueError, RuntimeError, ImportError):
        return None
    return ids[0] == ids[1]


def describe(record: dict) -> str:
    sha = record.get("tokenizer_sha256")
    return f"{record.get('source', '?')}" + (f" (sha256 {sha[:12]})" if isinstance(sha, str) else "")
