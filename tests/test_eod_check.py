"""The end-of-document id training uses agrees with the one the data were made with.

Training takes data.tokenizer_model's end-of-sequence id when it is set, else data.eod_id. Before this
check, a data.eod_id other than the EOD that preprocessing appended (its manifest records ``eod`` and
``append_eod``) trained silently: documents ran together wherever the EOD id matters (the dataset's
document boundaries) and an HF export named that id as ``eos_token_id``. A data.eod_id beside a
tokenizer model that disagrees with it was ignored without a word. Both are refused before work starts,
naming the field and the dataset."""

import re

import pytest
from test_merge_datasets import _word_tokenizer

from megatron_osp.data import shardset
from megatron_osp.training.config import load_config
from megatron_osp.training.data_checks import check_data_settings, data_problems
from megatron_osp.training.validation import ConfigError

WORDS = ["hello", "world", "fox"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Preprocessing outputs of one word tokenizer: with an EOD after each document, and without."""
    from megatron_osp.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("eod")
    src = d / "c.jsonl"
    src.write_text("".join(f'{{"text": "hello world {i % 3 * "fox "}"}}\n' for i in range(8)))
    tok = _word_tokenizer(d / "t.json", WORDS)
    out = {}
    for name, append in (("eod", True), ("plain", False)):
        preprocess([str(src)], tok, str(d / name), progress=False, append_eod=append)
        out[name] = str(d / f"{name}_text_document")
    return out


def _problems(*overrides):
    return data_problems(load_config(None, ["model.vocab_size=64", *overrides]))


def test_a_data_eod_id_other_than_the_recorded_eod_is_refused_naming_the_dataset(made):
    eod = shardset.recorded_tokens(made["eod"])["eod"]
    assert shardset.recorded_tokens(made["eod"])["append_eod"] is True
    wrong = eod + 1
    problems = _problems(f"data.paths=[{made['eod']}]", f"data.eod_id={wrong}")
    assert problems == [f"data.paths: {made['eod']} ends its documents with EOD id {eod} (its manifest records it), "
                        f"but data.eod_id is {wrong}: documents would run together and an export would name the "
                        f"wrong eos_token_id; set data.eod_id={eod}"], problems
    with pytest.raises(ConfigError, match=re.escape(f"set data.eod_id={eod}")):
        check_data_settings(load_config(None, ["model.vocab_size=64", f"data.paths=[{made['eod']}]",
                                               f"data.eod_id={wrong}"]))
    assert _problems(f"data.paths=[{made['eod']}]", f"data.eod_id={eod}") == []
    # in a mix, the dataset that disagrees is the one named
    problems = _problems(f"data.paths=[{made['plain']},{made['eod']}]", f"data.eod_id={wrong}")
    assert len(problems) == 1 and problems[0].startswith(f"data.paths: {made['eod']} ends its documents"), problems


def test_data_without_an_appended_eod_takes_any_eod_id(made, toy_corpus):
    """No EOD in the data (append_eod false), or no manifest at all (written by Megatron-Core): nothing
    to compare with."""
    assert shardset.recorded_tokens(made["plain"])["append_eod"] is False
    assert _problems(f"data.paths=[{made['plain']}]", "data.eod_id=2") == []
    assert data_problems(load_config(None, [f"data.paths=[{toy_corpus}]", "data.eod_id=7"])) == []


def test_a_data_eod_id_that_differs_from_the_tokenizer_models_eos_is_refused(sp_model, toy_corpus):
    """It was ignored: training took the tokenizer's end-of-sequence id whatever data.eod_id said."""
    import sentencepiece as spm

    eos = spm.SentencePieceProcessor(model_file=sp_model).eos_id()
    base = [f"data.paths=[{toy_corpus}]", f"data.tokenizer_model={sp_model}"]
    problems = data_problems(load_config(None, [*base, f"data.eod_id={eos + 3}"]))
    assert problems == [f"data.eod_id={eos + 3} differs from the end-of-sequence id {eos} of data.tokenizer_model="
                        f"{sp_model}, which training uses: leave data.eod_id unset (or set it to {eos})"], problems
    assert data_problems(load_config(None, [*base, f"data.eod_id={eos}"])) == []
    assert data_problems(load_config(None, base)) == []


def test_a_validation_set_that_ends_its_documents_with_another_eod_is_refused(made, toy_corpus):
    """Training data without a manifest (written by Megatron-Core) gives the validation set's EOD nothing
    to be compared with but data.eod_id: its documents would run together in the validation loss."""
    eod = shardset.recorded_tokens(made["eod"])["eod"]
    base = ["model.vocab_size=256", f"data.paths=[{toy_corpus}]", f"data.valid_paths=[{made['eod']}]", "data.split=100"]
    problems = data_problems(load_config(None, [*base, "data.eod_id=255"]))
    assert problems == [f"data.valid_paths: {made['eod']} ends its documents with EOD id {eod} (its manifest records "
                        "it), but data.eod_id is 255: its documents would run together in the validation loss; make "
                        "it with the training data's end-of-document token (preprocess_data.py --eod-token)"], problems
    assert data_problems(load_config(None, [*base, f"data.eod_id={eod}"])) == []


def test_no_eod_setting_names_the_id_the_datas_manifest_records(made):
    """A run on a tokenizer.json's output (the README: data.eod_id instead of data.tokenizer_model) that
    sets neither was told only 'set data.tokenizer_model (or data.eod_id)', without the id, which the
    data's manifest records. Data without an appended EOD get the old line."""
    eod = shardset.recorded_tokens(made["eod"])["eod"]
    problems = _problems(f"data.paths=[{made['eod']}]")
    assert len(problems) == 1 and problems[0].startswith(
        f"set data.eod_id={eod} (the end-of-document id the data's manifest records)"), problems
    assert _problems(f"data.paths=[{made['eod']}]", f"data.eod_id={eod}") == []
    assert _problems(f"data.paths=[{made['plain']}]") == [
        "set data.tokenizer_model (or data.eod_id) so documents can be separated"]


def test_a_model_vocab_size_below_the_recorded_vocabulary_is_named_with_the_size_to_set(made):
    """Without data.tokenizer_model (a tokenizer.json's output) a model.vocab_size below the data's
    tokenizer was found only by the .bin scan when the datasets were built, naming the largest id seen
    ('set the tokenizer/vocab_size it was made with'), not the size. Now refused with the checks, with
    the size the manifest records."""
    recorded = shardset.recorded_tokens(made["eod"])
    eod, size = recorded["eod"], recorded["vocab_size"]
    problems = data_problems(load_config(None, [f"model.vocab_size={size - 1}", f"data.paths=[{made['eod']}]",
                                                f"data.eod_id={eod}"]))
    assert problems == [f"model.vocab_size={size - 1} is smaller than the vocabulary of the tokenizer {made['eod']} "
                        f"was made with ({size} ids, its manifest records it): set model.vocab_size={size} "
                        "(or larger)"], problems
    assert data_problems(load_config(None, [f"model.vocab_size={size}", f"data.paths=[{made['eod']}]",
                                            f"data.eod_id={eod}"])) == []
