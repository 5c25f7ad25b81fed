"""A preprocessing output being written: one ``IndexedDatasetWriter`` per key inside the run's stage
directory (shardset.Stage), split into shards of about ``max_shard_tokens``, published as one unit.
Used by preprocessing and by the merge of array tasks (merge.merge_tasks), whose output is byte-identical
to a single run's because its documents go through this same writer."""

from __future__ import annotations

import os

import numpy as np

from megatron_osp.data.content_identity import SAMPLE_FIELD, sample_record, sampled_documents
from megatron_osp.data.indexed import IndexedDatasetWriter
from megatron_osp.data.shardset import Stage, family_files, manifest_path, read_manifest

__all__ = ["ShardedOutput", "check_earlier_output", "output_prefix_for"]


def output_prefix_for(output_prefix: str, key: str, shard: int | None = None) -> str:
    """Megatron's naming: one dataset per JSON key, ``<prefix>_<key>_document``; shards add ``_NNNNN``."""
    name = f"{output_prefix}_{key}_document"
    return name if shard is None else f"{name}_{shard:05d}"


def check_earlier_output(output_prefix: str, keys, inputs, overwrite: bool = False) -> None:
    """Refuse, before any work, to publish over an earlier output of ``output_prefix`` that is not a
    rerun over the same ``inputs``: publishing removes every file of each family (its .bin/.idx, its
    shards, its manifest), so a merge's output or a preprocessing output of other inputs given as the
    prefix was replaced without a word. A rerun is one whose manifest is a preprocessing output (a single
    run or a merge of its array tasks) recording these inputs, in this order, as the same files.
    ``overwrite`` (--overwrite) allows replacing any earlier output."""
    if overwrite:
        return
    want = [os.path.realpath(p) for p in inputs]
    for key in keys:
        family = output_prefix_for(output_prefix, key)
        has_manifest = os.path.exists(manifest_path(family))
        found = sorted(family_files(family) + ([os.path.basename(manifest_path(family))] if has_manifest else []))
        if not found:
            continue
        why = "its files have no manifest saying which inputs made them"
        if has_manifest:
            try:
                m = read_manifest(family)
            except ValueError as e:
                why = str(e)
            else:
                merged = m.get("merged_from")
                recorded = m.get("inputs")
                if isinstance(merged, dict) and "datasets" in merged:
                    why = "it is the output of tools/merge_datasets.py"
                elif not isinstance(recorded, list):
                    why = "its manifest records no inputs"
                elif [os.path.realpath(str(p)) for p in recorded] == want:
                    continue  # a rerun over the same inputs: replaced, as documented
                else:
                    why = f"it was made from other inputs ({', '.join(map(str, recorded[:3]))}" + \
                          (", ..." if len(recorded) > 3 else "") + ")"
        first = os.path.join(os.path.dirname(os.path.abspath(family)), found[0])
        raise ValueError(f"{first}: an earlier output is there ({why}); publishing would replace it: give another "
                         "--output-prefix, or --overwrite to replace it")


class ShardedOutput:
    """One writer per key, all inside the run's stage directory; with ``max_shard_tokens``, a new
    shard starts after a document takes the current one (first key) past the limit. ``publish``
    moves every finished dataset into place at once; ``abort`` drops the stage."""

    def __init__(self, output_prefix: str, keys, dtype, max_shard_tokens: int | None):
        self.keys, self.dtype = tuple(keys), dtype
        self.max_shard_tokens = max_shard_tokens
        self.shard = 0 if max_shard_tokens else None
        self.stage = Stage(output_prefix)  # makes the directory; refuses an unwritable one up front
        self.output_prefix = output_prefix
        self.finished: dict[str, list[dict]] = {k: [] for k in self.keys}
        try:
            self._open()
        except BaseException:
            self.stage.abort()
            raise

    def _open(self) -> None:
        self.writers = {k: IndexedDatasetWriter(self.stage.staged(output_prefix_for(self.output_prefix, k, self.shard)),
                                                self.dtype)
                        for k in self.keys}
        self.shard_tokens = 0
        self.sampled: dict[str, list[int]] = {k: [] for k in self.keys}  # this shard's content sample

    def add_documents(self, lengths: list[np.ndarray], tokens: list[np.ndarray],
                      samples: list[list[tuple[int, int]]] | None = None) -> None:
        """Documents given per key as (lengths, concatenated tokens), split where shards roll over.
        ``samples``: per key, ``content_identity.sampled_documents`` of them where a worker has it already."""
        if samples is None:
            samples = [sampled_documents(n, t) for n, t in zip(lengths, tokens)]
        n, start, offsets = len(lengths[0]), 0, [0] * len(self.keys)
        while start < n:
            stop = n
            if self.max_shard_tokens:  # the document that reaches the limit is the shard's last
                reached = np.cumsum(lengths[0][start:]) + self.shard_tokens >= self.max_shard_tokens
                if reached.any():
                    stop = start + int(np.argmax(reached)) + 1
            for k, key in enumerate(self.keys):
                part = lengths[k][start:stop]
                size = int(part.sum())
                self.writers[key].add_documents(part, tokens[k][offsets[k]:offsets[k] + size])
                self.sampled[key] += [h for i, h in samples[k] if start <= i < stop]
                offsets[k] += size
                if k == 0:
                    self.shard_tokens += size
            if self.max_shard_tokens and self.shard_tokens >= self.max_shard_tokens:
                self._finish_shard()
                self.shard += 1
                self._open()
            start = stop

    def add_known_sample(self, key: str, hashes: list[int]) -> None:
        """Content-sample hashes of documents added with ``samples=[]`` for ``key``, known without
        hashing them (a merge's inputs record theirs). Only for an unsharded output: the hashes carry no
        position, so they cannot be split where shards roll over."""
        if self.max_shard_tokens:
            raise ValueError("a known content sample needs an unsharded output")
        self.sampled[key] += hashes

    def _finish_shard(self) -> None:
        for key, w in self.writers.items():
            w.finalize()
            self.finished[key].append({
                "name": os.path.basename(w.prefix), "documents": w.num_documents,
                "tokens": int(w.tokens_written), "max_token_id": int(w.max_token_id),
                SAMPLE_FIELD: sample_record(self.sampled[key])})

    def finalize(self, info: dict) -> list[str]:
        """Finish the last shard and publish the whole output; returns the published prefixes."""
        if self.shard is None or self.shard_tokens or not self.finished[self.keys[0]]:
            self._finish_shard()
        else:  # the last document filled the previous shard exactly: no empty trailing shard
            for w in self.writers.values():
                w.abort()
        families = {output_prefix_for(self.output_prefix, k): self.finished[k] for k in self.keys}
        self.stage.publish(families, info)
        return [os.path.join(os.path.dirname(self.output_prefix), d["name"])
                for k in self.keys for d in self.finished[k]]

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self.stage.abort()
