"""Preprocessing never replaces an earlier output that is not a rerun over the same inputs without
--overwrite: a merge's output or an output of other inputs given as --output-prefix was replaced
without a word. The refusal names the existing file and the option, before any tokenizing."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_osp.data import preprocess as preprocess_module
from megatron_osp.data.merge import merge_datasets
from megatron_osp.data.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _snapshot(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())
            if p.is_file()}


@pytest.fixture
def two(tmp_path, sp_model):
    a = _write(tmp_path / "a.jsonl", ["hello a", "hello b"])
    b = _write(tmp_path / "b.jsonl", ["other c"])
    preprocess([a], sp_model, str(tmp_path / "a"), progress=False)
    preprocess([b], sp_model, str(tmp_path / "b"), progress=False)
    return tmp_path, a, b


def _no_tokenizing(monkeypatch):
    def refuse(_):
        raise AssertionError("tokenizing started")
    monkeypatch.setattr(preprocess_module, "_tokenize_chunk", refuse)


def test_a_merge_output_is_not_replaced_by_preprocessing(two, sp_model, monkeypatch):
    d, a, b = two
    merge_datasets([str(d / "a_text_document"), str(d / "b_text_document")], str(d / "m_text_document"))
    before = _snapshot(d)
    _no_tokenizing(monkeypatch)
    with pytest.raises(ValueError, match=r"m_text_document\.bin: an earlier output is there \(it is the output of "
                                         r"tools/merge_datasets\.py\).*--overwrite"):
        preprocess([b], sp_model, str(d / "m"), progress=False)
    assert _snapshot(d) == before


def test_an_output_of_other_inputs_is_not_replaced(two, sp_model, monkeypatch):
    d, a, b = two
    before = _snapshot(d)
    _no_tokenizing(monkeypatch)
    with pytest.raises(ValueError, match=r"a_text_document\.bin: an earlier output is there \(it was made from other "
                                         r"inputs \(.*a\.jsonl\)\)"):
        preprocess([b], sp_model, str(d / "a"), progress=False)
    with pytest.raises(ValueError, match="an earlier output is there"):  # same files plus one: other inputs too
        preprocess([a, b], sp_model, str(d / "a"), progress=False)
    assert _snapshot(d) == before


def test_a_dataset_without_manifest_is_not_replaced(two, sp_model):
    d, a, b = two
    (d / "a_text_document.shards.json").unlink()  # a Megatron-made dataset, or one whose manifest is gone
    before = _snapshot(d)
    with pytest.raises(ValueError, match="its files have no manifest saying which inputs made them"):
        preprocess([a], sp_model, str(d / "a"), progress=False)
    assert _snapshot(d) == before


def test_a_rerun_over_the_same_inputs_and_overwrite_replace(two, sp_model):
    d, a, b = two
    # the same file, named another way, with other options: a rerun, replaced as before
    stats = preprocess([str(Path(a).parent / "." / "a.jsonl")], sp_model, str(d / "a"), progress=False,
                       max_shard_tokens=3)
    assert [Path(p).name for p in stats.outputs][0] == "a_text_document_00000"
    assert not (d / "a_text_document.bin").exists()
    stats = preprocess([b], sp_model, str(d / "a"), progress=False, overwrite=True)
    assert stats.documents == 1 and (d / "a_text_document.bin").exists()
    assert json.loads((d / "a_text_document.shards.json").read_text())["inputs"] == [b]


def test_the_cli_names_the_file_and_option(two, sp_model):
    d, a, b = two
    args = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", b, "--tokenizer-model", sp_model,
            "--output-prefix", str(d / "a"), "--no-progress"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{d / 'a_text_document.bin'}: an earlier output is there" in r.stderr
    assert "--overwrite to replace it" in r.stderr
    r = subprocess.run(args + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_merging_array_tasks_refuses_an_output_of_other_inputs(two, sp_model):
    """merge_datasets.py --tasks publishes a preprocessing output the same way: it replaced an earlier
    output of other inputs on its prefix without a word. The same rule: a rerun of the run's inputs
    replaces, anything else needs --overwrite."""
    from megatron_osp.data.merge import merge_tasks

    d, a, b = two
    for i in range(2):  # tasks over [b, a] for the prefix "a", whose earlier output is of [a] alone
        preprocess([b, a], sp_model, str(d / "a"), progress=False, task=(i, 2))
    before = _snapshot(d)
    with pytest.raises(ValueError, match=r"a_text_document\.bin: an earlier output is there \(it was made from other "
                                         r"inputs .*--overwrite"):
        merge_tasks(str(d / "a"))
    assert _snapshot(d) == before
    cli = [sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--tasks", str(d / "a")]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--overwrite to replace it" in r.stderr and _snapshot(d) == before, r.stderr
    r = subprocess.run(cli + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((d / "a_text_document.shards.json").read_text())["inputs"] == [b, a]
    assert merge_tasks(str(d / "a"))["tasks"] == 2  # a rerun: the same inputs
