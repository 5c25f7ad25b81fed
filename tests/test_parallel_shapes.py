"""Shapes and settings the other multi-rank tests leave out reproduce the single-process run.

A model with grouped-query attention (2 KV groups = TP), an odd per-rank FFN width (25), 3 layers
and a vocabulary whose padding differs by layout (257 tokens, padded to a multiple of 4 x TP: 260
rows in one process, 264 at TP=2) trains 3 steps; per-step losses and final logical weights (the
first 260 vocabulary rows, the rest being padding at TP=2 only) must equal the single-process run's
(megatron_osp/testing/equivalence.py: its settings, losses, gradient norms, weights). Cases:

- qk_layernorm with the owner-sharded optimizer at TP=2 (OSP and AdamW + RMSNorm): each TP rank
  normalises only its own heads, so the Q/K norms' gradients are partial per TP rank and the owner
  must add them (as Megatron's finalize_model_grads does without distributed_optimizer).
- muon_only: Muon's logical matrix of the embedding and of the output layer is the vocabulary's
  257 rows, whatever the padding: one process with make_vocab_size_divisible_by 1 (257 rows) and 64
  (320), TP=2 with 64 (384 rows: TP rank 1 holds 65 vocabulary rows and 127 of padding) and, with
  the owner-sharded optimizer, TP=2 with 512 (1024 rows: TP rank 1 holds padding only) give the
  same vocabulary rows, and padding rows keep their initial values (no update, no weight decay).
- AdamW at TP=2 with 4 layers, micro-batch 1, 2 steps of 4 sequences: with AdamW's default eps
  (1e-8) one embedding element whose gradient is near eps ended 2.6e-5 away (over the tolerance; see
  megatron_osp/testing/equivalence.py for the eps the compared runs use).
- tied embeddings at PP=2 (2 layers; AdamW, muon_only): the last stage's copy of the word embeddings starts
  equal to the embedding (so the first loss is the one-process loss) and stays equal to it.
"""

import numpy as np
import torch

from megatron_osp.testing.distributed import run_distributed
from megatron_osp.testing.equivalence import SETTINGS, assert_same_training, run_record

MODEL = ["model.preset=test", "model.num_layers=3", "model.hidden_size=48", "model.num_query_groups=2",
         "model.ffn_hidden_size=50", "model.vocab_size=257", "model.make_vocab_size_divisible_by=4"]
ZERO = ["optimizer.distributed_optimizer=true"]
VOCAB = 257
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _overrides(corpus, optimizer, tp=1, pp=1, extra=()):
    return [
        *MODEL, f"data.paths=[{corpus}]", "data.eod_id=255", f"optimizer.name={optimizer}",
        "optimizer.muon_lr=0.02", f"parallel.tensor_parallel_size={tp}", f"parallel.pipeline_parallel_size={pp}",
        "train.train_steps=3",
        "train.warmup_steps=1", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.log_interval=1", "train.tensorboard=false", "train.progress_bar=false",
        "train.eval_batches=1", "train.kurtosis_batches=1", "train.save=false", *SETTINGS, *extra,
    ]


def _runs_worker(rank, world_size, cases, run_root):
    from megatron.core import parallel_state

    from megatron_osp.models.layout import gather_logical
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer
    from megatron_osp.training.model_setup import core_chunks

    def logical(trainer):
        weights = {}
        for core in core_chunks(trainer.model_chunks):
            weights.update(gather_logical(core, dict(core.named_parameters())))
        leader = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
        return {k: v.detach().float().clone() for k, v in weights.items()} if leader else {}

    out = []
    for name, overrides in cases:
        trainer = Trainer(load_config(None, overrides + [f"train.run_dir={run_root}/{name}"]), log=lambda *_: None)
        initial = logical(trainer)
        trainer.train()
        weights = logical(trainer)
        out.append({
            **run_record(trainer),
            "weights": weights,
            "initial": {k: v for k, v in initial.items() if k in VOCAB_PARAMS},
        })
    return out


