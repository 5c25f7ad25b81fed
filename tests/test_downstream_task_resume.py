"""tools/evaluate_downstream.py --resume after a local task's files changed.

A tiny HF Llama (transformers, random weights) with a trained SentencePiece tokenizer and the local
tasks of test_downstream.py; the harness builds the tasks for real, the scoring is a stand-in that
counts its calls (the harness's scoring is not the subject).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from hf_run_fixtures import REPO, run_tool, tool, write_corpus  # noqa: E402
from test_downstream import write_tasks  # noqa: E402


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_osp.convert.hf_tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("task_resume")
    write_corpus(root / "corpus.jsonl", 40, seed=0)
    run_tool([tool("train_tokenizer"), "--input", str(root / "corpus.jsonl"), "--output-prefix",
              str(root / "tokenizer"), "--vocab-size", "320"])
    hf = root / "hf"
    hf.mkdir()
    ids = save_tokenizer(root / "tokenizer.model", hf, log=lambda *_: None)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"))
    LlamaForCausalLM(cfg).save_pretrained(hf)
    return hf


def test_resume_refuses_a_local_task_whose_data_changed(hf_model, tmp_path, monkeypatch, capsys):
    """--resume used to compare only the task names and options: after a local task's JSONL was rewritten
    (regenerated tasks, a fixed label) it kept the earlier settings' scores, made on the old documents,
    evaluated the rest on the new ones and reported the difference as the quantization drop. Now the
    tasks' content is part of what resuming checks: refused, naming the task, the report untouched; the
    same content again resumes."""
    import lm_eval.evaluator

    import megatron_osp.analysis.downstream as downstream

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    calls = []

    def fake_task(lm, spec, tm, limit=None, keep_loglikelihoods=False):
        calls.append(spec.name)
        if stop_at is not None and len(calls) == stop_at:
            raise RuntimeError("the job's time limit")
        return {"metrics": {"acc": {"value": 0.5, "stderr": 0.1}}, "score_metric": "acc", "score": 0.5,
                "stderr": 0.1, "num_fewshot": spec.num_fewshot, "n": 16, "seconds": 0.0}

    monkeypatch.setattr(downstream, "evaluate_task", fake_task)
    tasks, out = write_tasks(tmp_path / "tasks"), tmp_path / "out"
    common = [str(hf_model), "--tasks", "toy_mc", "--include-path", str(tasks), "--settings", "fp,4-4-4",
              "--device", "cpu", "--no-plots", "--output-dir", str(out)]
    stop_at = 2  # fp done, stopped in 4-4-4
    with pytest.raises(RuntimeError, match="time limit"):
        evaluate_downstream.main(common)
    partial = (out / "downstream.json").read_text()
    assert json.loads(partial)["progress"][0]["done"] == ["fp"]

    data = tasks / "toy_mc.jsonl"
    original = data.read_text()
    rows = [json.loads(line) for line in original.splitlines()]
    rows[3]["label"] = (rows[3]["label"] + 1) % 4  # one answer corrected
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls.clear()
    stop_at = None
    capsys.readouterr()
    assert evaluate_downstream.main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: " in err and "was made with task_data.toy_mc = " in err, err
    assert "data files or YAML were changed" in err, err
    assert calls == [] and (out / "downstream.json").read_text() == partial

    data.write_text(original)  # the documents the report's results were made on
    assert evaluate_downstream.main([*common, "--resume"]) == 0
    assert calls == ["toy_mc"]
    assert json.loads((out / "downstream.json").read_text())["complete"] is True
