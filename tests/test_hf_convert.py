"""Conversion to and from Hugging Face Llama.

- A tiny OSP model (SSNorm gains != 1, non-orthogonal EmbProj maps, GQA, padded vocab) saved at TP=2
  is exported by tools/convert_to_hf.py (sharded safetensors, SentencePiece tokenizer) and loaded with
  stock ``transformers.AutoModelForCausalLM``: its logits match the TP=2 Megatron model's on the same
  tokens (float32, max abs diff <= 1e-4) and greedy generation gives the same tokens (Megatron side: a
  greedy loop over full forward passes).
- The same weights saved at PP=2 export to the same bits.
- HF -> Megatron -> HF returns bitwise equal tensors and the same config (untied GQA, tied, and
  with identity EmbProj); the imported Megatron models give the HF logits, and a run configured by
  the imported checkpoint's run_config.yaml starts from its weights and trains.
- Errors name the problem: not a checkpoint, a missing shard, an option Llama cannot represent.
"""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_osp.testing.distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]
VOCAB = 250
PROMPT_LEN, NEW_TOKENS = 8, 6
TEXT = "the quick brown fox jumps over the lazy dog\nnew  lines and  spaces, 12345 zebra!"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _osp_model_config():
    from megatron_osp.models.presets import get_preset

    # make_vocab_size_divisible_by=96: TP=2 pads 250 to 384, TP=1 would pad to 288.
    return get_preset("test", num_query_groups=2, vocab_size=VOCAB, make_vocab_size_divisible_by=96,
                      normalization="ssnorm", embedding_projection=True, rotary_base=50000)


