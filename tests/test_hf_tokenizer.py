"""An exported tokenizer tokenizes like training (issue #14, case 7).

A run is made with the CLI tools on WikiText-like text full of literal ``<unk>``/``<s>``/``</s>``
(tests/hf_run_fixtures.py) and exported with tools/convert_to_hf.py. Then:
- stock ``AutoTokenizer.from_pretrained(export)`` (no extra arguments) gives the ids of the run's
  SentencePiece model on those literals, on the corpus, and on random text (hypothesis), with and
  without ``add_special_tokens``, one text or a batch; ``<s>``/``</s>``/``<unk>`` stay its special
  tokens (bos/eos ids, decode);
- tokenizing a held-out text through the export's tokenizer (ids + eos per document, as
  preprocessing appends EOD) gives the same .bin as tools/preprocess_data.py, and
  tools/evaluate_quantization.py's full-precision perplexity of the HF export on it equals that of
  the Megatron run on the preprocessed data (relative 1e-4, float32);
- a SentencePiece Unigram model exports with the same property on those literals.
"""

import json
import random
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_run_fixtures import LITERALS, WORDS, make_run, preprocess, run_tool, sample_text, tool, write_corpus

ISSUE_TEXT = "a <s> b </s> c <unk> d"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hftok")
    paths = make_run(root)
    run_tool([tool("convert_to_hf"), str(paths["checkpoints"]), str(root / "hf")])
    paths["hf"] = root / "hf"
    return paths


@lru_cache(maxsize=4)
def _tokenizers(hf_dir: str, sp_model: str):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir), spm.SentencePieceProcessor(model_file=sp_model)


def _assert_same_ids(tok, sp, texts):
    want = [sp.encode(t) for t in texts]
    assert tok(texts)["input_ids"] == want
    for text, ids in zip(texts, want):
        assert tok(text)["input_ids"] == ids, text
        assert tok.encode(text, add_special_tokens=False) == ids, text


def test_literal_special_strings_encode_like_sentencepiece(exported):
    tok, sp = _tokenizers(str(exported["hf"]), str(exported["tokenizer"]))
    ids = sp.encode(ISSUE_TEXT)
    assert len(ids) > 7 and not {0, 1, 2} & set(ids)  # SentencePiece spells the literals out
    corpus = [json.loads(line)["text"] for line in exported["corpus"].read_text().splitlines()]
    assert sum(t.count("<unk>") for t in corpus) > 100
    _assert_same_ids(tok, sp, [ISSUE_TEXT, "<unk>", "<s></s>", " <unk> 's", *corpus[:40]])
    # The special tokens are still the special tokens.
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.convert_tokens_to_ids("</s>") == sp.eos_id() and tok.decode([sp.eos_id()]) == "</s>"
    assert tok.decode(ids + [sp.eos_id()], skip_special_tokens=True) == ISSUE_TEXT
    config = json.loads((exported["hf"] / "config.json").read_text())
    generation = json.loads((exported["hf"] / "generation_config.json").read_text())
    assert config["bos_token_id"] == generation["bos_token_id"] == sp.bos_id()
    assert config["eos_token_id"] == generation["eos_token_id"] == sp.eos_id()


_PIECES = st.sampled_from(LITERALS + WORDS + (" ", "  ", "\n", "\t", "<", ">", "/", "<pad>", "é", "😀", "▁", "x"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(_PIECES, max_size=25), noise=st.text(alphabet="<>/sunk ab\n", max_size=20))
def test_random_text_encodes_like_sentencepiece(exported, pieces, noise):
    tok, sp = _tokenizers(str(exported["hf"]), str(exported["tokenizer"]))
    _assert_same_ids(tok, sp, ["".join(pieces) + noise, noise + " ".join(pieces)])


def test_hf_perplexity_equals_evaluate_quantization_on_megatron(exported, tmp_path):
    """Same text, two paths: preprocess_data.py + the Megatron run, and the export's tokenizer + the
    HF model; evaluate_quantization.py measures both."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_osp.data.indexed import IndexedDataset

    tok, sp = _tokenizers(str(exported["hf"]), str(exported["tokenizer"]))
    texts = write_corpus(tmp_path / "heldout.jsonl", 40, seed=7)
    assert sum(t.count("<unk>") + t.count("</s>") for t in texts) > 30
    sp_prefix = preprocess(tmp_path / "heldout.jsonl", exported["tokenizer"], tmp_path / "sp")
    hf_prefix = str(tmp_path / "hf_text_document")
    builder = IndexedDatasetBuilder(hf_prefix + ".bin", dtype=np.uint16)
    for text in texts:  # a document is its ids and the end-of-document token, as preprocessing does
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(hf_prefix + ".idx")
    a, b = IndexedDataset(sp_prefix), IndexedDataset(hf_prefix)
    assert len(a) == len(b) == len(texts)
    for i in range(len(a)):
        assert np.array_equal(a[i], b[i]), f"document {i} tokenizes differently"

    def fp_perplexity(model, data, out):
        run_tool([tool("evaluate_quantization"), str(model), "--data", data, "--documents", "0:1",
                  "--num-windows", "8", "--settings", "fp", "--weight-error-windows", "0", "--stats-windows", "1",
                  "--device", "cpu", "--no-plots", "--output-dir", str(out)])
        result = json.loads((out / "quantization.json").read_text())
        assert result["meta"]["sequences"] == 8
        return result["models"][0]["perplexity"]["fp"]

    megatron = fp_perplexity(exported["run"], sp_prefix, tmp_path / "q_megatron")
    hf = fp_perplexity(exported["hf"], hf_prefix, tmp_path / "q_hf")
    ppl = {k: (v["perplexity"] if isinstance(v, dict) else v) for k, v in (("megatron", megatron), ("hf", hf))}
    assert 1 < ppl["megatron"] < 1e4
    assert abs(ppl["hf"] - ppl["megatron"]) <= 1e-4 * ppl["megatron"], ppl


def test_unigram_model_exports_literals_like_sentencepiece(tmp_path):
    """A SentencePiece Unigram model: HF's Unigram would match its <s>/</s>/<unk> pieces in text."""
    import sentencepiece as spm

    from megatron_osp.convert.hf_tokenizer import save_tokenizer

    rng = random.Random(3)
    lines = [sample_text(rng, 20) for _ in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "uni"), vocab_size=300,
                                   model_type="unigram", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    out = tmp_path / "hf"
    out.mkdir()
    warnings = []
    ids = save_tokenizer(tmp_path / "uni.model", out, log=warnings.append)
    assert ids["eos_token_id"] == 2 and ids["bos_token_id"] == 1
    tok, sp = _tokenizers(str(out), str(tmp_path / "uni.model"))
    _assert_same_ids(tok, sp, [ISSUE_TEXT, "<unk><s></s>", *lines[:40]])
    assert not warnings, warnings
    shutil.rmtree(out)
