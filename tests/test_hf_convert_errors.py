"""Bad input to the Hugging Face import and export, named before anything is written (no fixture run:
tiny in-memory or saved Llamas).

- convert_from_hf.py: weights that disagree with config.json, options training would refuse, a
  truncated model.safetensors or config.json (also through evaluate_quantization.py);
- the export's tensor mapping refuses to write NaN or inf.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from test_hf_convert import _logical_for, _tool


def test_import_names_a_tensor_that_does_not_match_config_json(tmp_path, capsys):
    """An HF directory whose config.json disagrees with its weights (intermediate_size or
    num_key_value_heads edited) used to stop with a bare reshape RuntimeError traceback; now the
    tensor, its shape and the config fields are named, exit 2, nothing written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "llama"))
    from_hf = _tool("convert_from_hf")
    for field, value, words in (
        ("intermediate_size", 128, "layers.0.mlp.gate_proj.weight has shape (96, 64), but config.json implies "
                                   "(intermediate_size=128, hidden_size=64)"),
        ("num_key_value_heads", 2, "layers.0.self_attn.k_proj.weight has shape (64, 64), but config.json implies "
                                   "(num_key_value_heads*head_dim=32, hidden_size=64)"),
    ):
        edited = tmp_path / field
        shutil.copytree(tmp_path / "llama", edited)
        data = json.loads((edited / "config.json").read_text())
        data[field] = value
        (edited / "config.json").write_text(json.dumps(data))
        assert from_hf.main([str(edited), str(tmp_path / f"out_{field}")]) == 2
        err = capsys.readouterr().err
        assert words in err, err
        assert not (tmp_path / f"out_{field}").exists()


def test_import_refuses_options_training_would_refuse(tmp_path, capsys):
    """--seq-length 0 or -5 used to write a checkpoint whose run config no run can load (and whose export
    has max_position_embeddings=-5); --make-vocab-size-divisible-by 0 ended in a ZeroDivisionError
    traceback. Now the field is named, exit 2, nothing written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=16)).save_pretrained(str(tmp_path / "llama"))
    from_hf = _tool("convert_from_hf")
    for option, value, words in (("--seq-length", "-5", "model.seq_length=-5: must be >= 1"),
                                 ("--seq-length", "0", "model.seq_length=0: must be >= 1"),
                                 ("--make-vocab-size-divisible-by", "0", "model.make_vocab_size_divisible_by=0: must be >= 1")):
        out = tmp_path / f"out{option}{value}"
        assert from_hf.main([str(tmp_path / "llama"), str(out), option, value]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        assert not out.exists()


def test_import_refuses_a_tokenizer_that_is_not_the_models(tmp_path, capsys, sp_model):
    """--tokenizer naming a file that is no tokenizer (a corpus .jsonl) or a SentencePiece model with more
    pieces than the model's vocabulary used to be recorded as the checkpoint's tokenizer (run config and
    train_state.json), exit 0; the export then refused the checkpoint. Now: exit 2 naming it, nothing written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=16)).save_pretrained(str(tmp_path / "llama"))
    not_a_tokenizer = tmp_path / "corpus.jsonl"
    not_a_tokenizer.write_text('{"text": "hello"}\n')
    from_hf = _tool("convert_from_hf")
    for tokenizer, words in ((not_a_tokenizer, f"tokenizer {not_a_tokenizer} cannot be read"),
                             (sp_model, f"tokenizer {sp_model} has 300 tokens, more than the vocabulary of 100")):
        out = tmp_path / f"out_{tokenizer.__class__.__name__}"
        assert from_hf.main([str(tmp_path / "llama"), str(out), "--tokenizer", str(tokenizer)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        assert not out.exists()


def test_truncated_safetensors_is_named_by_import_and_evaluation(tmp_path, capsys):
    """A model.safetensors cut short (an interrupted download) used to end convert_from_hf.py and
    evaluate_quantization.py in a SafetensorError traceback that names no file, a config.json cut short
    in an OSError traceback; now one line naming the file or model, exit 2, nothing written."""
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_osp.data.indexed import IndexedDatasetWriter

    d = tmp_path / "llama"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=16))
    model.save_pretrained(str(d))
    weights = d / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    assert _tool("convert_from_hf").main([str(d), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{weights} cannot be read as safetensors" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(60) % 100)
    assert _tool("evaluate_quantization").main([str(d), "--data", str(tmp_path / "held"), "--documents", "0:1",
                                                "--settings", "fp", "4-4-4", "--output-dir", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    # named by the model-file check before any model loads (analysis.loading.safetensors_header)
    assert f"{weights}: not a whole safetensors file: its header declares" in err and "Traceback" not in err, err
    assert not (tmp_path / "q").exists()
    model.save_pretrained(str(d))  # whole weights again: the model-file check would name them first
    (d / "config.json").write_text("{")  # and a config.json cut short: an OSError traceback before
    assert _tool("convert_from_hf").main([str(d), str(tmp_path / "out")]) == 2
    assert_line = capsys.readouterr().err
    assert "config.json' is not a valid JSON file" in assert_line and "Traceback" not in assert_line, assert_line
    assert _tool("evaluate_quantization").main([str(d), "--data", str(tmp_path / "held"), "--documents", "0:1",
                                                "--settings", "fp", "4-4-4", "--output-dir", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err  # named by the window check, which reads the config before any weights
    assert f"{d / 'config.json'} is not valid JSON" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()


def test_export_refuses_to_write_nan_or_inf():
    """A checkpoint holding NaN (a diverged run) or weights beyond the export dtype's range (1e6 in
    float16) used to export without a word, as NaN/inf tensors; now ExportError names the tensor and
    the reason."""
    from megatron_osp.convert.llama import ExportError, megatron_to_hf
    from megatron_osp.models.presets import get_preset

    mc = get_preset("test", normalization="rmsnorm", embedding_projection=False)
    logical = _logical_for(mc)
    megatron_to_hf(logical, mc, torch.float16)  # finite and in range: fine
    logical["decoder.layers.1.mlp.linear_fc2.weight"][3, 4] = 1e6
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.down_proj\.weight would be written with NaN or inf: "
                                          r"values exceed the range of float16"):
        megatron_to_hf(logical, mc, torch.float16)
    logical["decoder.layers.1.mlp.linear_fc2.weight"][3, 4] = float("nan")
    with pytest.raises(ExportError, match=r"the checkpoint's decoder\.layers\.1\.mlp\.linear_fc2\.weight already hold"):
        megatron_to_hf(logical, mc, torch.float32)