def _randomise(model):
    """Weights far from init: SSNorm gains in [0.5, 2], EmbProj maps neither identity nor orthogonal.
    Replicated tensors draw the same values on every TP rank; split ones differ per rank."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            split = getattr(p, "tensor_model_parallel", False)
            g = torch.Generator().manual_seed(1000 + i + (100 * tp_rank if split else 0))
            noise = torch.randn(p.shape, generator=g)
            if p.numel() == 1:
                p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=g))
            elif "projection" in name:
                p.add_(0.3 * noise / p.shape[1] ** 0.5)
            elif "word_embeddings" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / 64**0.5)


def _save_tp2_worker(rank, world, root, tokenizer):
    """TP=2: build, randomise, save; the reference logits and greedy generation of this model."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_osp import parallel, platform
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import DataSettings, ParallelSettings, RunConfig

    parallel.init_distributed(2, 1)
    platform.seed_everything(0)
    mc = _osp_model_config()
    model = build_gpt_model(mc, transformer_config(mc, tensor_parallel_size=2), seed=5)
    _randomise(model)
    run = RunConfig(model=mc, parallel=ParallelSettings(tensor_parallel_size=2),
                    data=DataSettings(tokenizer_model=tokenizer))
    save_checkpoint(f"{root}/ckpt", 3, [model], run, save_rng=False)
    model.eval()

    def logits(tokens):
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            return gather_from_tensor_model_parallel_region(model(tokens, pos, None))[..., :VOCAB]

    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    full = logits(tokens)
    seq = tokens[:1, :PROMPT_LEN]
    for _ in range(NEW_TOKENS):
        nxt = logits(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        if nxt.item() == 2:  # </s> of the SentencePiece model: generation stops there
            break
    out = {"tokens": tokens, "logits": full, "generated": seq, "padded_vocab": model.vocab_size}

    # The same weights saved again at PP=2 (loaded from the TP=2 checkpoint): the export must not
    # depend on the layout that saved it. (Padding multiple 192 keeps the 384 rows at TP=1.)
    from megatron_osp.training.checkpoint import load_model_weights

    parallel.init_distributed(1, 2)
    platform.seed_everything(0)
    mc_pp = dataclasses.replace(mc, make_vocab_size_divisible_by=192)
    model_pp = build_gpt_model(mc_pp, transformer_config(mc_pp, pipeline_parallel_size=2), seed=9)
    load_model_weights(f"{root}/ckpt", [model_pp])
    run_pp = RunConfig(model=mc_pp, parallel=ParallelSettings(pipeline_parallel_size=2), data=run.data)
    save_checkpoint(f"{root}/ckpt_pp2", 3, [model_pp], run_pp, save_rng=False)
    return out


def _convert_worker(rank, world, root):
    """One process: export the TP=2 checkpoint; HF -> Megatron -> HF for the random Llamas."""
    to_hf, from_hf = _tool("convert_to_hf"), _tool("convert_from_hf")
    rcs = {"export": to_hf.main([f"{root}/ckpt", f"{root}/hf", "--max-shard-size", "60KB"]),
           "export_pp2": to_hf.main([f"{root}/ckpt_pp2", f"{root}/hf_pp2"])}
    for name, extra in (("untied", []), ("tied", []), ("untied_embproj", ["--embedding-projection"])):
        src = name.removesuffix("_embproj")
        rcs[f"{name}_in"] = from_hf.main([f"{root}/llama_{src}", f"{root}/meg_{name}", *extra])
        rcs[f"{name}_out"] = to_hf.main([f"{root}/meg_{name}", f"{root}/back_{name}"])
    # The imported Megatron models themselves (not just their round trip) compute the HF function.
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import load_model_weights, read_run_config

    tokens = _llama_tokens()
    for name in ("tied", "untied_embproj"):
        mc = read_run_config(f"{root}/meg_{name}").model
        model = build_gpt_model(mc, transformer_config(mc), seed=11)
        load_model_weights(f"{root}/meg_{name}", [model])
        with torch.no_grad():
            rcs[f"{name}_logits"] = model.eval()(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[
                ..., : mc.vocab_size]
    rcs["continued"] = _continue_pretraining(f"{root}/meg_tied", root)
    return rcs


def _continue_pretraining(ckpt, root):
    """A run configured by the imported checkpoint's own run_config.yaml starts from its weights
    (step 0, fresh optimizer) and trains."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer, unwrap

    prefix = f"{root}/corpus"
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(10, 60))
        builder.add_document(np.append(rng.integers(0, 99, n), 99).astype(np.uint16), [n + 1])
    builder.finalize(prefix + ".idx")
    overrides = [f"data.paths=[{prefix}]", "data.eod_id=99", "data.split=90,10,0", f"train.load={ckpt}",
                 "train.train_steps=1", "train.warmup_steps=0", "train.global_batch_size=2",
                 "train.micro_batch_size=2", "train.eval_batches=1", "train.save=false",
                 "train.tensorboard=false", "train.progress_bar=false", f"train.run_dir={root}/cpt"]
    trainer = Trainer(load_config(f"{ckpt}/iter_0000000/run_config.yaml", overrides), log=lambda *_: None)
    model = unwrap(trainer.model)
    imported = model.decoder.layers[0].mlp.linear_fc2.weight.detach().clone()
    start_step = trainer.step
    trainer.train()
    changed = not torch.equal(model.decoder.layers[0].mlp.linear_fc2.weight.detach(), imported)
    return start_step, imported, changed, [h["loss"] for h in trainer.history]


def _llama_tokens():
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))


def _random_llama(path, tie: bool, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      tie_word_embeddings=tie)
    torch.manual_seed(7 + tie)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))  # norms too: per-channel gains must survive
    model.save_pretrained(str(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("hfconv")
    words = ("alpha beta gamma delta fox dog quick brown lazy jumps over the zebra lines spaces new "
             "model token export weights norm gain projection").split()
    g = torch.Generator().manual_seed(0)
    text = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist()) + f" {n}"
            for n in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(root / "sp"),
                                   vocab_size=VOCAB, model_type="bpe", minloglevel=2)
    ref = run_distributed(_save_tp2_worker, 2, str(root), str(root / "sp.model"))[0]
    _random_llama(root / "llama_untied", tie=False, vocab=VOCAB)
    _random_llama(root / "llama_tied", tie=True, vocab=100)
    rcs = run_distributed(_convert_worker, 1, str(root))[0]
    return root, ref, rcs


def test_export_of_tp2_osp_checkpoint_matches_megatron(converted):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, ref, rcs = converted
    assert rcs["export"] == 0
    out = root / "hf"
    assert ref["padded_vocab"] == 384  # the checkpoint really had padding to remove
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not list(root.glob(".hf.tmp-*"))  # the temporary directory was renamed away
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    assert config["vocab_size"] == VOCAB and config["num_key_value_heads"] == 2
    assert config["rope_parameters"]["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 50000.0 and config["torch_dtype"] == "float32"  # older readers
    assert (out / "generation_config.json").is_file()
    # SSNorm gains became constant vectors; EmbProj is gone (folded).
    norm = load_file(str(out / index["weight_map"]["model.norm.weight"]))["model.norm.weight"]
    assert norm.shape == (64,) and torch.all(norm == norm[0]) and abs(norm[0].item() - 1) > 1e-3
    assert not any("projection" in k for k in index["weight_map"])

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff <= 1e-4, f"max |HF - Megatron| logits = {diff}"
    assert ref["logits"].abs().max() > 1.0  # not trivially small logits

    prompt = ref["generated"][:, :PROMPT_LEN]
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=NEW_TOKENS, do_sample=False)
    assert generated.tolist() == ref["generated"].tolist()

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(root / "sp.model"))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.encode(TEXT, add_special_tokens=False) == sp.encode(TEXT)
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
    assert config["eos_token_id"] == sp.eos_id() and (out / "tokenizer.model").is_file()


def _analysis_logits_worker(rank, world, ckpt, tokens):
    from megatron_osp.analysis.loading import load_for_analysis

    loaded = load_for_analysis(ckpt)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return loaded.model(tokens, pos, None)[..., :VOCAB]


def test_analysis_loads_the_tp2_checkpoint_padded_as_saved(converted):
    """The evaluation tool rebuilds a TP=2 checkpoint at TP=1 with the saving run's vocab padding."""
    root, ref, _ = converted
    logits = run_distributed(_analysis_logits_worker, 1, str(root / "ckpt"), ref["tokens"])[0]
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)


def test_export_does_not_depend_on_the_saving_layout(converted):
    """The same weights saved at TP=2 and at PP=2 export to the same bits."""
    from safetensors.torch import load_file

    root, _, rcs = converted
    assert rcs["export_pp2"] == 0
    index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())
    tp2 = {}
    for shard in set(index["weight_map"].values()):
        tp2.update(load_file(str(root / "hf" / shard)))
    pp2 = load_file(str(root / "hf_pp2" / "model.safetensors"))
    assert sorted(pp2) == sorted(tp2)
    for key in tp2:
        assert torch.equal(pp2[key], tp2[key]), key


