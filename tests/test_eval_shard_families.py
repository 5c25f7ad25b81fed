"""The evaluation tools read a sharded preprocessing output by its prefix, as training does: ``--data P``
(``P.shards.json`` listing P_00000, ...) is its shards in order, each split by the run's data.split on
its own (data/document_view.py). It used to stop with "this output is sharded ... give those", and the
held-out range was one range of one dataset's documents."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter
from test_valid_paths import _preprocessed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

SEQ = 8


@pytest.fixture(scope="module")
def family(sp_model, tmp_path_factory):
    """A 3-shard output of uneven shards (documents of 1 to 9 sentences, longer later), and a plain dataset."""
    d = tmp_path_factory.mktemp("evalshards")
    texts = [" ".join(f"doc {i} the quick brown fox {j}" for j in range(1 + i // 4)) for i in range(36)]
    prefix = _preprocessed(d, "fam", sp_model, texts, max_shard_tokens=1500)
    shards = [str(d / e["name"]) for e in json.loads(Path(prefix + ".shards.json").read_text())["datasets"]]
    counts = [len(IndexedDataset(s)) for s in shards]
    assert len(shards) == 3 and len(set(counts)) == 3, counts
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(d / "plain") as w:
        for _ in range(23):
            w.add_document(rng.integers(0, 300, int(rng.integers(5, 40))))
    return {"prefix": prefix, "shards": shards, "plain": str(d / "plain"), "dir": d}


def _docs(prefix, lo, hi):
    """Reference: the documents [round(lo·D), round(hi·D)) of one dataset, read directly."""
    ds = IndexedDataset(prefix)
    n = len(ds)
    return [np.asarray(ds[i], dtype=np.int64) for i in range(int(round(lo * n)), int(round(hi * n)))]


def _windows(docs, num=None, selection="spread", seq=SEQ):
    """Reference: the documents concatenated, cut into windows of seq + 1; of W windows, num evenly spread
    (window floor((i + 1/2)·W/num), exact in fractions) or the first num."""
    from fractions import Fraction

    tokens = np.concatenate(docs)
    w = len(tokens) // (seq + 1)
    every = tokens[: w * (seq + 1)].reshape(w, seq + 1)
    n = w if num is None else min(num, w)
    picks = range(n) if selection == "first" else [int((i + Fraction(1, 2)) * w / n) for i in range(n)]
    return torch.from_numpy(every[list(picks)])


def test_a_familys_windows_are_each_shards_split_share(family, tmp_path):
    from evaluate_quantization import held_out_ranges

    from megatron_osp.analysis.evaluation import check_window_count, load_token_windows
    from megatron_osp.data.gpt_dataset import GPTDataConfig, build_gpt_datasets
    from megatron_osp.training.data_checks import dataset_prefixes

    prefix, shards = family["prefix"], family["shards"]
    train, valid = held_out_ranges(prefix, None, "70,30,0", None, "m")
    assert (train, valid) == ((0.0, 0.7), (0.7, 1.0))
    held = [d for s in shards for d in _docs(s, 0.7, 1.0)]
    # what training holds out of the family: these documents of each shard
    config = GPTDataConfig(paths=dataset_prefixes([prefix]), split="70,30,0", sequence_length=SEQ, seed=1, eod_id=0,
                           cache_dir=str(tmp_path / "cache"))
    _, blend, _ = build_gpt_datasets(config, [None, None, None], skip=("train", "test"))
    ranges = [(len(IndexedDataset(s)), part.documents) for s, part in zip(shards, blend.datasets)]
    assert [r for _, r in ranges] == [range(int(round(0.7 * n)), n) for n, _ in ranges]
    calib = [d for s in shards for d in _docs(s, 0.0, 0.7)]
    # per shard, not the split of the concatenation (which would hold out the last shard's documents only)
    everything = [d for s in shards for d in _docs(s, 0.0, 1.0)]
    assert not np.array_equal(np.concatenate(held), np.concatenate(everything[int(round(0.7 * len(everything))):]))
    torch.testing.assert_close(load_token_windows(prefix, SEQ, None, valid), _windows(held), rtol=0, atol=0)
    torch.testing.assert_close(load_token_windows(prefix, SEQ, 3, valid), _windows(held, 3), rtol=0, atol=0)
    torch.testing.assert_close(load_token_windows(prefix, SEQ, None, train), _windows(calib), rtol=0, atol=0)
    # the window count reads the shards' indices
    have = len(np.concatenate(held)) // (SEQ + 1)
    check_window_count(prefix, SEQ, have, valid, "--num-windows")
    with pytest.raises(ValueError, match=rf"--num-windows {have + 1}: documents 0.7:1.0 of each of the 3 shards of "
                                         rf"{prefix} \(\d+\.\.\d+ of fam_text_document_00000, .*\) hold only {have} "):
        check_window_count(prefix, SEQ, have + 1, valid, "--num-windows")
    with pytest.raises(ValueError, match=rf"documents 0.99:1.0 of each of the 3 shards of {prefix} .* fewer than one"):
        load_token_windows(prefix, 400, None, (0.99, 1.0))


def test_a_plain_prefix_reads_as_before(family):
    from megatron_osp.analysis.evaluation import check_window_count, load_token_windows
    from megatron_osp.data.document_view import DocumentView

    plain, shard = family["plain"], family["shards"][1]
    assert DocumentView(plain).shards == [plain] and not DocumentView(plain).sharded
    for prefix in (plain, shard):  # a dataset, and one shard given alone: its own documents only
        torch.testing.assert_close(load_token_windows(prefix, SEQ, None, (0.7, 1.0)),
                                   _windows(_docs(prefix, 0.7, 1.0)), rtol=0, atol=0)
    n = len(IndexedDataset(plain))
    lo, hi = int(round(0.5 * n)), int(round(1.0 * n))
    have = len(np.concatenate(_docs(plain, 0.5, 1.0))) // (SEQ + 1)
    with pytest.raises(ValueError, match=rf"--w {have + 1}: documents {lo}..{hi - 1} of {plain} hold only {have} "):
        check_window_count(plain, SEQ, have + 1, (0.5, 1.0), "--w")


def test_a_family_among_the_valid_paths_is_held_out_whole(family):
    from evaluate_quantization import held_out_ranges

    prefix, shards, plain = family["prefix"], family["shards"], family["plain"]
    assert held_out_ranges(prefix, None, "100", [plain, prefix], "m") == (None, (0.0, 1.0))
    assert held_out_ranges(prefix, None, "100", shards, "m") == (None, (0.0, 1.0))  # its shards, listed
    assert held_out_ranges(shards[2], None, "100", [prefix], "m") == (None, (0.0, 1.0))
    with pytest.raises(ValueError, match=rf"m: its run validated on .* --documents LO:HI for {prefix} \(only 1 of "
                                         r"its 3 shards are among them\)"):
        held_out_ranges(prefix, None, "100", [shards[0]], "m")
    with pytest.raises(ValueError, match=rf"trained on every document .* for {prefix}$"):
        held_out_ranges(prefix, None, "100", [plain], "m")


def family_run(family, tmp_path) -> str:
    """A saved Megatron checkpoint of a tiny model whose run trained on the family with data.split 70,30,0."""
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    cfg = get_preset("test", vocab_size=320, seq_length=SEQ)
    config = RunConfig(model=cfg)
    config.data.paths, config.data.split = [family["prefix"]], "70,30,0"
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, [build_gpt_model(cfg, transformer_config(cfg), seed=1).eval()],
                    config, save_rng=False)
    return str(tmp_path / "run")


def test_the_tool_evaluates_a_family_by_its_run_split(family, megatron_single_rank, tmp_path, capsys):
    """End to end: a Megatron checkpoint whose run trained on the family with data.split 70,30,0; the
    report's held-out and GPTQ calibration tokens are each shard's validation and training documents."""
    import evaluate_quantization

    from megatron_osp.analysis.report_resume import tokens_identity

    common = [family_run(family, tmp_path), "--data", family["prefix"], "--settings", "fp", "4-4-4+gptq", "--num-windows",
              "5", "--calibration-windows", "2", "--stats-windows", "1", "--weight-error-windows", "0", "--device",
              "cpu", "--no-plots"]
    assert evaluate_quantization.main([*common, "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert report["meta"]["shards"] == 3 and report["meta"]["documents"] == "0.7:1.0"
    held = [d for s in family["shards"] for d in _docs(s, 0.7, 1.0)]
    calib = [d for s in family["shards"] for d in _docs(s, 0.0, 0.7)]
    assert report["request"]["tokens"] == {"held_out": tokens_identity(_windows(held, 5)),
                                           "calibration": tokens_identity(_windows(calib, 2))}
    assert "of each of its 3 shards" in capsys.readouterr().out
    # a shard's files missing: refused naming the shard and its family, before any model loads
    missing = Path(family["shards"][1] + ".bin")
    moved = missing.rename(tmp_path / "aside.bin")
    try:
        assert evaluate_quantization.main([*common, "--output-dir", str(tmp_path / "o2")]) == 2
    finally:
        moved.rename(missing)
    err = capsys.readouterr().err
    assert f"error: --data: {missing} does not exist (a shard of {family['prefix']}" in err, err