def _merge(per_rank, i):
    merged = {"weights": {}, "initial": {}}
    for r in per_rank:
        merged["weights"].update(r[i]["weights"])
        merged["initial"].update(r[i]["initial"])
        if not np.isnan(r[i]["losses"][0]):
            merged.update(losses=r[i]["losses"], grad_norms=r[i]["grad_norms"])
    return merged


def _close(ref, got, what):
    if "output_layer.weight" not in ref["weights"]:  # tied: at PP > 1 the last stage holds a copy
        copy = got["weights"].pop("output_layer.weight", None)
        if copy is not None:
            torch.testing.assert_close(copy, got["weights"]["embedding.word_embeddings.weight"], msg=what)
    assert_same_training(ref, got, what, vocab_rows=True)  # the vocabulary's padding rows differ by layout


def _compare(corpus, root, cases, world):
    """Each case (name, optimizer, tp, pp, extra, layout_extra) against the single-process run of its
    optimizer and extra (layout_extra: the multi-rank run's own settings)."""
    single = [(f"ref_{n}", _overrides(corpus, o, extra=extra)) for n, o, _, _, extra, _ in cases]
    multi = [(n, _overrides(corpus, o, tp, pp, extra + more)) for n, o, tp, pp, extra, more in cases]
    one = run_distributed(_runs_worker, 1, single, str(root), timeout=600)
    many = run_distributed(_runs_worker, world, multi, str(root), timeout=600)
    for i, (n, *_) in enumerate(cases):
        _close(_merge(one, i), _merge(many, i), n)


# A shape where an embedding element's step-2 gradient lands near AdamW's default eps (1e-8).
NEAR_EPS = ["model.num_layers=4", "train.micro_batch_size=1", "train.global_batch_size=4", "train.train_steps=2"]


def test_qk_layernorm_with_the_distributed_optimizer_and_adamw_near_zero_gradients_at_tp2(toy_corpus, tmp_path):
    qk = ["model.qk_layernorm=true"]
    _compare(toy_corpus, tmp_path, [
        ("qkln_muon", "muon", 2, 1, qk, ZERO),
        ("qkln_adam_rmsnorm", "adam", 2, 1, qk + ["model.normalization=rmsnorm", "model.embedding_projection=false"], ZERO),
        ("adam_4_layers_micro_batch_1", "adam", 2, 1, NEAR_EPS, []),
    ], world=2)


def test_muon_only_vocabulary_matrices_are_the_vocabulary_rows(toy_corpus, tmp_path):
    def run(name, divisible_by, tp=1, extra=()):
        return name, _overrides(toy_corpus, "muon_only", tp, extra=[f"model.make_vocab_size_divisible_by={divisible_by}", *extra])

    one = run_distributed(_runs_worker, 1, [run("rows257", 1), run("rows320", 64)], str(tmp_path), timeout=600)
    tp2 = run_distributed(_runs_worker, 2, [run("tp2_rows384", 64, 2), run("tp2_rows1024_zero", 512, 2, ZERO)],
                          str(tmp_path), timeout=600)
    ref = _merge(one, 0)
    assert ref["weights"]["output_layer.weight"].shape[0] == VOCAB
    for name, got, rows in (("rows320", _merge(one, 1), 320), ("tp2", _merge(tp2, 0), 384),
                            ("tp2_zero", _merge(tp2, 1), 1024)):
        for k in VOCAB_PARAMS:
            assert got["weights"][k].shape[0] == rows
            # Padding rows: exactly as initialised (no Muon update, no weight decay).
            torch.testing.assert_close(got["weights"][k][VOCAB:], got["initial"][k][VOCAB:], rtol=0, atol=0,
                                       msg=lambda m: f"{name} {k} padding: {m}")
        _close(ref, got, name)


def test_tied_embeddings_at_pp2(toy_corpus, tmp_path):
    tied = ["model.untie_embeddings_and_output_weights=false", "model.num_layers=2"]
    _compare(toy_corpus, tmp_path, [
        ("tied_adam", "adam", 1, 2, tied, []),
        ("tied_muon_only", "muon_only", 1, 2, tied, []),
    ], world=2)
