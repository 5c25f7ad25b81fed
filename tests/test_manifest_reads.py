"""A family's manifest is read once per start, not once per shard.

Training's data checks looked up each training and validation dataset's merge lineage
(data_checks._sources) by reading its family's manifest anew: a family of N shards parsed its N-entry
manifest N times (656 shards: 1,314 parses, 7 of a 2-shard-family run's start-up seconds on this
machine). ``shardset.manifest`` keeps the parsed manifest while the file is unchanged (inode, size,
mtime), as ``_listed`` already did, and sees a republished one."""

import json
import os

from test_valid_paths import _config, _preprocessed

from megatron_osp.data import shardset
from megatron_osp.fileio import atomic_write_json
from megatron_osp.training.data_checks import data_problems


def test_data_checks_read_each_manifest_once(sp_model, tmp_path, monkeypatch):
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(160)]
    family = _preprocessed(tmp_path, "fam", sp_model, texts, max_shard_tokens=300)
    held = _preprocessed(tmp_path, "held", sp_model, texts[:30])
    shards = shardset.expand(family)
    assert len(shards) >= 20, len(shards)
    reads = []
    real = shardset.read_manifest
    monkeypatch.setattr(shardset, "read_manifest", lambda f: reads.append(f) or real(f))
    shardset._CACHE.clear()
    problems = data_problems(_config(["model.preset=test", "model.vocab_size=320", f"data.paths=[{family}]",
                                      f"data.tokenizer_model={sp_model}", "data.split=100",
                                      f"data.valid_paths=[{held}]"]))
    assert problems == []
    assert sorted(set(reads)) == sorted([family, held]) and len(reads) == 2, (len(reads), len(shards))


def test_a_republished_manifest_is_read_again(sp_model, tmp_path):
    family = _preprocessed(tmp_path, "fam", sp_model, [f"document {i}" for i in range(10)])
    first = shardset.manifest(family)
    assert shardset.manifest(family) is first  # kept
    changed = json.loads(json.dumps(first))
    changed["merged_from"] = {"datasets": ["elsewhere"]}
    stat = os.stat(shardset.manifest_path(family))
    atomic_write_json(shardset.manifest_path(family), changed)  # a new file (another inode), as publishing does
    assert os.stat(shardset.manifest_path(family)).st_ino != stat.st_ino
    assert shardset.manifest(family)["merged_from"] == {"datasets": ["elsewhere"]}
