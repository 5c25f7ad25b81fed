"""Inputs and options of the data tools from an outside sweep: each refused before work with a message
naming what is wrong (the file, line or flag), or handled without wrong or partial output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_osp.data.preprocess import BadRecord, preprocess
from test_data_bad_inputs import REPO, TEXTS, _cli, tok  # noqa: F401 (tok: the fixture)


def test_inputs_of_only_bad_records_skipped_are_all_named_with_the_count(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"text": 1}\n{"text": null}\n')
    (tmp_path / "b.jsonl").write_text('{"other": "x"}\n')
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(BadRecord) as e:
        preprocess(inputs, tok, str(tmp_path / "out" / "o"), skip_bad_records=True, progress=False)
    assert str(e.value).startswith(f"{inputs[0]}, {inputs[1]}: no non-empty documents"), str(e.value)
    assert f"3 bad records skipped (first: {inputs[0]}:1, {inputs[0]}:2, {inputs[1]}:1)" in str(e.value)
    many = [str(tmp_path / f"m{i}.jsonl") for i in range(5)]
    for m in many:
        Path(m).write_text('{"text": ""}\n{"text": 2}\n')
    with pytest.raises(BadRecord) as e:
        preprocess(many, tok, str(tmp_path / "out" / "o"), skip_bad_records=True, progress=False)
    assert str(e.value).startswith(f"5 inputs ({many[0]} ... {many[-1]}): no non-empty documents"), str(e.value)
    assert "5 bad records skipped" in str(e.value) and "5 empty documents dropped" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("tool, args, message", [
    ("preprocess_data.py", ["--num-tasks", "0"], "argument --num-tasks: must be at least 1, got 0"),
    ("preprocess_data.py", ["--plan", "--num-tasks", "0"], "argument --num-tasks: must be at least 1, got 0"),
    ("preprocess_data.py", ["--num-tasks", "2", "--task-index", "-1"], "argument --task-index: must be at least 0"),
    ("preprocess_data.py", ["--workers", "0"], "argument --workers: must be at least 1, got 0"),
    ("preprocess_data.py", ["--workers", "-3"], "argument --workers: must be at least 1, got -3"),
    ("merge_datasets.py", ["--num-tasks", "0"], "argument --num-tasks: must be at least 1, got 0"),
    ("check_tokenization.py", ["--show", "-1"], "argument --show: must be at least 0, got -1"),
    ("builtin_corpus.py", ["--min-chars", "-1"], "argument --min-chars: must be at least 0, got -1"),
    ("train_tokenizer.py", ["--sample-documents", "0"], "argument --sample-documents: must be at least 1, got 0"),
    ("train_tokenizer.py", ["--vocab-size", "-1"], "argument --vocab-size: must be at least 260 (256 byte-fallback"),
    ("train_tokenizer.py", ["--character-coverage", "0"], "argument --character-coverage: must be more than 0 and"),
    ("train_tokenizer.py", ["--character-coverage", "1.5"], "argument --character-coverage: must be more than 0 and"),
])
def test_a_numeric_option_out_of_range_is_refused_by_its_flag_before_work(tmp_path, tok, tool, args, message):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:10]))
    common = {
        "preprocess_data.py": ["--input", corpus, "--tokenizer-model", tok, "--output-prefix", tmp_path / "o/o",
                               "--no-progress"],
        "merge_datasets.py": ["--tasks", tmp_path / "o/o"],
        "check_tokenization.py": ["--input", corpus, "--tokenizer-model", tok],
        "builtin_corpus.py": ["--output", tmp_path / "b.jsonl", "--max-documents", "2"],
        "train_tokenizer.py": ["--input", corpus, "--output-prefix", tmp_path / "t", "--vocab-size", "300"]}[tool]
    # (a second --vocab-size overrides the first)
    r = _cli(tool, *common, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]


def test_num_tasks_below_one_is_named_before_the_task_index(monkeypatch):
    from megatron_osp.data.array_tasks import resolve_task

    for n in (0, -2):
        with pytest.raises(ValueError, match=f"^--num-tasks {n}: must be 1..99999"):
            resolve_task(n, None, {})


def _dataset(prefix):
    from megatron_osp.data.indexed import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_a_pipe_is_read_as_input(tmp_path, tok):
    """A FIFO or /dev/stdin (bash's <(zstdcat ...)) failed with 'File or stream is not seekable.', naming
    no file: the plain reader read its first bytes for a format check and seeked back."""
    import os
    import threading

    data = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:7])
    (tmp_path / "c.jsonl").write_text(data)
    preprocess([str(tmp_path / "c.jsonl")], tok, str(tmp_path / "ref"), progress=False)
    want = _dataset(tmp_path / "ref_text_document")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(data,))
    writer.start()
    try:
        preprocess([str(fifo)], tok, str(tmp_path / "fifo"), progress=False)
    finally:
        if writer.is_alive():  # the run failed before opening it: let the writer finish
            with open(fifo) as f:
                f.read()
        writer.join()
    assert _dataset(tmp_path / "fifo_text_document") == want
    r = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", "/dev/stdin",
                        "--tokenizer-model", tok, "--output-prefix", tmp_path / "stdin", "--no-progress",
                        "--append-eod"], input=data, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _dataset(tmp_path / "stdin_text_document") == want


@pytest.mark.parametrize("change", ["append", "truncate", "touch", "replace"])
def test_an_input_that_changes_while_it_is_read_stops_the_run(tmp_path, tok, monkeypatch, change):
    """A corpus file still being written (a download, an export) gave an output of part of it, or of
    part old and part new records, without a word."""
    import os

    from megatron_osp.data import preprocess as pre

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "out").mkdir()
    earlier = tmp_path / "out" / "o_text_document.bin"
    earlier.write_bytes(b"earlier")
    real, calls = pre._tokenize_chunk, []

    def tokenize_and_change(args):
        calls.append(1)
        if len(calls) == 2:
            if change == "append":
                with open(src, "a") as f:
                    f.write(json.dumps({"text": "one more"}) + "\n")
            elif change == "truncate":
                os.truncate(src, 100)
            elif change == "touch":
                os.utime(src, ns=(1, 1))
            else:
                (tmp_path / "new").write_text(src.read_text())
                os.replace(tmp_path / "new", src)
        return real(args)

    monkeypatch.setattr(pre, "_tokenize_chunk", tokenize_and_change)
    with pytest.raises(BadRecord, match=f"^{src}: changed while it was read"):
        preprocess([str(src)], tok, str(tmp_path / "out" / "o"), progress=False, chunk_lines=16,
                   overwrite=True)
    assert earlier.read_bytes() == b"earlier" and os.listdir(tmp_path / "out") == ["o_text_document.bin"]


def test_a_line_spanning_many_decompressed_blocks_is_gathered_once():
    """A .zst line longer than a block was gathered by adding each block to it, copying it again per
    block: quadratic (a 128 MiB line took 9 s, a 1 GiB one minutes). Counted here, not timed: the bytes
    copied by adding to a partial line."""
    from megatron_osp.data.readers import _lines_of

    copied = []

    class Block(bytes):
        def __radd__(self, other):  # partial line + block
            copied.append(len(other) + len(self))
            return bytes.__add__(other, self)

    blocks = [Block(b"x" * 1000) for _ in range(300)] + [Block(b'\n{"text": "y"}\n{"te'), Block(b'xt": 1}')]
    assert list(_lines_of(iter(blocks))) == [b"x" * 300_000 + b"\n", b'{"text": "y"}\n', b'{"text": 1}']
    assert sum(copied) <= 2 * 300_000, sum(copied)


def test_merge_given_a_directory_as_an_input_points_to_input_dir(tmp_path, tok):
    """It said 'DIR.idx does not exist'."""
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]))
    preprocess([str(src)], tok, str(tmp_path / "d" / "a"), progress=False)
    r = _cli("merge_datasets.py", "--input", tmp_path / "d", "--output-prefix", tmp_path / "all")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: input {tmp_path / 'd'}: a directory, not a dataset prefix" in r.stderr
    assert f"--input-dir {tmp_path / 'd'} merges every dataset in it" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "d"]


def test_a_fifo_named_like_a_corpus_file_in_an_input_directory_is_refused(tmp_path, tok):
    """It was left out of the output without a word (only regular files and broken links were looked at)."""
    import os

    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]))
    os.mkfifo(d / "b.jsonl")
    r = _cli("preprocess_data.py", "--input", d, "--tokenizer-model", tok, "--output-prefix", tmp_path / "o/o",
             "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: {d / 'b.jsonl'}: not a regular file (a FIFO, socket or device) in the input directory {d}" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_an_input_reached_twice_through_a_hard_link_is_refused(tmp_path, tok):
    """Two names of one file (a hard link: a deduplicated or rsync --link-dest copy of a corpus) were
    both read, as their real paths differ: every document in the output twice."""
    import os

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]))
    os.link(src, tmp_path / "again.jsonl")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'again.jsonl'}: given twice as input \\(as {src}\\)"):
        preprocess([str(src), str(tmp_path / "again.jsonl")], tok, str(tmp_path / "o"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.jsonl", "c.jsonl"]
