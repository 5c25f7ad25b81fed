"""Issue #18: the exact fast path for Hugging Face byte-level BPE tokenizers (data/hf_fast.py).

- ids identical to ``tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids`` on a
  byte-level BPE trained here (GPT-2 style: ByteLevel pre-tokenizer with its regex, ByteLevel
  decoder, an ``<|endoftext|>`` added token), on corpus documents and on random Unicode documents
  (hypothesis: whitespace runs, digits, punctuation, contractions, emoji, combining marks, literal
  added tokens);
- tokenizers it cannot be exact for (a normalizer, BPE dropout, a Metaspace pre-tokenizer) and a
  pre-tokenizer split our pattern disagrees with fall back to the library with the reason logged;
- tools/preprocess_data.py writes byte-identical .bin/.idx with the fast path on and off.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_osp.data import hf_fast
from megatron_osp.data.tokenizer import HFTokenizer
from megatron_osp.testing.tokenizers import byte_level_bpe

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"


def _docs(n: int) -> list[str]:
    from megatron_osp.data.builtin_corpus import iter_documents

    out = []
    for d in iter_documents(include_source=True):
        out.append(d[:4000])
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_fast")
    docs = _docs(120)
    tok = byte_level_bpe(docs, 1200, [EOT])
    path = root / "tokenizer.json"
    tok.save(str(path))
    return {"root": root, "path": path, "docs": docs}


def _reference(path, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def _fast(path) -> HFTokenizer:
    tok = HFTokenizer(path)
    tok.encode_flat(["warm up"])
    assert tok._word_cache, "the fast path is not in use for a plain byte-level BPE"
    return tok


def _ids(tok: HFTokenizer, texts):
    return [list(x) for x in tok.encode_batch(texts)]


def test_corpus_ids_identical_to_tokenizers(trained):
    tok = _fast(trained["path"])
    docs = trained["docs"] + [d.replace("\n", f" {EOT}\n", 3) for d in trained["docs"][:10]]
    assert _ids(tok, docs) == _reference(trained["path"], docs)
    assert len(tok._word_cache) > 1000  # the words really came from the cache
    assert tok.encode(docs[0]) == _ids(tok, docs[:1])[0]


_PIECES = st.sampled_from([
    " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "\x0b", "\x0c", "\x1c", "\x85", "\u00a0", "\u3000",
    "'s", "'ll", "'S", "'", "''", "123", " 4567", "3.14", "١٢٣", "...", "!?", "#", "()", "_x_", "a", "word",
    " the", "Hello", "🙂", "👍🏽", "e\u0301", "\u0301", "ﬁ", "日本語", "Ω", EOT, "<|", "endoftext", "def f(x):",
])
_ASCII = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=30)
_UNICODE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_ASCII_PIECES = st.sampled_from([p for p in _PIECES.elements if p.isascii()])
_DOC = st.one_of(st.lists(st.one_of(_PIECES, _ASCII, _UNICODE), max_size=20).map("".join),
                 st.lists(st.one_of(_ASCII_PIECES, _ASCII), max_size=20).map("".join))  # the cache's documents


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(_DOC, min_size=1, max_size=6))
def test_random_unicode_ids_identical_to_tokenizers(trained, docs):
    tok = _fast(trained["path"])
    assert _ids(tok, docs) == _reference(trained["path"], docs)
    assert not tok._word_cache.disabled


def _variant(trained, name, change) -> Path:
    d = json.loads(trained["path"].read_text())
    change(d)
    p = trained["root"] / f"{name}.json"
    p.write_text(json.dumps(d))
    return p


FALLBACKS = {
    "normalizer": (lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer Lowercase"),
    "dropout": (lambda d: d["model"].update(dropout=0.5), "BPE dropout 0.5"),
    "metaspace": (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581",
                                                    "prepend_scheme": "always", "split": True}),
                  "pre-tokenizer Metaspace"),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_non_exact_tokenizer_falls_back_with_logged_reason(trained, name, caplog):
    change, reason = FALLBACKS[name]
    path = _variant(trained, name, change)
    tok = HFTokenizer(path)
    docs = trained["docs"][:5]
    with caplog.at_level(logging.INFO, logger="megatron_osp.data.hf_fast"):
        got = _ids(tok, docs)
    assert tok._word_cache is False
    assert any(reason in r.getMessage() and "word cache not exact" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert tok.encoding_path().startswith(f"the tokenizers library's encode_batch (word cache not exact for "
                                          f"this tokenizer: {reason}")
    if name != "dropout":  # dropout is random by design: nothing to compare with
        assert got == _reference(path, docs)


def test_pattern_that_disagrees_with_the_pre_tokenizer_is_refused(trained, caplog, monkeypatch):
    """The ASCII character classes are checked against the library's own split, not trusted."""
    wrong = hf_fast.ASCII_PATTERN.pattern.replace("0-9", "0-8")  # '9' no longer a digit
    monkeypatch.setattr(hf_fast, "ASCII_PATTERN", hf_fast.re.compile(wrong))
    tok = HFTokenizer(trained["path"])
    with caplog.at_level(logging.INFO, logger="megatron_osp.data.hf_fast"):
        docs = ["x9 19 a9b"] + trained["docs"][:3]
        assert _ids(tok, docs) == _reference(trained["path"], docs)
    assert tok._word_cache is False
    assert any("split of" in r.getMessage() and "9" in r.getMessage() for r in caplog.records)


