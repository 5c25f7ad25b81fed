"""The training loss is over the tokenizer's vocabulary only: the output layer's padding rows (up to a
multiple of make_vocab_size_divisible_by x TP) take no probability and get no gradient, so the loss
does not depend on how much padding a layout has (TP=1 and TP=2 pad a vocabulary of 100 to 128 and
256 rows) and equals the cross entropy of the logits cut to the vocabulary, which is what
evaluation and the HF export compute.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_osp.models import build_gpt_model, get_preset, transformer_config
from megatron_osp.testing.distributed import run_distributed

VOCAB, SEQ, BATCH = 100, 32, 4
FP32_TOL = dict(rtol=2e-5, atol=2e-6)
_ROW_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _cfg(divisible_by=128):
    return get_preset("test", vocab_size=VOCAB, seq_length=SEQ, embedding_projection=True,
                      untie_embeddings_and_output_weights=True, make_vocab_size_divisible_by=divisible_by)


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:], torch.arange(SEQ).expand(BATCH, SEQ)


def _with_rows(weights, rows, seed):
    """``weights`` with the vocabulary-row parameters grown to ``rows`` rows of random padding."""
    g = torch.Generator().manual_seed(seed)
    out = dict(weights)
    for name in _ROW_PARAMS:
        w = weights[name]
        out[name] = torch.cat([w[:VOCAB], 10 * torch.randn(rows - VOCAB, w.shape[1], generator=g)])
    return out


def _loss_and_grads(model, weights=None):
    if weights is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
    inputs, labels, pos = _batch()
    loss = model(inputs, pos, None, labels=labels).float().mean()
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference():
    from megatron_osp import parallel, platform

    parallel.init_distributed(1, 1)
    platform.seed_everything(1234)
    try:
        cfg = _cfg()
        model = build_gpt_model(cfg, transformer_config(cfg))
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        inputs, labels, pos = _batch()
        with torch.no_grad():
            logits = model(inputs, pos, None)
        cut = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB).float(), labels.reshape(-1))
        loss, grads = _loss_and_grads(model)
        # Larger padding with large random rows, same weights otherwise: same loss and gradients.
        wide_cfg = _cfg(divisible_by=512)
        wide = build_gpt_model(wide_cfg, transformer_config(wide_cfg))
        wide_loss, wide_grads = _loss_and_grads(wide, _with_rows(weights, 512, seed=5))
        return weights, float(cut), loss, grads, wide_loss, wide_grads
    finally:
        parallel.shutdown()


def test_loss_is_cross_entropy_over_vocabulary_and_padding_gets_no_gradient():
    weights, cut, loss, grads, wide_loss, wide_grads = _reference()
    assert weights["output_layer.weight"].shape[0] == 128
    assert loss == pytest.approx(cut, rel=1e-5)
    assert wide_loss == pytest.approx(loss, rel=1e-5)
    _check_grads(wide_grads, grads)


def _check_grads(got_grads, ref_grads):
    """Equal gradients on the vocabulary's rows and everywhere else; none on ``got``'s padding rows."""
    for name, ref in ref_grads.items():
        got = got_grads[name]
        if name in _ROW_PARAMS:
            assert torch.count_nonzero(got[VOCAB:]) == 0, name
            got, ref = got[:VOCAB], ref[:VOCAB]
        torch.testing.assert_close(got, ref, **FP32_TOL, msg=lambda m: f"{name}: {m}")


def _tp2_worker(rank, world_size, weights):
    from megatron.core import parallel_state

    from megatron_osp import parallel, platform
    from megatron_osp.models.layout import gather_logical, load_logical_state_dict

    parallel.init_distributed(2, 1)
    platform.seed_everything(1234)
    cfg = _cfg()
    model = build_gpt_model(cfg, transformer_config(cfg, tensor_parallel_size=2))
    assert cfg.padded_vocab_size(2) == 256
    load_logical_state_dict(model, _with_rows(weights, 256, seed=6))
    loss, _ = _loss_and_grads(model)
    grads = gather_logical(model, {n: p.grad for n, p in model.named_parameters()})
    return {"loss": loss, "grads": grads if parallel_state.get_tensor_model_parallel_rank() == 0 else {}}


def test_tp2_pads_more_and_gives_the_single_process_loss():
    weights, _, ref_loss, ref_grads, _, _ = _reference()
    results = run_distributed(_tp2_worker, 2, weights)
    for r in results:
        assert r["loss"] == pytest.approx(ref_loss, rel=1e-5)
    _check_grads(results[0]["grads"], ref_grads)
