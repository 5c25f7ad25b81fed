"""Issue 14 cases 5 and 6 and the dtype check, through the tools a user runs: a lone surrogate is a bad
record with file:line in every format and both tools; vocabulary sizes SentencePiece cannot take, a
--json-key no record has, --max-shard-tokens 0, an unwritable output, and an .idx dtype that cannot
hold the ids are refused by name, in one line, with nothing left behind."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_osp.data.preprocess import BadRecord, preprocess
from megatron_osp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"record {i}: the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(120)]
SURROGATE_LINE = '{"text": "abc \\ud800 def"}'  # the JSON escape, as a file holds it


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(train_sentencepiece(corpus, d / "tok", vocab_size=300))


def _cli(tool, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _lines_with_surrogate():
    good = [json.dumps({"text": t}) for t in TEXTS[:5]]
    return ("\n".join(good[:2] + [SURROGATE_LINE] + good[2:]) + "\n").encode()


def _write(path, data: bytes):
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _no_traceback(r):
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz", "in.jsonl.zst"])
def test_a_lone_surrogate_is_a_bad_record_in_preprocessing(tmp_path, tok, name):
    src = _write(tmp_path / name, _lines_with_surrogate())
    r = _cli("preprocess_data.py", "--input", src, "--tokenizer-model", tok, "--output-prefix",
             tmp_path / "out", "--no-progress", "--append-eod")
    assert r.returncode == 1 and f"{src}:3: key 'text' holds a lone surrogate \\ud800" in r.stderr, r.stderr[-2000:]
    _no_traceback(r)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    r = _cli("preprocess_data.py", "--input", src, "--tokenizer-model", tok, "--output-prefix",
             tmp_path / "out", "--no-progress", "--append-eod", "--skip-bad-records")
    assert r.returncode == 0 and f"bad records skipped: 1 (first: {src}:3)" in r.stdout, r.stderr[-2000:]
    t = SentencePieceTokenizer(tok)
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [t.encode(x) + [t.eod] for x in TEXTS[:5]]


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.zst"])
def test_a_lone_surrogate_is_a_bad_record_in_tokenizer_training(tmp_path, name):
    data = _lines_with_surrogate() + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    src = _write(tmp_path / name, data)
    r = _cli("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "tok", "--vocab-size", 300)
    assert r.returncode == 1 and f"{src}:3: key 'text' holds a lone surrogate" in r.stderr, r.stderr[-2000:]
    _no_traceback(r)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    r = _cli("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "tok", "--vocab-size", 300,
             "--skip-bad-records")
    assert r.returncode == 0 and "bad records skipped: 1" in r.stdout, r.stderr[-2000:]
    assert SentencePieceTokenizer(tmp_path / "tok.model").vocab_size == 300


def test_invalid_utf8_in_a_parquet_string_column_is_a_bad_record(tmp_path, tok):
    # Arrow does not validate UTF-8 when reading Parquet; a surrogate's CESU-8 bytes get through.
    text = pa.array([b"fine text", b"abc \xed\xa0\x80 def", b"more text"], type=pa.binary()).view(pa.string())
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": text}), src)
    with pytest.raises(BadRecord, match=r"in\.parquet:row 2: key 'text' is not valid UTF-8"):
        preprocess([str(src)], tok, str(tmp_path / "out"), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["in.parquet"]
    stats = preprocess([str(src)], tok, str(tmp_path / "out"), progress=False, skip_bad_records=True)
    assert (stats.documents, stats.bad_locations) == (2, [f"{src}:row 2"])


def _corpus(tmp_path, n=120):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:n]))
    return src


def test_vocab_sizes_sentencepiece_refuses_are_explained(tmp_path):
    src = _corpus(tmp_path)
    r = _cli("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "tok", "--vocab-size", 270)
    _no_traceback(r)
    m = re.search(r"byte fallback takes 259 ids .* has (\d+) characters .* needs at least (\d+)", r.stderr)
    assert r.returncode == 1 and m and "INTERNAL" not in r.stderr, r.stderr
    need = int(m.group(2))
    assert need == 259 + int(m.group(1)) > 270
    r = _cli("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "tok", "--vocab-size", 5000)
    m = re.search(r"--vocab-size 5000 is more than this corpus supports: .* at most (\d+) pieces", r.stderr)
    assert r.returncode == 1 and m and "INTERNAL" not in r.stderr, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]
    for size in (need, int(m.group(1))):  # the sizes the messages name do train
        r = _cli("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / f"t{size}", "--vocab-size", size)
        assert r.returncode == 0, r.stderr


def test_an_existing_tokenizer_is_not_replaced_without_overwrite(tmp_path):
    """train_tokenizer.py replaced PREFIX.model/.vocab without a word, though datasets may have been
    tokenized with them; now refused before training, unless --overwrite."""
    src = _corpus(tmp_path, 60)
    args = ("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "tok")
    assert _cli(*args, "--vocab-size", 400).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("tok.*")}
    assert sorted(before) == ["tok.model", "tok.vocab"]
    r = _cli(*args, "--vocab-size", 420)
    _no_traceback(r)
    assert r.returncode == 1 and f"{tmp_path / 'tok.model'} already exists" in r.stderr and "--overwrite" in r.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.glob("tok.*")} == before
    assert _cli(*args, "--vocab-size", 420, "--overwrite").returncode == 0
    assert (tmp_path / "tok.model").read_bytes() != before["tok.model"]


def test_a_json_key_no_record_has_is_named(tmp_path):
    src = _corpus(tmp_path, 20)
    r = _cli("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "tok", "--vocab-size", 300,
             "--json-key", "body")
    assert r.returncode == 1 and f"{src}:1: missing key 'body'" in r.stderr and "sentences_" not in r.stderr
    r = _cli("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "tok", "--vocab-size", 300,
             "--json-key", "body", "--skip-bad-records")
    assert r.returncode == 1 and "no text to train on: all 20 records read were bad" in r.stderr, r.stderr
    _no_traceback(r)
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_while_publishing_a_tokenizer_never_leaves_a_mismatched_pair(tmp_path, monkeypatch, crash_at):
    """.vocab was replaced, then .model: a crash between left the new .vocab beside the old .model."""
    import sentencepiece as spm

    from megatron_osp.data import sp_training

    src = _corpus(tmp_path, 40)
    train_sentencepiece(src, tmp_path / "tok", vocab_size=300)
    replace, calls = os.replace, []

    def crashing(a, b):
        calls.append(b)
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")
        replace(a, b)

    monkeypatch.setattr(sp_training.os, "replace", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_sentencepiece(src, tmp_path / "tok", vocab_size=310)
    monkeypatch.undo()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert sp.get_piece_size() in (300, 310)
    vocab = tmp_path / "tok.vocab"
    if vocab.exists():
        pieces = [line.split("\t")[0] for line in vocab.read_text().splitlines()]
        assert pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())], (crash_at, len(pieces))


def test_the_builtin_corpus_removes_the_temporary_a_killed_run_left(tmp_path):
    """A kill during write_corpus left <output>.tmp<pid> for good; the next run removes those whose
    process is gone, and keeps a live process's (one writing now)."""
    from megatron_osp.data.builtin_corpus import write_corpus

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    for pid in (dead.pid, os.getppid()):
        (tmp_path / f"corpus.jsonl.tmp{pid}").write_text('{"text": "half')
    (tmp_path / "other.jsonl.tmp1").write_text("not ours")
    assert write_corpus(tmp_path / "corpus.jsonl", max_documents=2)[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["corpus.jsonl", f"corpus.jsonl.tmp{os.getppid()}", "other.jsonl.tmp1"])


