"""tools/train_tokenizer.py --input takes files, globs and directories as preprocess_data.py does: it took
one file, so a sharded corpus had to be concatenated first. Several files train the tokenizer of their
concatenation; --sample-documents N takes records from every file (a share of N in proportion to its
size), and of one file still its first N; a file given twice is refused; a bad record is named by
file:line in whichever file it is.

Models written under different output prefixes are compared byte for byte but for
trainer_spec.model_prefix, the prefix SentencePiece records (the output prefix; it recorded the
temporary one, PREFIX.tmp-<host>-<pid>, so two runs of one command gave different files)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_osp.data.sp_training import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while data tokens flow é 漢 through shards".split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 17)) for i in range(120)]


def _lines(texts) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools/train_tokenizer.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _model(path) -> bytes:
    """The .model's bytes with the temporary training prefix it records cleared."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    assert proto.trainer_spec.model_prefix
    proto.trainer_spec.model_prefix = ""
    return proto.SerializeToString()


def _train(tmp_path, name, *inputs, extra=()):
    r = _cli("--input", *inputs, "--output-prefix", tmp_path / name, "--vocab-size", 330, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / f"{name}.model"


@pytest.fixture()
def shards(tmp_path):
    """a.jsonl and b.jsonl.gz in corpus/, and all.jsonl: their concatenation."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text(_lines(TEXTS[:70]))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(_lines(TEXTS[70:]))
    (tmp_path / "all.jsonl").write_text(_lines(TEXTS))
    return d


def test_two_files_train_the_tokenizer_of_their_concatenation(tmp_path, shards):
    two = _train(tmp_path, "two", shards / "a.jsonl", shards / "b.jsonl.gz")
    whole = train_sentencepiece(tmp_path / "all.jsonl", tmp_path / "whole", vocab_size=330)  # the one-path API
    assert _model(two) == _model(whole)
    first = train_sentencepiece(shards / "a.jsonl", tmp_path / "first", vocab_size=330)
    assert _model(first) != _model(whole)  # the second file was read, not only the first


def test_a_directory_and_a_glob_are_their_files_sorted(tmp_path, shards):
    whole = _model(train_sentencepiece([tmp_path / "all.jsonl"], tmp_path / "whole", vocab_size=330))
    assert _model(_train(tmp_path, "dir", shards)) == whole
    assert _model(_train(tmp_path, "glob", f"{shards}/*.jsonl*")) == whole


def test_a_file_given_twice_is_refused(tmp_path, shards):
    """As preprocess_data.py refuses it (check_inputs): its documents would be trained on twice."""
    for inputs in ([shards / "a.jsonl", shards / "a.jsonl"], [shards / "a.jsonl", shards]):
        r = _cli("--input", *inputs, "--output-prefix", tmp_path / "tok", "--vocab-size", 330)
        assert r.returncode == 1, r.stderr[-3000:]
        assert f"error: {shards / 'a.jsonl'}: given twice as input" in r.stderr
        # a tokenizer has no output holding documents (the message was preprocessing's, "in the output twice")
        assert "its documents would be trained on twice" in r.stderr and "output" not in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not list(tmp_path.glob("tok*"))
    with pytest.raises(ValueError, match="given twice as input.*; its documents would be trained on twice"):
        train_sentencepiece([shards / "b.jsonl.gz", f"{shards}/*.gz"], tmp_path / "tok", vocab_size=330)


def _marked(letter, marks):
    """40 records of one length, the first 10 ending in marks[0], the rest in marks[1]."""
    return _lines(f"{letter} record {i:02d} {TEXTS[i]} {marks[0] if i < 10 else marks[1]}" for i in range(40))


def test_sample_documents_takes_records_from_every_file(tmp_path):
    """Two files of equal size, --sample-documents 20: the first 10 records of each. Which records were
    read shows in the vocabulary (--character-coverage 1 keeps every character read)."""
    import sentencepiece as spm

    (tmp_path / "a.jsonl").write_text(_marked("a", "жф"))
    (tmp_path / "b.jsonl").write_text(_marked("b", "юя"))
    assert (tmp_path / "a.jsonl").stat().st_size == (tmp_path / "b.jsonl").stat().st_size
    model = _train(tmp_path, "s", tmp_path / "a.jsonl", tmp_path / "b.jsonl",
                   extra=("--sample-documents", 20, "--character-coverage", 1))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert {c: sp.piece_to_id(c) != sp.unk_id() for c in "жфюя"} == {"ж": True, "ф": False, "ю": True, "я": False}


def test_sample_shares_follow_sizes_and_a_short_file_passes_its_share_on(tmp_path):
    from megatron_osp.data.sp_training import sample_shares

    assert sample_shares([100], 7) == [7]
    assert sample_shares([100, 300], 10) == [2, 8]
    assert sample_shares([1, 1, 1], 10) == [3, 3, 4] and sum(sample_shares([3, 5, 9, 1], 1001)) == 1001
    assert sample_shares([None, 500], 4) == [2, 2]  # a pipe's size is unknown: equal shares
    # a.jsonl is the larger file but holds 3 records: b.jsonl gives the rest of the 20
    (tmp_path / "a.jsonl").write_text(_lines(["x" * 5000] * 3))
    (tmp_path / "b.jsonl").write_text(_marked("b", "юя"))
    model = train_sentencepiece([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "t", vocab_size=300,
                                sample_documents=20, character_coverage=1.0)
    expected = _lines(["x" * 5000] * 3) + "".join(_marked("b", "юя").splitlines(True)[:17])
    (tmp_path / "expected.jsonl").write_text(expected)
    assert _model(model) == _model(train_sentencepiece(tmp_path / "expected.jsonl", tmp_path / "e", vocab_size=300,
                                                       character_coverage=1.0))


def test_one_file_samples_its_first_n_records_as_before(tmp_path):
    """Existing tokenizers are reproduced: --sample-documents N of one file trains on its first N records
    (checked against the code before this change: the same .model)."""
    (tmp_path / "c.jsonl").write_text(_lines(TEXTS))
    (tmp_path / "first.jsonl").write_text(_lines(TEXTS[:45]))
    cli = _train(tmp_path, "cli", tmp_path / "c.jsonl", extra=("--sample-documents", 45))
    api = train_sentencepiece(tmp_path / "c.jsonl", tmp_path / "api", vocab_size=330, sample_documents=45)
    first = train_sentencepiece(str(tmp_path / "first.jsonl"), tmp_path / "first", vocab_size=330)
    assert _model(cli) == _model(api) == _model(first)


def test_bad_records_are_named_by_file_and_line_and_counted_over_every_file(tmp_path, shards):
    with gzip.open(shards / "b.jsonl.gz", "wt") as f:
        f.write(_lines(TEXTS[70:72]) + "{broken\n" + _lines(TEXTS[72:]))
    r = _cli("--input", shards, "--output-prefix", tmp_path / "tok", "--vocab-size", 330)
    assert r.returncode == 1 and f"error: {shards / 'b.jsonl.gz'}:3: malformed JSON" in r.stderr, r.stderr[-3000:]
    (shards / "a.jsonl").write_text(_lines(TEXTS[:4]) + '{"txt": 1}\n' + _lines(TEXTS[4:70]))
    r = _cli("--input", shards, "--output-prefix", tmp_path / "tok", "--vocab-size", 330, "--skip-bad-records")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"bad records skipped: 2 (first: {shards / 'a.jsonl'}:5: " in r.stdout


def test_the_same_command_gives_the_same_model_file(tmp_path, shards):
    first = _train(tmp_path, "tok", shards)
    kept = first.read_bytes()
    again = _cli("--input", shards, "--output-prefix", tmp_path / "tok", "--vocab-size", 330, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert first.read_bytes() == kept


def test_lines_longer_than_sentencepiece_takes_are_trained_on(tmp_path):
    """SentencePiece skips a 'sentence' over max_sentence_length (4192 bytes) without a word: a corpus
    whose documents are long lines (a CJK paragraph, a minified page) trained the tokenizer of its
    short lines only. Long lines are cut into pieces it takes, at spaces where there are any."""
    import sentencepiece as spm

    from megatron_osp.data.sp_training import SENTENCE_BYTES, _pieces

    long_words = ["xylophonequartz", "jukeboxwyvern"]
    spaced = " ".join(long_words[(i * 5) % 7 % 2] for i in range(400))  # one line of ~5,700 bytes
    unspaced = "漢字" * 1500  # 9,000 bytes, no space
    assert len(spaced.encode()) > SENTENCE_BYTES and len(unspaced.encode()) > SENTENCE_BYTES
    for line in (spaced, unspaced):
        pieces = list(_pieces(line))
        assert "".join(pieces) == line and all(len(p.encode()) <= SENTENCE_BYTES for p in pieces)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(_lines(TEXTS[:40] + [spaced] * 20 + [unspaced] * 5))
    model = train_sentencepiece(corpus, tmp_path / "tok", vocab_size=330)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.encode("xylophonequartz jukeboxwyvern", out_type=str) == ["▁xylophonequartz", "▁jukeboxwyvern"]
    assert sp.piece_to_id("字") != sp.unk_id()  # a character only the long unspaced lines hold
