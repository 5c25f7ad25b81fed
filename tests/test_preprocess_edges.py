"""Inputs and options that used to give silently wrong preprocessing output: an input given twice (its
documents written twice), a SentencePiece model without an EOS piece under --append-eod (the EOD -1 was
cast to 65535), a tokenizer.json whose ids have a gap (an id past the token count wrapped around in
uint16), and --json-keys given twice (every document written twice into one dataset) or holding a path
separator (the data files were lost, a manifest published alone); and a --tokenizer-model that is not a
SentencePiece model, which ended in a traceback; a worker killed mid-run, which hung the run forever,
workers that outlived a killed main process, and an input directory holding an earlier output's manifest."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.preprocess import preprocess
from megatron_osp.data.tokenizer import HFTokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"document {i}: hello world, the quick brown fox" * (1 + i % 3) for i in range(60)]


def _corpus(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t, "title": t[:12]}) + "\n" for t in TEXTS))
    return src


def _preprocess_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--no-progress",
                           *map(str, args)], capture_output=True, text=True, timeout=300)


def test_append_eod_with_a_tokenizer_without_eos_is_refused(tmp_path):
    src = _corpus(tmp_path)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "noeos"),
                                   vocab_size=120, eos_id=-1, model_type="bpe", minloglevel=2)
    model = tmp_path / "noeos.model"
    for plan in ([], ["--plan"]):
        r = _preprocess_cli("--input", src, "--tokenizer-model", model, "--output-prefix", tmp_path / "out",
                            "--append-eod", *plan)
        assert r.returncode == 1 and f"{model}: has no end-of-document token" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("out*"))
    # Without --append-eod the model is fine: no EOD is written.
    stats = preprocess([str(src)], str(model), str(tmp_path / "out"), append_eod=False, progress=False)
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert stats.documents == len(ds) == len(TEXTS) and int(ds[0].max()) < 120


def _gap_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json of 6 tokens: "zebra" is id 69999, the EOD 70000 (ids 4..69998 unused)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "fox": 3, "zebra": 69999, "<|endoftext|>": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_hf_ids_past_the_token_count_are_stored_in_a_dtype_that_holds_them(tmp_path, workers):
    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    assert HFTokenizer(tok).vocab_size == 70001
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello world"}\n{"text": "fox zebra"}\n')
    preprocess([str(src)], str(tok), str(tmp_path / "out"), workers=workers, progress=False)
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 70000], [3, 69999, 70000]]


def test_an_id_the_output_dtype_cannot_hold_stops_the_run(tmp_path, monkeypatch):
    """The cast to the output dtype is checked: a tokenizer that reports too small a vocabulary gives
    an error naming it, not wrapped ids."""
    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    monkeypatch.setattr(HFTokenizer, "vocab_size", property(lambda self: self._tok.get_vocab_size(True)))
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello world"}\n{"text": "zebra"}\n')
    with pytest.raises(ValueError, match=r"tokenizer\.json: gave token id 69999 .*c\.jsonl:1\.\.2, which uint16"):
        preprocess([str(src)], str(tok), str(tmp_path / "out"), append_eod=False, progress=False)
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("keys, message", [(["text", "title", "text"], "--json-keys 'text' is given twice"),
                                           (["text", "meta/title"], "--json-keys 'meta/title': a key names"),
                                           (["text", ""], "--json-keys '': a key names")],
                         ids=["repeated", "path", "empty"])
def test_json_keys_that_cannot_name_one_dataset_each_are_refused(tmp_path, keys, message):
    src = _corpus(tmp_path)
    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=re.escape(message)):
        preprocess([str(src)], str(tok), str(tmp_path / "out"), json_keys=tuple(keys), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "tokenizer.json"]


@pytest.mark.parametrize("inputs", [["c*.jsonl", "c1.jsonl"], ["d", "d/c0.jsonl"], ["c0.jsonl", "./c0.jsonl"]],
                         ids=["glob-and-file", "directory-and-file", "two-spellings"])
def test_an_input_given_twice_is_refused(tmp_path, inputs):
    """Its documents used to go into the output twice."""
    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "d").mkdir()
    for name in ("c0.jsonl", "c1.jsonl", "d/c0.jsonl"):
        (tmp_path / name).write_text('{"text": "hello world"}\n')
    twice = Path(inputs[1])
    for plan in ([], ["--plan"]):
        r = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--no-progress", "--input",
                            *inputs, "--tokenizer-model", str(tok), "--output-prefix", "out", *plan],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and f"{twice}: given twice as input" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("tool", ["preprocess_data.py", "merge_datasets.py"])
def test_a_file_that_is_not_a_sentencepiece_model_is_named(tmp_path, tool):
    """E.g. the .vocab beside the .model: it used to end in a traceback from SentencePiece's C++."""
    src = _corpus(tmp_path)
    wrong = tmp_path / "tok.vocab"
    wrong.write_text("<unk>\t0\n<s>\t0\n</s>\t0\n")
    args = (["--input", src, "--no-progress"] if tool == "preprocess_data.py" else
            ["--input", tmp_path / "none_text_document"])
    r = subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args), "--tokenizer-model", str(wrong),
                        "--output-prefix", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"error: {wrong}: not a SentencePiece model" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("out*"))