@pytest.mark.parametrize("name", ["corpus.jsonl.gz", "corpus.jsonl.zst", "corpus.parquet"])
def test_the_builtin_corpus_refuses_a_compressed_or_parquet_name(tmp_path, name):
    """It wrote plain JSON lines under that name; preprocessing then called the file a corrupt gzip,
    zstd or Parquet file. Refused before any work, the earlier file untouched."""
    (tmp_path / name).write_bytes(b"earlier")
    out = subprocess.run([sys.executable, str(REPO / "tools/builtin_corpus.py"), "--output", str(tmp_path / name),
                          "--max-documents", "2"], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{tmp_path / name}: named as a " in out.stderr and "name it .jsonl" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes() == b"earlier"


def test_a_tokenizer_output_prefix_naming_a_directory_is_refused(tmp_path):
    """"tok/" used to write tok.model and tok.vocab beside the directory."""
    src = _corpus(tmp_path, 20)
    (tmp_path / "tok").mkdir()
    with pytest.raises(ValueError, match="names a directory, not a file prefix"):
        train_sentencepiece(src, f"{tmp_path / 'tok'}/", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "tok"] and not list((tmp_path / "tok").iterdir())


@pytest.mark.parametrize("last", [".", ".."])
def test_an_output_prefix_ending_in_a_dot_directory_is_refused(tmp_path, tok, last):
    """``out/.`` and ``out/..``: preprocessing and merging put the .bin/.idx in the directory above and
    the manifest in out/, naming datasets that were not beside it, and said they succeeded; tokenizer
    training failed on a Path error (``.``) or wrote ``out/...model`` (``..``)."""
    from megatron_osp.data.merge import merge_datasets

    src = _corpus(tmp_path, 20)
    out = tmp_path / "w" / "out"
    out.mkdir(parents=True)
    with pytest.raises(ValueError, match="names a directory, not a file prefix"):
        preprocess([str(src)], tok, f"{out}/{last}", progress=False)
    preprocess([str(src)], tok, str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match="names a directory, not a file prefix"):
        merge_datasets([str(tmp_path / "a_text_document")], f"{out}/{last}")
    with pytest.raises(ValueError, match="names a directory, not a file prefix"):
        train_sentencepiece(src, f"{out}/{last}", vocab_size=300)
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["out"] and not list(out.iterdir())


@pytest.mark.parametrize("value", ["0", "-100", "0.5", "-1.5"])
def test_max_shard_tokens_must_be_a_positive_count(tmp_path, tok, value):
    src = _corpus(tmp_path, 10)
    r = _cli("preprocess_data.py", "--input", src, "--tokenizer-model", tok, "--output-prefix", tmp_path / "o",
             "--no-progress", f"--max-shard-tokens={value}")
    assert r.returncode == 2 and "--max-shard-tokens" in r.stderr and value in r.stderr, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]


