"""tools/evaluate_quantization.py on models of different windows: every model's held-out sequences are
of one length (--seq-length, or the first model's window)."""

from __future__ import annotations

import sys

import numpy as np

from hf_run_fixtures import REPO
from test_quantization import _tiny_llama


def test_sequences_longer_than_a_models_window_are_refused_before_any_model_loads(tmp_path, capsys):
    """A second model trained on 16-token sequences was scored on the first model's 64-token windows
    (or a --seq-length beyond every window): perplexity at positions it never trained on, reported
    beside the other model's as if comparable. Refused naming the model and the length that fits."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_quantization
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_osp.data.indexed import IndexedDatasetWriter

    _tiny_llama(0).save_pretrained(tmp_path / "long")  # max_position_embeddings 64
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=16)).save_pretrained(tmp_path / "short")
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(300) % 96)
    common = ["--data", str(tmp_path / "held"), "--documents", "0:1", "--settings", "fp", "--num-windows", "2",
              "--weight-error-windows", "0", "--device", "cpu", "--no-plots", "--output-dir", str(tmp_path / "out")]
    for models, extra, expected in (
        (["long", "short"], [], f"{tmp_path / 'short'}: its window is 16 tokens, shorter than the 64-token sequences "
                                f"evaluated (the window of {tmp_path / 'long'}): pass --seq-length 16"),
        (["long"], ["--seq-length", "100"], f"{tmp_path / 'long'}: its window is 64 tokens, shorter than the "
                                            "100-token sequences evaluated (--seq-length): pass --seq-length 64"),
    ):
        rc = evaluate_quantization.main([*(str(tmp_path / m) for m in models), *extra, *common])
        out, err = capsys.readouterr()
        assert rc == 2 and expected in err and "== " not in out, out + err
        assert not (tmp_path / "out").exists()
    assert evaluate_quantization.main([str(tmp_path / "long"), str(tmp_path / "short"), "--seq-length", "16",
                                       *common]) == 0


def test_gptq_calibration_longer_than_a_models_window_is_refused(tmp_path, capsys, monkeypatch):
    """evaluate_downstream --seq-length (the GPTQ calibration windows' length) beyond a model's window
    calibrated on positions it never trained on, without a word. Refused naming the model."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    import megatron_osp.analysis.downstream as downstream
    from megatron_osp.data.indexed import IndexedDatasetWriter

    _tiny_llama(0).save_pretrained(tmp_path / "m")  # max_position_embeddings 64
    (tmp_path / "m" / "tokenizer_config.json").write_text("{}")
    from test_model_files_precheck import tiny_tokenizer_json

    tiny_tokenizer_json(tmp_path / "m")  # evaluate_downstream needs a tokenizer
    with IndexedDatasetWriter(tmp_path / "calib") as writer:
        for _ in range(4):
            writer.add_document(np.arange(300) % 96)
    loaded = []
    monkeypatch.setattr(downstream, "check_tasks", lambda *a, **k: None)  # the tasks are not the subject
    monkeypatch.setattr(downstream, "load_eval_model", lambda path, **kw: loaded.append(path) or 1 / 0)
    rc = evaluate_downstream.main([str(tmp_path / "m"), "--tasks", "toy", "--settings", "fp,4-4-4+gptq",
                                   "--calibration-data", str(tmp_path / "calib"), "--calibration-windows", "2",
                                   "--seq-length", "100", "--device", "cpu", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and loaded == [] and f"error: {tmp_path / 'm'}: its window is 64 tokens, shorter than " \
        "--seq-length 100" in err, err
