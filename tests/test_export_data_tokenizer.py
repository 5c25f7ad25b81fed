"""The HF export of a run trained on a Hugging Face ``tokenizer.json``'s preprocessing output, as the
README says such a run is made: ``data.eod_id`` and ``model.vocab_size`` instead of
``data.tokenizer_model`` (training reads only SentencePiece models). The run names no tokenizer, but
its data's preprocessing manifest records the file; the export used to write no tokenizer at all, without
a word, so stock ``AutoTokenizer`` could not load it.

The run is made with the CLI tools, in its own directory with relative paths, as a user makes one.
"""

import json
import os
import shutil

import pytest

from hf_run_fixtures import run_tool, tool
from test_hf_convert import _tool  # the tools' main(), in this process

SPECIAL = "<|endoftext|>"


def _texts(n: int) -> list[str]:
    words = ("alpha", "beta", "gamma", "délta", "日本語", "код", "x=1;", "\n", "  ", "42", "end.")
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 23)) for i in range(n)]


def _make(root, mode: str) -> dict:
    """corpus -> byte-level BPE tokenizer.json -> preprocess (``--special-tokens-in-text mode``) -> a
    one-step run with data.eod_id, everything relative to ``root``."""
    from megatron_osp.testing.tokenizers import byte_level_bpe

    root.mkdir()
    texts = _texts(120) + [f"a page that writes {SPECIAL} in its text", f"{SPECIAL}x"]
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    tok = byte_level_bpe(texts, 400)
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    run_tool([tool("preprocess_data"), "--input", "corpus.jsonl", "--tokenizer-model", "tok/tokenizer.json",
              "--output-prefix", "corpus", "--append-eod", "--no-progress", "--special-tokens-in-text", mode],
             cwd=root)
    run_tool(["-m", "megatron_osp.training.pretrain", "model.preset=test", f"model.vocab_size={tok.get_vocab_size()}",
              "model.seq_length=32", "data.paths=[corpus_text_document]", "data.eod_id=0", "data.split=90,10,0",
              "optimizer.name=adam", "train.train_steps=1", "train.warmup_steps=0", "train.global_batch_size=4",
              "train.micro_batch_size=4", "train.eval_batches=1", "train.tensorboard=false",
              "train.progress_bar=false", "train.run_dir=run"], cwd=root)
    return {"root": root, "texts": texts, "run": root / "run", "data": str(root / "corpus_text_document")}


@pytest.fixture(scope="module")
def encode_run(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("hfdata") / "encode", "encode")


def _bin_docs(prefix: str) -> list[list[int]]:
    from megatron_osp.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    return [[int(t) for t in ds[i]] for i in range(len(ds))]


def test_the_export_carries_the_tokenizer_the_datas_manifest_records(encode_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    assert _tool("convert_to_hf").main([str(encode_run["run"]), str(out)]) == 0
    assert "the preprocessing manifest of" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    docs = _bin_docs(encode_run["data"])
    assert len(docs) == len(encode_run["texts"])
    for text, ids in zip(encode_run["texts"], docs):  # the training data's ids, EOD (0) appended
        assert tok(text)["input_ids"] + [0] == ids, text


def test_a_recorded_tokenizer_that_is_gone_stops_the_export(encode_run, tmp_path, capsys):
    root = tmp_path / "moved"
    shutil.copytree(encode_run["root"], root)
    (root / "tok" / "tokenizer.json").unlink()
    manifest = root / "corpus_text_document.shards.json"  # as if preprocessed here, then the tokenizer removed
    m = json.loads(manifest.read_text())
    m["tokenizer"] = str(root / "tok" / "tokenizer.json")
    manifest.write_text(json.dumps(m))
    to_hf = _tool("convert_to_hf")
    assert to_hf.main([str(root / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"made with the tokenizer {root / 'tok' / 'tokenizer.json'}" in err and "--no-tokenizer" in err, err
    assert not (tmp_path / "hf").exists()
    assert to_hf.main([str(root / "run"), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def test_split_data_exported_from_another_directory_keeps_split_special_tokens(tmp_path_factory, tmp_path, capsys):
    """A run whose data.paths are relative (trained from its project directory), exported from elsewhere:
    the manifest that says the data were made with --special-tokens-in-text split was looked up relative to
    the export's working directory only, not found, and the export's tokenizer encoded '<|endoftext|>'
    written in a text as the EOD id, where the training data hold it as ordinary text. Now the manifest is
    found under the checkpoint's parent directories, as the tokenizer is."""
    from transformers import AutoTokenizer

    made = _make(tmp_path_factory.mktemp("hfsplit") / "split", "split")
    out = tmp_path / "hf"
    assert os.getcwd() != str(made["root"])
    assert _tool("convert_to_hf").main([str(made["run"]), str(out)]) == 0
    assert "no manifest of" not in capsys.readouterr().out
    assert json.loads((out / "tokenizer_config.json").read_text()).get("split_special_tokens") is True
    tok = AutoTokenizer.from_pretrained(str(out))
    docs = _bin_docs(made["data"])
    for text, ids in zip(made["texts"], docs):
        assert tok(text)["input_ids"] + [0] == ids, text
    assert 0 not in docs[-1][:-1]  # the literal special token was ordinary text in the data


def test_a_sentencepiece_model_of_other_ids_than_the_datas_tokenizer_json_is_refused(encode_run, tmp_path, capsys):
    """The run learned the ids of the tokenizer.json its data's manifest records; --tokenizer naming an
    unrelated SentencePiece model (a fingerprint of the other kind) exported without a word. Both encode a
    probe text now, and the export is refused naming both."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(t[::-1].upper() for t in encode_run["texts"]),
                                   model_prefix=str(tmp_path / "other"), vocab_size=310, model_type="bpe",
                                   byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    out = tmp_path / "hf"
    assert _tool("convert_to_hf").main([str(encode_run["run"]), str(out), "--tokenizer",
                                        str(tmp_path / "other.model")]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer {tmp_path / 'other.model'} encodes differently from the preprocessing manifest of" in err, err
    assert f"({encode_run['root'] / 'tok' / 'tokenizer.json'})" in err and not out.exists(), err