@pytest.fixture
def unwritable(tmp_path):
    """A directory the process cannot create files in (root is refused only by /sys)."""
    if os.geteuid() == 0:
        yield Path("/sys/megatron_osp_test_unwritable")
        return
    d = tmp_path / "read_only"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


def test_an_unwritable_output_is_one_line_naming_the_path(tmp_path, tok, unwritable):
    src = _corpus(tmp_path, 10)
    ds = tmp_path / "ds"
    with IndexedDatasetWriter(ds, np.uint16) as w:
        w.add_document(np.arange(5))
    runs = [
        ("preprocess_data.py", "--input", src, "--tokenizer-model", tok, "--output-prefix", unwritable / "sub" / "o",
         "--no-progress"),
        ("train_tokenizer.py", "--input", src, "--output-prefix", unwritable / "tok", "--vocab-size", 300),
        ("merge_datasets.py", "--input", ds, "--output-prefix", unwritable / "m"),
    ]
    for args in runs:
        r = _cli(*args)
        _no_traceback(r)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 1 and len(errors) == 1 and str(unwritable) in errors[0], (args[0], r.stderr)


def test_a_dtype_code_that_does_not_match_the_data_is_refused(tmp_path):
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for n in (5, 9, 3):
            w.add_document(np.arange(300, 300 + n))
    with open(prefix + ".idx", "r+b") as f:  # uint16 -> uint8: reinterpreted bytes, all ids "valid"
        f.seek(17)
        f.write(bytes([1]))
    with pytest.raises(ValueError, match=r"d\.bin: 34 bytes, but .*d\.idx accounts for 17 \(uint8 tokens\)"):
        IndexedDataset(prefix)