def test_non_ascii_characters_take_the_cache_by_their_class(trained):
    tok = _fast(trained["path"])
    docs = ["café ١٢٣ x\u00a0\u3000 y e\u0301 日本語 🙂!", "naïve\u2003\u2003 Ωmega ½"]
    assert _ids(tok, docs) == _reference(trained["path"], docs)
    shadow = tok._word_cache._shadow
    got = {c: shadow.get(ord(c)) for c in "é١\u00a0\u3000\u0301日🙂½"}
    assert got == {"é": "a", "١": "0", "\u00a0": "\t", "\u3000": "\t", "\u0301": "#", "日": "a", "🙂": "#",
                   "½": "0"}
    assert not tok._word_cache._unsupported


def test_class_stand_in_that_disagrees_with_the_library_is_refused(trained, monkeypatch):
    """A non-ASCII character's class is verified against the library's split in several contexts."""
    monkeypatch.setattr(hf_fast, "_SHADOW", {"L": "0", "N": "a", "S": " ", "O": "#"})  # wrong stand-ins
    tok = _fast(trained["path"])
    docs = ["café", "1١1 x", "x\u00a0\u00a0 y", "naïve"]  # one non-ASCII character each
    assert _ids(tok, docs) == _reference(trained["path"], docs)
    assert {"é", "١", "\u00a0", "ï"} <= tok._word_cache._unsupported


def test_added_words_and_a_template_post_processor_stay_exact(trained):
    """Added (non-special) tokens match across words in the raw text: their documents go whole to the
    library; a post-processor that adds ids only with special tokens keeps the cache."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(trained["path"]))
    tok.add_tokens(["def", " return", "x = "])
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, 0)])
    path = trained["root"] / "added.json"
    tok.save(str(path))
    fast = _fast(path)
    docs = trained["docs"][:40] + ["undefined", "x = 1", "x  = 1", "return", "café def"]
    assert _ids(fast, docs) == [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    assert tok.encode("a").ids[0] == 0  # the template is there, and used with special tokens


def test_word_cache_off_uses_the_library(trained):
    tok = HFTokenizer(trained["path"], word_cache=False)
    docs = trained["docs"][:5]
    assert _ids(tok, docs) == _reference(trained["path"], docs)
    assert tok._word_cache is False


def _preprocess(corpus, tokenizer, out, *extra):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus),
                        "--tokenizer-model", str(tokenizer), "--output-prefix", str(out), "--append-eod",
                        "--no-progress", *extra], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return Path(f"{out}_text_document")


def test_preprocess_output_byte_identical_fast_path_on_and_off(trained):
    root = trained["root"]
    corpus = root / "corpus.jsonl"
    docs = trained["docs"] + ["", "café 🙂 e\u0301 " + EOT + " x", "   \n\t  ", "it's 'quoted' 123"]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    on = _preprocess(corpus, trained["path"], root / "on")
    off = _preprocess(corpus, trained["path"], root / "off", "--no-word-cache")
    two = _preprocess(corpus, trained["path"], root / "two", "--workers", "2")
    for suffix in (".bin", ".idx"):
        on_bytes = Path(str(on) + suffix).read_bytes()
        assert on_bytes == Path(str(off) + suffix).read_bytes() == Path(str(two) + suffix).read_bytes(), suffix
    ids = np.fromfile(str(on) + ".bin", dtype=np.uint16)
    want = [i for ids_ in _reference(trained["path"], [d for d in docs if d]) for i in ids_ + [0]]
    assert ids.tolist() == want


def test_preprocessing_says_which_encoding_path_it_takes_before_any_work(trained, sp_model, tmp_path):
    """The path (and why not the word cache) was only logged at INFO, which the tool does not show."""
    from megatron_osp.data.preprocess import preprocess

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in trained["docs"][:5]))
    nfc = _variant(trained, "nfc", lambda d: d.__setitem__("normalizer", {"type": "NFC"}))
    cases = [(trained["path"], {}, "encoding: exact word cache (data/hf_fast.py)"),
             (trained["path"], {"word_cache": False}, "encoding: the tokenizers library's encode_batch (--no-word-cache)"),
             (nfc, {}, "encoding: the tokenizers library's encode_batch (word cache not exact for this tokenizer: "
                       "normalizer NFC"),
             (sp_model, {}, "encoding: exact word cache (data/word_cache.py)"),
             (sp_model, {"word_cache": False}, "encoding: SentencePiece, document by document (--no-word-cache)")]
    for i, (tokenizer, kw, line) in enumerate(cases):
        lines: list[str] = []
        preprocess([str(corpus)], str(tokenizer), str(tmp_path / f"o{i}"), progress=False, log=lines.append, **kw)
        assert any(got.startswith(line) for got in lines), (line, lines)


def test_bench_preprocess_hf_runs_and_checks_identical_outputs():
    r = subprocess.run([sys.executable, "tools/bench_preprocess.py", "--tokenizer", "hf", "--corpus-mb", "0.3",
                        "--vocab-size", "600", "--workers", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "same tokens in all outputs: yes   tokenizer: HF byte-level BPE" in r.stdout
    assert re.search(r"^\s+1\s+ours\s+[\d,]+\s", r.stdout, re.M)
    assert re.search(r"docs/s ratio \(ours / re-enactment\): [\d.]+x; target >= 3x -> (met|NOT met)", r.stdout)