@pytest.mark.parametrize("name", ["untied", "tied", "untied_embproj"])
def test_hf_to_megatron_to_hf_is_bitwise(converted, name):
    from safetensors.torch import load_file

    root, _, rcs = converted
    assert rcs[f"{name}_in"] == 0 and rcs[f"{name}_out"] == 0
    src = root / f"llama_{name.removesuffix('_embproj')}"
    back = root / f"back_{name}"
    original, result = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    if name == "untied_embproj":  # folding identity maps is exact
        assert set(result) == set(original)
    else:
        assert sorted(result) == sorted(original)
    for key, tensor in original.items():
        assert result[key].dtype == tensor.dtype and torch.equal(result[key], tensor), key
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                  "max_position_embeddings", "head_dim"):
        assert a.get(field) == b.get(field), field
    if name != "untied":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        with torch.no_grad():
            expected = model(_llama_tokens()).logits
        scale = expected.abs().max().item()
        torch.testing.assert_close(rcs[f"{name}_logits"], expected, rtol=1e-4, atol=1e-5 * scale)
    if name == "tied":
        start_step, imported, changed, losses = rcs["continued"]
        hf_weight = load_file(str(src / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
        assert start_step == 0 and torch.equal(imported, hf_weight) and changed
        assert len(losses) == 1 and np.isfinite(losses[0])
    run = yaml.safe_load((root / f"meg_{name}" / "iter_0000000" / "run_config.yaml").read_text())
    assert run["model"]["normalization"] == "rmsnorm"
    assert run["model"]["embedding_projection"] is (name == "untied_embproj")


# ------------------------------------------------------------------ errors
def test_not_a_checkpoint_missing_shard_and_unrepresentable_config(converted, tmp_path, capsys):
    root = converted[0]
    to_hf = _tool("convert_to_hf")
    (tmp_path / "empty").mkdir()
    assert to_hf.main([str(tmp_path / "empty"), str(tmp_path / "o1")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(root / "ckpt", broken)
    shard = sorted((broken / "iter_0000003").glob("*.distcp"))[0]
    shard.unlink()
    assert to_hf.main([str(broken), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "missing shard" in err and shard.name in err

    qk = tmp_path / "qk"
    shutil.copytree(root / "ckpt", qk)
    cfg_file = qk / "iter_0000003" / "run_config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["model"]["qk_layernorm"] = True
    cfg_file.write_text(yaml.safe_dump(cfg))
    from megatron_osp.training.checkpoint_integrity import write_manifest

    write_manifest(cfg_file.parent)  # a deliberate edit: vouch for it, or the checksum refuses it first
    assert to_hf.main([str(qk), str(tmp_path / "o3")]) == 2
    assert "model.qk_layernorm" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()

    # An existing non-empty output is not overwritten without --overwrite.
    assert to_hf.main([str(root / "ckpt"), str(root / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_convert_from_hf_errors_are_named(converted, tmp_path, capsys):
    root = converted[0]
    from_hf = _tool("convert_from_hf")
    (tmp_path / "no_config").mkdir()
    assert from_hf.main([str(tmp_path / "no_config"), str(tmp_path / "o1")]) == 2
    assert "no config.json" in capsys.readouterr().err

    sharded = tmp_path / "sharded"
    shutil.copytree(root / "llama_untied", sharded)
    (sharded / "model.safetensors").unlink()
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    assert from_hf.main([str(sharded), str(tmp_path / "o2")]) == 2
    assert "model-00001-of-00002.safetensors, which is missing" in capsys.readouterr().err

    biased = tmp_path / "biased"
    shutil.copytree(root / "llama_untied", biased)
    cfg = json.loads((biased / "config.json").read_text())
    cfg["attention_bias"] = True
    (biased / "config.json").write_text(json.dumps(cfg))
    assert from_hf.main([str(biased), str(tmp_path / "o3")]) == 2
    assert "attention_bias" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()

    assert from_hf.main([str(root / "llama_untied"), str(root / "meg_untied")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_options_llama_cannot_represent_are_named():
    from megatron_osp.convert.llama import ExportError, check_exportable, megatron_to_hf, model_config_from_llama
    from megatron_osp.models.gpt import transformer_config
    from megatron_osp.models.presets import get_preset

    mc = get_preset("test")
    for overrides, option in (
        ({"add_bias_linear": True}, "add_bias_linear"),
        ({"gated_linear_unit": False}, "gated_linear_unit"),
        ({"normalization": "LayerNorm"}, "normalization='LayerNorm'"),
    ):
        with pytest.raises(ExportError, match=option):
            check_exportable(mc, transformer_config(mc, use_cpu_initialization=True, **overrides))
    with pytest.raises(ExportError, match="position_embedding_type='learned_absolute'"):
        check_exportable(mc, position_embedding_type="learned_absolute")
    # A tensor with no Llama counterpart (e.g. a bias) is named, never dropped.
    mc = get_preset("test", normalization="rmsnorm", embedding_projection=False)
    logical = _logical_for(mc)
    logical["decoder.layers.0.mlp.linear_fc1.bias"] = torch.zeros(2 * mc.ffn_hidden_size)
    with pytest.raises(ExportError, match=r"linear_fc1\.bias"):
        megatron_to_hf(logical, mc)

    from transformers import LlamaConfig

    for kwargs, field in (({"attention_bias": True}, "attention_bias"), ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
                           "rope_type")):
        with pytest.raises(ValueError, match=field):
            model_config_from_llama(LlamaConfig(hidden_size=64, num_attention_heads=4, **kwargs))


def _logical_for(mc):
    h, f, v = mc.hidden_size, mc.ffn_hidden_size, mc.padded_vocab_size()
    out = {"embedding.word_embeddings.weight": torch.randn(v, h), "output_layer.weight": torch.randn(v, h),
           "decoder.final_layernorm.weight": torch.rand(h)}
    for i in range(mc.num_layers):
        m = f"decoder.layers.{i}."
        out.update({m + "input_layernorm.weight": torch.rand(h), m + "pre_mlp_layernorm.weight": torch.rand(h),
                    m + "self_attention.linear_qkv.weight": torch.randn(3 * h, h),
                    m + "self_attention.linear_proj.weight": torch.randn(h, h),
                    m + "mlp.linear_fc1.weight": torch.randn(2 * f, h), m + "mlp.linear_fc2.weight": torch.randn(h, f)})
    return out


def test_qkv_split_is_per_query_group():
    """Megatron's fused rows are [q_g0 heads, k_g0, v_g0, q_g1 heads, ...]; label rows and check."""
    from megatron_osp.convert.llama import merge_qkv, split_qkv
    from megatron_osp.models.presets import get_preset

    mc = get_preset("test", num_attention_heads=4, num_query_groups=2)  # 2 q heads per group, d=16
    d = 16
    labels = []
    for group in range(2):
        labels += [("q", 2 * group + j) for j in range(2)] + [("k", group), ("v", group)]
    rows = torch.cat([torch.full((d, 64), float(100 * "qkv".index(kind) + head)) for kind, head in labels])
    q, k, v = split_qkv(rows, mc)
    assert q[::d, 0].tolist() == [0, 1, 2, 3] and k[::d, 0].tolist() == [100, 101] and v[::d, 0].tolist() == [200, 201]
    assert torch.equal(merge_qkv(q, k, v, mc), rows)
