"""tools/check_tokenization.py: preprocessing's ids against the tokenizer library's own, on a user's corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_tokenization  # noqa: E402

TEXTS = [f"doc {i}: it's the quick brown fox, {i * 37} times; café 🙂 <|endoftext|> x" for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_osp.testing.tokenizers import byte_level_bpe

    root = tmp_path_factory.mktemp("check_tok")
    tok = byte_level_bpe(TEXTS, 400)
    tok.save(str(root / "tokenizer.json"))
    path = root / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:20]) + "{broken\n"
                    + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[20:]))
    return {"tokenizer": str(root / "tokenizer.json"), "corpus": str(path)}


def test_identical_ids_on_both_paths_and_both_libraries(corpus, sp_model, capsys):
    for tokenizer, extra, path in [(corpus["tokenizer"], [], "exact word cache (data/hf_fast.py)"),
                                   (corpus["tokenizer"], ["--special-tokens-in-text", "split"], "exact word cache"),
                                   (corpus["tokenizer"], ["--no-word-cache"], "encode_batch (--no-word-cache)"),
                                   (sp_model, [], "exact word cache (data/word_cache.py)")]:
        assert check_tokenization.main(["--input", corpus["corpus"], "--tokenizer-model", tokenizer, *extra]) == 0
        out = capsys.readouterr().out
        assert path in out and "compared 60 documents" in out and "1 bad records skipped" in out
        assert "identical: every document has the library's ids" in out


def test_a_difference_is_found_and_located(corpus, capsys, monkeypatch):
    """An encoder that changes one id of the document on line 6 (as a word-cache bug would)."""
    from megatron_osp.data.tokenizer import HFTokenizer

    real = HFTokenizer.encode_batch

    def off_by_one(self, texts, threads=-1):
        out = real(self, texts, threads)
        for ids, text in zip(out, texts):
            if text == TEXTS[5]:
                ids[4] = ids[4] + 1
        return out

    monkeypatch.setattr(HFTokenizer, "encode_batch", off_by_one)
    assert check_tokenization.main(["--input", corpus["corpus"], "--tokenizer-model", corpus["tokenizer"]]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT: 1 of 60 documents" in out
    assert f"{corpus['corpus']}:6: token 4: ours " in out
    want = [int(x) for x in np.asarray(real(HFTokenizer(corpus["tokenizer"]), [TEXTS[5]])[0])[1:8]]
    assert f"library {want}" in out


def test_bad_input_is_one_line(corpus, tmp_path, capsys):
    assert check_tokenization.main(["--input", str(tmp_path / "none.jsonl"), "--tokenizer-model", corpus["tokenizer"]]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert check_tokenization.main(["--input", corpus["corpus"], "--tokenizer-model", corpus["corpus"]]) == 2
    assert "not a SentencePiece model" in capsys.readouterr().err
    assert check_tokenization.main(["--input", corpus["corpus"], "--tokenizer-model", corpus["tokenizer"],
                                    "--json-key", "body"]) == 2
    assert "no readable document with key 'body'" in capsys.readouterr().err


def test_an_input_of_only_bad_records_says_how_many_were_skipped(corpus, tmp_path, capsys):
    """It said only 'no readable document', as if the input were empty."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n{broken\n{"other": "x"}\n')
    assert check_tokenization.main(["--input", str(bad), "--tokenizer-model", corpus["tokenizer"]]) == 2
    assert f"no readable document with key 'text' in {bad} (3 bad records skipped)" in capsys.readouterr().err


def test_an_input_given_twice_is_refused_as_preprocessing_refuses_it(corpus, capsys):
    """It was compared twice (documents counted double, 'from 2 file(s)') where preprocess_data.py, given
    the same --input, refuses the run."""
    path = Path(corpus["corpus"])
    for inputs in ([str(path), str(path)], [str(path), str(path.parent)]):
        assert check_tokenization.main(["--input", *inputs, "--tokenizer-model", corpus["tokenizer"]]) == 2
        captured = capsys.readouterr()
        assert "given twice as input" in captured.err and str(path) in captured.err, captured
        assert "its documents would be compared twice" in captured.err and "output" not in captured.err, captured
        assert "compared" not in captured.out
