"""Shards numbered past 99,999 belong to their family.

Preprocessing names shards ``F_00000`` ... ``F_99999`` and then ``F_100000``; the shard pattern took
exactly five digits, so from the 100,001st shard on a dataset was not its family's: the manifest's
checks (a left-over shard, a changed size) and its tokenizer record were skipped for it, a merge of it
had no manifest, and ``--input-dir`` put ``F_100000`` before ``F_10001`` (names compared as text)."""

import os

import numpy as np
import pytest

from megatron_osp.data import shardset
from megatron_osp.data.indexed import IndexedDatasetWriter
from megatron_osp.fileio import atomic_write_json


@pytest.fixture
def family(tmp_path):
    names = ["fam_09999", "fam_10000", "fam_99999", "fam_100000", "fam_100001"]
    for i, name in enumerate(names):
        with IndexedDatasetWriter(tmp_path / name, np.uint16) as w:
            w.add_document(np.arange(1, 4 + i))
    listed = [{"name": n, "bin_bytes": os.path.getsize(tmp_path / f"{n}.bin"),
               "idx_bytes": os.path.getsize(tmp_path / f"{n}.idx")} for n in names[:-1]]
    atomic_write_json(shardset.manifest_path(tmp_path / "fam"),
                      {"format": shardset.FORMAT, "state": "complete", "datasets": listed, "vocab_size": 64})
    return tmp_path


def test_a_six_digit_shard_is_its_familys(family):
    assert shardset.family_of(str(family / "fam_100000")) == str(family / "fam")
    assert shardset.recorded_tokens(str(family / "fam_100000"))["vocab_size"] == 64
    with pytest.raises(ValueError, match="fam_100001: not among the datasets"):  # left over, not listed
        shardset.check_published(str(family / "fam_100001"))
    with open(family / "fam_100000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="fam_100000.bin: .* bytes, but .* published it with"):
        shardset.check_published(str(family / "fam_100000"))


def test_a_directory_lists_shards_in_number_order(family):
    keep, skipped = shardset.datasets_in_directory(family)
    assert [os.path.basename(p) for p in keep] == ["fam_09999", "fam_10000", "fam_99999", "fam_100000"]
    assert [os.path.basename(p) for p in skipped] == ["fam_100001"]
