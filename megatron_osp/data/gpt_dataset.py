"""GPT training samples over indexed (.bin/.idx) datasets: splits, weighted blends, cached indices.

Semantics follow Megatron-Core 0.16.1's ``GPTDataset`` / ``BlendedDataset`` /
``BlendedMegatronDatasetBuilder`` (documents split by "969,30,1"-style shares, epochs added until
the requested samples fit, a short final epoch shuffled separately, the same sample boundaries,
blend choices and ``__getitem__`` dict), with three differences, each on purpose:
- indices are built by the C++ builders in ``csrc/`` (parallel, int64 arithmetic; the sample index
  is stored as int32 when it fits, as Megatron-Core does), and the document and shuffle orders come
  from our counter-based shuffle, not numpy's (a seed gives a different order);
- the index cache key includes each data file's size and modification time, so a rewritten corpus
  never reuses stale indices (``index_cache.py``);
- bad input (empty split, unknown split string, oversampled blend) is a ValueError naming it;
- given ``vocab_size``, each data file's token dtype and ids are checked against the vocabulary when
  it opens (``token_range.py``), so an id the embedding cannot take is named with its file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from megatron_osp.data.blending import build_blending_indices, build_exhaustive_blending_indices, normalize_weights
from megatron_osp.data.index_cache import cached_arrays, file_fingerprint
from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.sample_index import build_document_and_sample_index
from megatron_osp.data.shuffles import build_shuffle_index
from megatron_osp.data.token_range import check_token_range

SPLITS = ("train", "valid", "test")
_PAD = -1  # marks padding tokens of a final partial sample (loss-masked, read as token 0)
_BUILDER = "osp-scatter-shuffle-v1"  # part of the cache key: bump when index construction changes


@dataclass
class GPTDataConfig:
    """What the indices and samples depend on."""

    paths: list[str]  # indexed dataset prefixes (without .bin/.idx)
    sequence_length: int
    seed: int
    eod_id: int
    weights: list[float] | None = None  # blend weights, one per path; None = by size
    split: str = "969,30,1"
    cache_dir: str | None = None  # None = build in memory on every rank
    add_extra_token_to_sequence: bool = True
    drop_last_partial_validation_sequence: bool = True
    mid_level_dataset_surplus: float = 0.005
    final_epoch_threshold: float = 0.80  # Megatron: shuffle the last epoch apart below this share
    threads: int | None = None  # index-build threads (speed only; results do not depend on it)
    vocab_size: int | None = None  # every stored id must be below it (None = not checked)
    vocab_name: str = "the vocabulary"  # where vocab_size comes from, for messages

    def __post_init__(self):
        if not self.paths:
            raise ValueError("paths is empty: give at least one indexed dataset prefix")
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ValueError(f"weights has {len(self.weights)} entries but paths has {len(self.paths)}")
        if self.sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {self.sequence_length}")


def parse_split(split: str) -> list[tuple[float, float] | None]:
    """"969,30,1" -> [(0, .969), (.969, .999), (.999, 1.0)]; None for a split with no share."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"split={split!r}: expected up to 3 comma-separated numbers like '969,30,1'") from None
    if not 1 <= len(shares) <= 3 or any(s < 0 or not math.isfinite(s) for s in shares) or sum(shares) <= 0:
        raise ValueError(f"split={split!r}: expected 1 to 3 non-negative shares with a positive sum")
    shares += [0.0] * (3 - len(shares))
    total = float(np.sum(np.array(shares, dtype=np.float64)))
    bounds = [0.0]
    for s in shares:
        bounds.append(bounds[-1] + s / total)
    return [(a, b) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


def split_documents(num_docs: int, fractions: tuple[float, float]) -> range:
    """The documents ``[round(lo·D), round(hi·D))`` that a split's fractions ``(lo, hi)`` select: the one
    rule for training splits and for evaluation (analysis/evaluation.py), so an evaluation given a run's
    validation fractions reads exactly that run's validation documents."""
    lo, hi = fractions
    return range(int(round(lo * num_docs)), int(round(hi * num_docs)))


def _num_epochs(tokens_per_epoch: int, num_samples: int | None, seq: int, extra: int) -> int:
    if num_samples is None:
        return 1
    needed = num_samples * seq + extra
    return max(1, -(-needed // tokens_per_epoch))


class GPTDataset(torch.utils.data.Dataset):
    """Fixed-length samples from one indexed dataset's document range, in a seeded shuffled order."""

    def __init__(self, indexed: IndexedDataset, documents: range, num_samples: int | None, split: str, config: GPTDataConfig):
        self.dataset, self.documents, self.split, self.config = indexed, documents, split, config
        self.num_samples = num_samples
        seq, extra = config.sequence_length, int(config.add_extra_token_to_sequence)
        self.extra = extra
        sizes = indexed.sequence_lengths
        tokens_per_epoch = int(np.asarray(sizes[documents.start : documents.stop]).sum(dtype=np.int64))
        if tokens_per_epoch - extra < seq:
            raise ValueError(
                f"{indexed.prefix}: the {split} split (documents {documents.start}..{documents.stop - 1}) "
                f"holds {tokens_per_epoch} tokens, fewer than one sample of {seq} + {extra}"
            )
        num_epochs = _num_epochs(tokens_per_epoch, num_samples, seq, extra)
        separate_final_epoch, samples_before_final = False, 0
        if num_epochs > 1:
            samples_before_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq
            per_epoch = (tokens_per_epoch - extra) // seq
            from_final = num_samples - samples_before_final
            separate_final_epoch = from_final < int(config.final_epoch_threshold * per_epoch)
        drop_last = config.drop_last_partial_validation_sequence if split == "valid" else True
        self.cache_key = {
            "class": "megatron_osp.GPTDataset",
            "builder": _BUILDER,
            "idx": file_fingerprint(indexed.prefix + ".idx"),
            "bin": file_fingerprint(indexed.prefix + ".bin"),
            "documents": [documents.start, documents.stop],
            "split": split,
            "num_samples": num_samples,
            "sequence_length": seq,
            "seed": config.seed,
            "add_extra_token_to_sequence": bool(extra),
            "drop_last_partial_sequence": drop_last,
            "final_epoch_threshold": config.final_epoch_threshold,
        }

        def build() -> dict[str, np.ndarray]:
            # The same arrays as build_document_index + build_sample_index, in one pass; the sample
            # index is int32 when every position fits (Megatron-Core's own rule, same values).
            doc_index, sample_index = build_document_and_sample_index(
                sizes, documents, num_epochs, config.seed, seq, tokens_per_epoch, separate_final_epoch,
                drop_last, bool(extra), config.threads, sample_index_dtype="auto",
            )
            n = len(sample_index) - 1
            first = samples_before_final if separate_final_epoch else n
            shuffle_index = build_shuffle_index(first, n, config.seed, config.threads)
            return {"document_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

        arrays = cached_arrays(config.cache_dir, f"gpt-{split}", self.cache_key, build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return len(self.sample_index) - 1

    def tokens_of(self, idx: int) -> np.ndarray:
        """The sample's sequence_length + extra token ids (int64), _PAD past the corpus end."""
        i = int(self.shuffle_index[idx])
        p0, o0 = (int(v) for v in self.sample_index[i])
        p1, o1 = (int(v) for v in self.sample_index[i + 1])
        docs, get, extra = self.document_index, self.dataset.get, self.extra
        if p0 == p1:
            parts = [get(int(docs[p0]), o0, o1 - o0 + extra)]
        else:
            parts = [get(int(docs[p0]), o0)]
            parts += [get(int(docs[p])) for p in range(p0 + 1, p1)]
            parts.append(get(int(docs[p1]), 0, o1 + extra))
        want = self.config.sequence_length + extra
        text = np.concatenate(parts).astype(np.int64)
        if len(text) < want:
            text = np.concatenate([text, np.full(want - len(text), _PAD, dtype=np.int64)])
        return text

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.tokens_of(0 if idx is None else idx))
        if self.extra:
            tokens, labels = text[:-1].clone(), text[1:].clone()
        else:
            tokens, labels = text.clone(), torch.roll(text, -1)
            labels[-1] = _PAD
        loss_mask = torch.ones(len(tokens), dtype=torch.float)
        loss_mask[labels == _PAD] = 0.0
        tokens[tokens == _PAD] = 0
        labels[labels == _PAD] = 0
        if idx is None:  # a padding sample: nothing of it counts
            loss_mask.zero_()
        position_ids = torch.arange(len(tokens), dtype=torch.long)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


class BlendedGPTDataset(torch.utils.data.Dataset):
    """Samples of several GPTDatasets interleaved by weight (Megatron-Core's BlendedDataset rule)."""

    def __init__(self, datasets: list[GPTDataset], weights: list, size: int | None, split: str, config: GPTDataConfig):
        self.datasets, self.split = datasets, split
        if size is not None:
            weights = normalize_weights(weights)
        self.weights, self.size = weights, size
        key = {
            "class": "megatron_osp.BlendedGPTDataset",
            "datasets": [d.cache_key for d in datasets],
            "split": split,
            "weights": list(weights),
            "size": size,
        }

        def build() -> dict[str, np.ndarray]:
            if size is None:
                which, within = build_exhaustive_blending_indices([int(w) for w in weights])
            else:
                which, within = build_blending_indices(weights, size)
            counts = np.bincount(which, minlength=len(datasets))
            for d, (n, ds) in enumerate(zip(counts, datasets)):
                if n > len(ds):
                    raise ValueError(
                        f"the {split} blend takes {n} samples from {ds.dataset.prefix} (dataset {d}), "
                        f"which has only {len(ds)}; raise mid_level_dataset_surplus"
                    )
            return {"dataset_index": which, "dataset_sample_index": within}

        arrays = cached_arrays(config.cache_dir, f"blend-{split}", key, build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        d = int(self.dataset_index[idx])
        sample = self.datasets[d][int(self.dataset_sample_index[idx])]
        return {"dataset_id": torch.tensor(d), **sample}


def build_gpt_datasets(
    config: GPTDataConfig, sizes: list[int | None], skip: tuple[str, ...] = ()
) -> list[torch.utils.data.Dataset | None]:
    """Train, valid and test datasets of at least ``sizes[i]`` samples (None: one epoch / exhaustive).

    Call on every rank (index caches hold barriers). A split with no share, or named in ``skip``
    (a split the caller never reads), is None and nothing is built for it.
    """
    if len(sizes) != 3:
        raise ValueError(f"sizes must give 3 entries (train, valid, test), got {sizes!r}")
    if set(skip) - set(SPLITS):
        raise ValueError(f"skip must name splits among {SPLITS}, got {skip!r}")
    matrix = [None if name in skip else m for name, m in zip(SPLITS, parse_split(config.split))]
    for prefix in config.paths:
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise FileNotFoundError(f"{prefix + ext} does not exist")
    indexed = [IndexedDataset(p) for p in config.paths]
    if config.vocab_size is not None:
        for ds in indexed:
            check_token_range(ds, config.vocab_size, config.vocab_name, config.cache_dir)

    def docs(i: int, ds: IndexedDataset) -> range:
        return split_documents(len(ds), matrix[i])

    if len(indexed) == 1 and config.weights is None:
        return [
            None if matrix[i] is None else GPTDataset(indexed[0], docs(i, indexed[0]), sizes[i], SPLITS[i], config)
            for i in range(3)
        ]
    weights = normalize_weights(config.weights) if config.weights is not None else None
    out: list[torch.utils.data.Dataset | None] = []
    for i, split in enumerate(SPLITS):
        if matrix[i] is None:
            out.append(None)
            continue
        if weights is not None:
            if sizes[i] is None:
                raise ValueError(f"blend weights need a sample count for the {split} split")
            target = [math.ceil(sizes[i] * w) for w in weights]
            buffered = [math.ceil(t * (1 + config.mid_level_dataset_surplus)) for t in target]
            parts = [GPTDataset(ds, docs(i, ds), n, split, config) for ds, n in zip(indexed, buffered)]
            out.append(BlendedGPTDataset(parts, weights, sum(target), split, config))
        else:
            parts = [GPTDataset(ds, docs(i, ds), None, split, config) for ds in indexed]
            lengths = [len(p) for p in parts]
            size = None if sizes[i] is None else min(sizes[i], sum(lengths))
            out.append(BlendedGPTDataset(parts, lengths, size, split, config))
    return out
