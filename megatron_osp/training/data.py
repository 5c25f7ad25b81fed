"""Training data: our GPTDataset (megatron_osp.data.gpt_dataset) over indexed files, and the DP sampler.

The datasets follow Megatron-Core's GPTDataset/BlendedDataset semantics; their indices come from
the C++ builders and are cached under a key that includes each data file's size and mtime.

Samples are taken in a fixed global order: step s uses samples [s*G, (s+1)*G) of the shuffled
train split (G = global batch), and data-parallel rank r reads its contiguous share of each
micro-batch. The order depends only on the seed and the number of consumed samples, so a resumed
run (or one with another DP size and the same global batch) reads the same tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_osp.data.gpt_dataset import GPTDataConfig, build_gpt_datasets
from megatron_osp.training.data_checks import (
    check_data_settings,
    dataset_prefixes,
    reference_vocabulary,
    tokenizer_vocabulary,
)
from megatron_osp.training.validation import ConfigError


def _eod_id(data) -> int:
    if data.tokenizer_model:
        _, eos = tokenizer_vocabulary(data.tokenizer_model)
        if eos < 0:
            raise ConfigError(f"data.tokenizer_model {data.tokenizer_model} has no end-of-sequence id")
        return eos
    if data.eod_id is None:
        raise ConfigError("set data.tokenizer_model (or data.eod_id) so documents can be separated")
    return data.eod_id


def build_datasets(config, num_train_samples: int, num_eval_samples: int):
    """Train and validation datasets for the run (call on every rank: local rank 0 builds the cached
    indices, the others wait and load them). Validation is ``data.split``'s share of ``data.paths``, or
    with ``data.valid_paths`` every document of those datasets (training then reads all of data.paths).
    Each data file's token dtype and ids are checked against the vocabulary as it opens (the
    tokenizer's when given, else model.vocab_size)."""
    data, train = config.data, config.train
    check_data_settings(config)
    vocab_size, vocab_name = reference_vocabulary(config)
    cache = data.cache_dir or str(Path(train.run_dir) / "index_cache")
    ds_config = GPTDataConfig(
        paths=dataset_prefixes(data.paths, data.weights),  # a sharded output's prefix -> its shards
        weights=data.weights,
        split=data.split,
        sequence_length=config.model.seq_length,
        seed=train.seed,
        eod_id=_eod_id(data),
        cache_dir=cache,
        vocab_size=vocab_size,
        vocab_name=vocab_name,
    )
    # Training never reads the test split: skip it (no index build, no error if it is tiny).
    own_valid = data.valid_paths is not None
    train_ds, valid_ds, _ = build_gpt_datasets(
        ds_config, [num_train_samples, None if own_valid else num_eval_samples, None],
        skip=("valid", "test") if own_valid else ("test",),
    )
    if own_valid:
        # data.valid_paths: every document of those datasets is the validation split ("0,1,0"), its
        # indices cached beside the training ones (keyed by their own files) under the name "valid".
        valid_config = dataclasses.replace(
            ds_config, paths=dataset_prefixes(data.valid_paths, data.valid_weights), weights=data.valid_weights,
            split="0,1,0")
        _, valid_ds, _ = build_gpt_datasets(valid_config, [None, num_eval_samples, None], skip=("train", "test"))
    if valid_ds is None:
        raise ConfigError(f"data.split={data.split!r} leaves no validation documents")
    return train_ds, valid_ds


class MicroBatchIterator:
    """Yields this DP rank's micro-batches, in the global order described in the module docstring."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.global_batch = global_batch
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        if global_batch % (micro_batch * self.dp_size):
            raise ValueError(
                f"train.global_batch_size={global_batch} is not divisible by "
                f"micro_batch_size={micro_batch} x data-parallel size {self.dp_size}"
            )
        self.consumed = consumed_samples

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed + self.dp_rank * self.micro_batch
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.micro_batch)]
        self.consumed += self.micro_batch * self.dp_size
        return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
