"""Inputs and options of the data tools from an outside sweep: each refused before work with a message
naming what is wrong (the file, line or flag), or handled without wrong or partial output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_osp.data.preprocess import BadRecord, preprocess
from megatron_osp.data.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"record {i}: the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(120)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(train_sentencepiece(corpus, d / "tok", vocab_size=300))


def _cli(tool, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_inputs_of_only_bad_records_skipped_are_all_named_with_the_count(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"text": 1}\n{"text": null}\n')
    (tmp_path / "b.jsonl").write_text('{"other": "x"}\n')
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(BadRecord) as e:
        preprocess(inputs, tok, str(tmp_path / "out" / "o"), skip_bad_records=True, progress=False)
    assert str(e.value).startswith(f"{inputs[0]}, {inputs[1]}: no non-empty documents"), str(e.value)
    assert f"3 bad records skipped (first: {inputs[0]}:1, {inputs[0]}:2, {inputs[1]}:1)" in str(e.value)
    many = [str(tmp_path / f"m{i}.jsonl") for i in range(5)]
    for m in many:
        Path(m).write_text('{"text": ""}\n{"text": 2}\n')
    with pytest.raises(BadRecord) as e:
        preprocess(many, tok, str(tmp_path / "out" / "o"), skip_bad_records=True, progress=False)
    assert str(e.value).startswith(f"5 inputs ({many[0]} ... {many[-1]}): no non-empty documents"), str(e.value)
    assert "5 bad records skipped" in str(e.value) and "5 empty documents dropped" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
