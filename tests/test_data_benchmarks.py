"""The data benchmarks run end to end on tiny sizes, check what they compare, and print their ratios
(the figures themselves are in docs/benchmarks.md; nothing here is timed)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_bench_preprocess_compares_identical_outputs_and_prints_ratios():
    out = _run("tools/bench_preprocess.py", "--corpus-mb", "1", "--vocab-size", "600", "--workers", "1")
    assert "same tokens in all outputs: yes" in out
    rows = {m.group(1): float(m.group(2).replace(",", ""))
            for m in re.finditer(r"^\s+1\s+(\S+)\s+([\d,]+)\s", out, re.M)}
    assert set(rows) == {"re-enactment", "ours-no-cache", "ours"} and all(v > 0 for v in rows.values())
    assert re.search(r"docs/s ratio \(ours / re-enactment\): [\d.]+x; target >= 3x -> (met|NOT met)", out)


def test_bench_data_agrees_on_sample_count_and_prints_ratios():
    out = _run("tools/bench_data.py", "--num-docs", "20000", "--seq-length", "512")
    assert re.search(r"index build \[s\]\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out)
    assert re.search(r"peak RSS \[GiB\]\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out)
    assert "samples:" in out


def test_bench_data_runs_one_side_alone_without_ratios():
    """--sides ours: the 1e9-document run, where Megatron-Core's path does not fit in memory."""
    out = _run("tools/bench_data.py", "--num-docs", "20000", "--seq-length", "512", "--sides", "ours")
    assert "ours only (no baseline in this run)" in out
    assert re.search(r"index build \[s\]\s+[\d.]+\s+[\d.]+\n", out)  # wall and CPU seconds
    assert re.search(r"peak RSS \[GiB\]\s+[\d.]+\n", out)
    assert not re.search(r"\d+\.\d+x", out) and "targets" not in out  # no ratio without a baseline
    samples = int(re.search(r"samples: (\d+)", out).group(1))
    both = _run("tools/bench_data.py", "--num-docs", "20000", "--seq-length", "512")
    assert samples == int(re.search(r"samples: (\d+)", both).group(1))


def test_bench_data_reuses_a_sizes_file_and_digests_are_stable(tmp_path):
    """--sizes-file: the second run reuses the file (the 1e9 one takes ~40 s to write)."""
    path = str(tmp_path / "sizes.npy")
    args = ("tools/bench_data.py", "--num-docs", "20000", "--seq-length", "512", "--sides", "ours",
            "--sizes-file", path, "--digest")
    first, second = _run(*args), _run(*args)
    assert "sizes generated" in first and f"reused {path}" in second
    digests = re.findall(r"sha256 of (\w+) \(dtype \+ bytes\): ([0-9a-f]{16})", first)
    assert [d[0] for d in digests] == ["document_index", "sample_index", "shuffle_index"]
    assert digests == re.findall(r"sha256 of (\w+) \(dtype \+ bytes\): ([0-9a-f]{16})", second)
    wrong = subprocess.run([sys.executable, "tools/bench_data.py", "--num-docs", "30000", "--sides", "ours",
                            "--sizes-file", path], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0 and "not int32 (30000,)" in wrong.stderr


def test_bench_index_cache_reads_the_same_indices_from_both_and_prints_ratios():
    baseline = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", "be9d475:megatron_osp/data/index_cache.py"])
    if baseline.returncode != 0:
        import pytest

        pytest.skip("the baseline commit is not in this checkout's history")
    out = _run("tools/bench_index_cache.py", "--shards", "20")
    assert "same indices read back from both caches: yes" in out
    assert re.search(r"ratio old/new: first use [\d.]+x, cached [\d.]+x", out)
