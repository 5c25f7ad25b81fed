"""TP=2, PP=2 and DP=2 on CPU/gloo give the single-process loss and gradients for the same weights.

The reference runs in this process at TP=PP=DP=1; the parallel runs are spawned gloo worlds that
load the same logical weights (split per rank by megatron_osp.models.layout) and send back the
loss and their gradients gathered into logical tensors.
"""

import pytest
import torch

from megatron_osp.models import build_gpt_model, get_preset, transformer_config
from megatron_osp.testing.distributed import run_distributed

SEQ, MICRO_BATCH, NUM_MICRO = 32, 2, 2
FP32_TOL = dict(rtol=2e-5, atol=2e-6)


def _model_cfg(normalization):
    return get_preset("test", normalization=normalization, embedding_projection=True, seq_length=SEQ)


def _tokens():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (NUM_MICRO * MICRO_BATCH, SEQ + 1), generator=g)


def _forward_backward(model, tokens, num_micro):
    """Megatron's schedule (1F1B when PP > 1): mean token loss over all micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = iter(tokens.chunk(num_micro))

    def step(data_iterator, module):
        batch = next(data_iterator)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        pos = torch.arange(inputs.shape[1]).expand_as(inputs)
        out = module(inputs, pos, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

        return out, loss_func

    results = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=micro,
        model=[model],
        num_microbatches=num_micro,
        seq_length=SEQ,
        micro_batch_size=tokens.shape[0] // num_micro,
        forward_only=False,
    )
    return float(sum(r["loss"] for r in results) / num_micro) if results else None


def _reference(normalization):
    from megatron_osp import parallel, platform

    parallel.init_distributed(1, 1)
    platform.seed_everything(1234)
    try:
        cfg = _model_cfg(normalization)
        model = build_gpt_model(cfg, transformer_config(cfg))
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = _forward_backward(model, _tokens(), NUM_MICRO)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return weights, loss, grads
    finally:
        parallel.shutdown()


def _model_parallel_worker(rank, world_size, tp, pp, normalization, weights):
    from megatron.core import parallel_state

    from megatron_osp import parallel, platform
    from megatron_osp.models.layout import gather_logical, load_logical_state_dict

    parallel.init_distributed(tp, pp)
    platform.seed_everything(1234)
    cfg = _model_cfg(normalization)
    model = build_gpt_model(cfg, transformer_config(cfg, tensor_parallel_size=tp, pipeline_parallel_size=pp))
    load_logical_state_dict(model, weights)
    loss = _forward_backward(model, _tokens(), NUM_MICRO)
    grads = gather_logical(model, {n: p.grad for n, p in model.named_parameters()})
    is_tp_leader = parallel_state.get_tensor_model_parallel_rank() == 0
    return {"loss": loss, "grads": grads if is_tp_leader else {}}


def _check(ref_loss, ref_grads, results):
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
    grads = {}
    for r in results:
        grads.update(r["grads"])
    assert sorted(grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, **FP32_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_osp_model_tp_pp_match_single_process(tp, pp):
    weights, ref_loss, ref_grads = _reference("ssnorm")
    results = run_distributed(_model_parallel_worker, tp * pp, tp, pp, "ssnorm", weights)
    _check(ref_loss, ref_grads, results)


def test_rmsnorm_baseline_tp2_matches_single_process():
    weights, ref_loss, ref_grads = _reference("rmsnorm")
    results = run_distributed(_model_parallel_worker, 2, 2, 1, "rmsnorm", weights)
    _check(ref_loss, ref_grads, results)