def test_merge_refuses_a_dtype_too_small_for_the_tokenizer(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for p, top in ((a, 200), (b, 70000)):
        with IndexedDatasetWriter(p, np.int32) as w:
            w.add_document(np.array([1, top]))
    from megatron_osp.data.merge import merge_datasets

    with pytest.raises(ValueError, match=r"b\.bin: holds token id 70000, outside the vocabulary of 65536"):
        merge_datasets([a, b], str(tmp_path / "m"), vocab_size=65536)
    small = str(tmp_path / "small")
    with IndexedDatasetWriter(small, np.uint16) as w:
        w.add_document(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"small\.idx: token dtype uint16 holds ids up to 65535, but the vocabulary "
                                         r"has 100000 .* needs int32"):
        merge_datasets([small], str(tmp_path / "m"), vocab_size=100_000)
    assert not list(tmp_path.glob("m*"))


def test_merge_refuses_preprocessed_datasets_of_different_tokenizers(tmp_path, tok):
    src = _corpus(tmp_path, 30)
    other = train_sentencepiece(src, tmp_path / "other", vocab_size=320)
    preprocess([str(src)], tok, str(tmp_path / "a"), progress=False)
    preprocess([str(src)], str(other), str(tmp_path / "b"), progress=False)
    r = _cli("merge_datasets.py", "--input", tmp_path / "a_text_document", tmp_path / "b_text_document",
             "--output-prefix", tmp_path / "m")
    assert r.returncode == 1 and "tokenizer of 320 ids" in r.stderr and "300" in r.stderr, r.stderr
    assert not list(tmp_path.glob("m*"))


@pytest.mark.parametrize("line, reason", [('{"text": 1' + "1" * 5000 + "}", "unreadable JSON (ValueError"),
                                          ("[" * 100_000, "unreadable JSON (RecursionError")],
                         ids=["long-number", "deep-nesting"])
def test_json_python_cannot_convert_is_a_bad_record(tmp_path, tok, line, reason):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(BadRecord, match=re.escape(f"in.jsonl:2: {reason}")):
        preprocess([str(src)], tok, str(tmp_path / "out"), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_temporaries_of_killed_training_and_merge_runs_are_removed(tmp_path):
    """A killed train_tokenizer.py or merge_datasets.py leaves PREFIX.tmp<pid>.model / PREFIX.bin.tmp<pid>;
    the next run on that prefix removes them (pid gone), and leaves a live process's alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    src = _corpus(tmp_path, 40)
    stale = [tmp_path / f"tok.tmp{dead.pid}.model", tmp_path / f"tok.tmp{dead.pid}.vocab",
             tmp_path / f"m.bin.tmp{dead.pid}", tmp_path / f"m.idx.tmp{dead.pid}"]
    live = tmp_path / f"m.bin.tmp{os.getpid()}"
    for p in stale + [live]:
        p.write_bytes(b"partial")
    r = _cli("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "tok", "--vocab-size", 300)
    assert r.returncode == 0, r.stderr
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        w.add_document(np.arange(5))
    assert _cli("merge_datasets.py", "--input", tmp_path / "d", "--output-prefix", tmp_path / "m").returncode == 0
    assert [p.name for p in stale if p.exists()] == [] and live.exists()


def test_ctrl_c_in_preprocessing_ends_cleanly(tmp_path, tok):
    """Ctrl-C (SIGINT to the terminal's process group) ended preprocessing in a KeyboardInterrupt
    traceback, and could hang it: a worker interrupted in a queue operation left the pool's queues
    locked. Now the workers ignore SIGINT (forked with it blocked) and the main process ends them:
    one line, exit 130, no stage directory or worker left, the earlier output as it was."""
    import signal
    import time

    earlier = _cli("preprocess_data.py", "--input", _corpus(tmp_path, 20), "--tokenizer-model", tok,
                   "--output-prefix", tmp_path / "out", "--no-progress")
    assert earlier.returncode == 0, earlier.stderr
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out_*")}
    big = tmp_path / "big.jsonl"
    line = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS)
    big.write_text(line * max(1, 150_000_000 // len(line)))  # several seconds of work (~25M tokens/s here)
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(big),
                             "--tokenizer-model", tok, "--output-prefix", str(tmp_path / "out"), "--no-progress",
                             "--workers", "2", "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # A shell's background job (`pytest ... &`) inherits SIGINT ignored, and so
                            # would this child, which then rightly keeps ignoring Ctrl-C: test it as a
                            # terminal's foreground run gets it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.stage-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # the workers are tokenizing
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: every process of the group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted: no output was written" in err, err[-3000:]
    assert not list(tmp_path.glob(".out.stage-*"))
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out_*")} == before
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], left


def test_a_file_beside_the_tokenizer_given_for_it_is_named_for_what_it_is(tmp_path, tok):
    """A model's vocab.json or tokenizer_config.json, Llama 3's tiktoken original/tokenizer.model, or a
    directory with only a SentencePiece tokenizer.model: the message used to be a JSON parser's or
    SentencePiece's error ("expected `,` or `}` at line 1 column 5", "could not parse ModelProto")."""
    import base64
    import shutil

    from megatron_osp.data.tokenizer import load_tokenizer

    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"hello": 0, "model": 1, "Ġworld": 2}))
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": {}}))
    tiktoken = tmp_path / "tokenizer.model"
    tiktoken.write_text("".join(f"{base64.b64encode(t.encode()).decode()} {i}\n" for i, t in enumerate(["!", "ab", " the"])))
    only_sp = tmp_path / "sp"
    only_sp.mkdir()
    shutil.copy(tok, only_sp / "tokenizer.model")
    cases = [(vocab, r"vocab\.json: not a Hugging Face tokenizer\.json: it is a token -> id map \(a vocab\.json\)"),
             (config, r"tokenizer_config\.json: not a Hugging Face tokenizer\.json: it is a tokenizer_config\.json: "
                      r"give the tokenizer\.json beside it"),
             (tiktoken, r"tokenizer\.model: not a SentencePiece model: it is a tiktoken BPE file .* not supported: "
                        r"give the model's tokenizer\.json"),
             (only_sp, r"sp/tokenizer\.json does not exist; .*sp/tokenizer\.model is there: give that file")]
    for path, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_tokenizer(path)
    r = _cli("preprocess_data.py", "--input", tmp_path / "none.jsonl", "--tokenizer-model", tiktoken,
             "--output-prefix", tmp_path / "out")
    assert r.returncode != 0 and "it is a tiktoken BPE file" in r.stderr
    _no_traceback(r)


def test_tokenizer_training_names_an_input_that_holds_no_corpus_file(tmp_path):
    """train_tokenizer.py takes files, globs and directories as preprocess_data.py does (it took one file
    and said so; tests/test_tokenizer_inputs.py): an empty directory, a glob matching nothing and a missing
    file are refused by name."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("not a corpus file")
    with pytest.raises(FileNotFoundError, match=re.escape(f"--input {corpus}: no corpus files match")):
        train_sentencepiece(corpus, tmp_path / "tok", vocab_size=300)
    with pytest.raises(FileNotFoundError, match=re.escape(f"--input {corpus}/*.jsonl: no corpus files match")):
        train_sentencepiece(f"{corpus}/*.jsonl", tmp_path / "tok", vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist$"):
        train_sentencepiece(corpus / "missing.jsonl", tmp_path / "tok", vocab_size=300)
