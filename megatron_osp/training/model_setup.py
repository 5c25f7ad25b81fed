"""The run's model as the pretrain loop holds it: one model chunk per virtual pipeline stage.

Without virtual pipeline stages (``parallel.virtual_pipeline_size=1``) a rank holds one chunk: its
pipeline stage. With V > 1 it holds V chunks, chunk ``v`` of pipeline rank ``p`` being global stage
``v * PP + p``, and Megatron-Core's interleaved 1F1B schedule runs them. Everything the schedule is
given is then a list with one entry per chunk: the (DDP-wrapped) modules, one data iterator each (all
reading the same micro-batches in the same order: the schedule draws one micro-batch per chunk
forward), and the DDP ``no_sync`` contexts. The Trainer wraps each chunk in DDP itself
(``Trainer._wrap_chunk``); this module builds them and feeds the schedule.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.transformer.module import Float16Module

from megatron_osp.models.gpt import build_model_chunks, transformer_config
from megatron_osp.models.layout import unwrap
from megatron_osp.training.data import MicroBatchIterator


def run_transformer_config(config, bf16: bool):
    """Megatron's TransformerConfig for this run's model, parallel layout and recompute settings."""
    par, train = config.parallel, config.train
    return transformer_config(
        config.model,
        tensor_parallel_size=par.tensor_parallel_size,
        pipeline_parallel_size=par.pipeline_parallel_size,
        virtual_pipeline_size=par.virtual_pipeline_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        recompute=train.recompute,
        recompute_method=train.recompute_method,
        recompute_num_layers=train.recompute_num_layers,
    )


def build_chunks(config, tconfig, device, bf16: bool) -> list[torch.nn.Module]:
    """This rank's model chunks on ``device``, each in a Float16Module under bf16 (not yet in DDP)."""
    chunks = []
    for chunk in build_model_chunks(config.model, tconfig, seed=config.train.seed):
        chunk = chunk.to(device)
        chunks.append(Float16Module(tconfig, chunk) if bf16 else chunk)
    return chunks


def attach_grad_hooks(tconfig, chunks, finalize=finalize_model_grads) -> None:
    """What the schedule calls around gradients: every chunk's DDP ``no_sync`` while micro-batches
    accumulate, and ``finalize`` (Megatron's ``finalize_model_grads``, or the distributed
    optimizer's delivery to owners) over all chunks at the end of the step."""
    no_sync = [chunk.no_sync for chunk in chunks]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    tconfig.finalize_model_grads_func = finalize


def chunk_iterators(dataset, train, num_chunks: int, consumed_samples: int = 0) -> list[MicroBatchIterator]:
    """One iterator per model chunk over the same samples (each chunk's forward draws its own)."""
    return [
        MicroBatchIterator(dataset, train.global_batch_size, train.micro_batch_size, consumed_samples=consumed_samples)
        for _ in range(num_chunks)
    ]


def schedule_inputs(iterators: list) -> object:
    """The ``data_iterator`` argument of ``get_forward_backward_func()``: the list under interleaving,
    the one iterator otherwise."""
    return iterators if len(iterators) > 1 else iterators[0]


def core_chunks(chunks) -> list[torch.nn.Module]:
    """The GPT models inside the DDP / Float16Module wrappers, in chunk order."""
    return [unwrap(chunk) for chunk in chunks]


def decoder_layers(chunks) -> list[torch.nn.Module]:
    """Every transformer layer on this rank, chunk after chunk (global layer numbers ascend)."""
    return [layer for core in core_chunks(chunks) for layer in core.decoder.layers]