_KILL_A_WORKER = """
import os, signal, sys
from megatron_osp.data.preprocess import preprocess
from megatron_osp.data.tokenizer import HFTokenizer

encode, parent = HFTokenizer.encode_flat, os.getpid()

def encode_or_die(self, texts, threads=-1):
    if os.getpid() != parent and any("fox" in t for t in texts):
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return encode(self, texts, threads)

HFTokenizer.encode_flat = encode_or_die
src, tok, out = sys.argv[1:]
try:
    preprocess([src], tok, out, workers=2, chunk_lines=4, progress=False)
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_a_killed_worker_stops_the_run_with_its_lines_named(tmp_path):
    """multiprocessing.Pool replaced a killed worker and waited forever for the chunk it held."""
    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello world"}\n' * 10 + '{"text": "fox"}\n' + '{"text": "world"}\n' * 10)
    r = subprocess.run([sys.executable, "-c", _KILL_A_WORKER, str(src), str(tok), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60)
    m = re.search(rf"WorkerDied: {re.escape(str(src))}:(\d+)\.\.(\d+): a tokenizing worker process died", r.stdout)
    assert r.returncode == 0 and m, r.stdout + r.stderr[-2000:]
    assert int(m.group(1)) <= 11 <= int(m.group(2))  # the lines in flight include the fatal one
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


_HANG_IN_WORKERS = """
import os, sys, time
from megatron_osp.data.preprocess import preprocess
from megatron_osp.data.tokenizer import HFTokenizer

parent = os.getpid()

def encode_slowly(self, texts, threads=-1):
    time.sleep(300 if os.getpid() != parent else 0)

HFTokenizer.encode_flat = encode_slowly
preprocess(sys.argv[1:2], sys.argv[2], sys.argv[3], workers=2, chunk_lines=4, progress=False)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_workers_end_when_the_main_process_is_killed(tmp_path):
    """SIGKILL (or a SLURM time limit's SIGTERM) of the main process used to leave its workers running."""
    import signal
    import time

    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello world"}\n' * 40)
    main = subprocess.Popen([sys.executable, "-c", _HANG_IN_WORKERS, str(src), str(tok), str(tmp_path / "out")])
    try:
        children: list[int] = []
        deadline = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            children = [int(c) for c in Path(f"/proc/{main.pid}/task/{main.pid}/children").read_text().split()]
        assert len(children) == 2, children
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, children)), [c for c in children if _alive(c)]
    finally:
        main.kill()
        for c in children:
            if _alive(c):
                os.kill(c, signal.SIGKILL)


_ORPHANED_BEFORE_ITS_WATCH = """
import os, time
from megatron_osp.data.preprocess import _exit_with_parent

main = os.getpid()
if os.fork():  # the main process: killed between the fork of its worker and the worker's watch
    os._exit(0)
while os.getppid() == main:  # the worker starts its watch only once the main process is gone
    time.sleep(0.01)
print(os.getpid(), flush=True)
_exit_with_parent(main, interval=0.05)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_a_worker_whose_main_process_died_before_its_watch_started_ends():
    """The watch read its parent's pid when it started: a worker that started it after the main process
    was killed (the main process killed while forking the pool) took its new parent (init, a subreaper)
    for the main process and lived on. The test above failed so once, under load. The main process's
    pid is now taken before the fork and handed to the worker."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", _ORPHANED_BEFORE_ITS_WATCH], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(proc.stdout.readline())
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the orphaned worker lives on"
        assert proc.wait(timeout=30) == 0 and proc.stderr.read() == ""
    finally:
        proc.kill()
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_directory_input_holding_an_earlier_output_is_read_again_alike(tmp_path):
    """The output's manifest (PREFIX_text_document.shards.json) was taken as a corpus file, so running
    the same command again failed on its first line."""
    tok = _gap_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "hello world"}\n{"text": "fox"}\n')
    for _ in range(2):
        r = _preprocess_cli("--input", tmp_path / "corpus", "--tokenizer-model", tok, "--output-prefix",
                            tmp_path / "corpus" / "out", "--append-eod")
        assert r.returncode == 0, r.stderr[-2000:]
        # the guessed EOD, once, before the work (a wrong guess used to show only in the output's ids)
        assert r.stdout.count("end-of-document token") == 1, r.stdout
        assert r.stdout.startswith("end-of-document token '<|endoftext|>', id 70000 (guessed from the vocabulary; "
                                   "--eod-token picks another); it is an ordinary vocabulary entry, not one of the "
                                   "tokenizer's special tokens\n"), r.stdout
        ds = IndexedDataset(tmp_path / "corpus" / "out_text_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 70000], [3, 70000]]
