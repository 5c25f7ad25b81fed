"""A JSON file that is no JSONL corpus (a tokenizer.json, a config.json, a manifest, a JSON array) inside
an --input directory, or given by name, was read as one: the run stopped at its first line as if one record
were bad (file:1: malformed JSON), after the files before it were tokenized, and --skip-bad-records dropped
it line by line with only a count. It is refused before any work, named as what it is. Our own outputs in
the input directory (.bin/.idx, shards, manifests) are never read as input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.inputs import expand_inputs
from megatron_osp.data.preprocess import preprocess
from megatron_osp.data.readers import BadRecord, CorruptInput
from megatron_osp.data.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
RECORDS = "".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(30))
NOT_JSONL = "does not look like a JSONL corpus (one JSON object per line, with 'text')"


def _hf_tokenizer(path: Path, pretty: bool = True) -> Path:
    """A word-level tokenizer.json, saved as the tokenizers library saves one (pretty-printed) or on one line."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "quick": 2, "fox": 3, "<|endoftext|>": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if pretty:
        tok.save(str(path))
    else:
        path.write_text(tok.to_str() + "\n")
    return path


def _corpus_dir(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text(RECORDS)
    (d / "b.jsonl").write_text(RECORDS)
    return d


@pytest.mark.parametrize("skip", [False, True])
def test_a_tokenizer_json_in_the_input_directory_is_refused_before_any_output(tmp_path, skip):
    corpus = _corpus_dir(tmp_path)
    tok = _hf_tokenizer(corpus / "tokenizer.json")  # the tokenizer kept beside its data, and used
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--no-progress", "--input", str(corpus),
           "--tokenizer-model", str(tok), "--output-prefix", str(tmp_path / "out" / "c"), "--append-eod"]
    r = subprocess.run(cmd + ["--skip-bad-records"] * skip, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"error: {tok}: {NOT_JSONL}: its first line is '{{' alone: one pretty-printed JSON document" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing made, not even the stage directory
    r = subprocess.run(cmd + ["--plan", "--num-tasks", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"error: {tok}: {NOT_JSONL}" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("name, content, problem", [
    ("config.json", json.dumps({"vocab_size": 50257, "n_layer": 12}, indent=2) + "\n",
     "its first line is '{' alone: one pretty-printed JSON document"),
    ("array.json", json.dumps([{"text": "a"}, {"text": "b"}]) + "\n", "it begins with '[': a JSON array"),
    ("lines.json", "[\n" + ",\n".join(json.dumps({"text": t}) for t in "ab") + "\n]\n",
     "its first line is '[' alone"),
    ("one.json", json.dumps({"model": {"type": "BPE"}, "added_tokens": []}) + "\n",
     "its only line is one JSON object (keys 'model', 'added_tokens') without 'text'"),
    ("value.json", '"just a string"\n', "its only line is a string, not a JSON object"),
])
def test_json_that_is_no_corpus_is_named_as_such_even_when_skipping_bad_records(tmp_path, sp_model, name, content,
                                                                               problem):
    corpus = _corpus_dir(tmp_path)
    (corpus / name).write_text(content)
    with pytest.raises(CorruptInput) as e:
        preprocess([str(corpus / "a.jsonl"), str(corpus / name)], sp_model, str(tmp_path / "out"),
                   progress=False, skip_bad_records=True)
    assert str(e.value).startswith(f"{corpus / name}: {NOT_JSONL}: {problem}"), e.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_minified_tokenizer_json_is_refused_by_tokenizer_training_and_check_tokenization(tmp_path, sp_model):
    corpus = _corpus_dir(tmp_path)
    tok = _hf_tokenizer(corpus / "tokenizer.json", pretty=False)
    with pytest.raises(CorruptInput, match="^" + re.escape(f"{tok}: {NOT_JSONL}: its only line is one JSON object (keys "
                                                         "'version', 'truncation', 'padding', 'added_tokens', ")):
        train_sentencepiece(corpus, tmp_path / "tok", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    r = subprocess.run([sys.executable, str(REPO / "tools" / "check_tokenization.py"), "--input", str(corpus),
                        "--tokenizer-model", sp_model], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"error: {tok}: {NOT_JSONL}: its only line is one JSON object" in r.stderr, r.stderr


def test_a_corpus_with_a_bad_first_record_or_one_record_is_still_a_corpus(tmp_path, sp_model):
    """Only a whole file that is no JSONL is refused: a bad first line among records is a bad record (named
    file:1, skippable), so is the only line of a .jsonl, and a corpus of one record is read."""
    bad_first = tmp_path / "bad.jsonl"
    bad_first.write_text('{"text": "cut sh\n' + RECORDS)
    with pytest.raises(BadRecord, match=rf"^{bad_first}:1: malformed JSON") as e:
        preprocess([str(bad_first)], sp_model, str(tmp_path / "o1"), progress=False)
    assert not isinstance(e.value, CorruptInput)
    stats = preprocess([str(bad_first)], sp_model, str(tmp_path / "o1"), progress=False, skip_bad_records=True)
    assert (stats.documents, stats.bad_locations) == (30, [f"{bad_first}:1"])
    other = tmp_path / "other.jsonl"  # named JSON lines: one record without 'text' is a bad record
    other.write_text('{"other": "x"}\n')
    with pytest.raises(BadRecord, match=rf"^{other}:1: missing key 'text'") as e:
        preprocess([str(other)], sp_model, str(tmp_path / "o3"), progress=False)
    assert not isinstance(e.value, CorruptInput)
    one = tmp_path / "one.json"
    one.write_text('\ufeff{"text": "a single document", "id": 1}')  # a byte-order mark, no final newline
    assert preprocess([str(one)], sp_model, str(tmp_path / "o2"), progress=False).documents == 1


def test_sharded_outputs_and_manifests_in_the_input_directory_are_never_read(tmp_path, sp_model):
    """Run twice into the directory it reads: the second run reads the same two files, not the shards
    (.bin/.idx) and manifest (.shards.json) the first one wrote there."""
    corpus = _corpus_dir(tmp_path)
    for run in range(2):
        stats = preprocess(expand_inputs([str(corpus)]), sp_model, str(corpus / "out"), progress=False, max_shard_tokens=100)
        assert stats.documents == 60, run
    names = sorted(p.name for p in corpus.iterdir())
    assert "out_text_document.shards.json" in names and "out_text_document_00001.bin" in names, names
    first = IndexedDataset(str(corpus / "out_text_document_00000"))
    assert len(first) and first[0].tolist()


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_records_ended_by_bare_carriage_returns_are_refused_not_read_as_one_record(tmp_path, sp_model, suffix):
    """Old Mac line endings ("\\r" alone): the reader splits at "\\n", so the whole file was one line, a
    malformed record, and --skip-bad-records dropped all its documents as "1 bad record". Refused by name
    (plain, .gz, .zst alike), before any output; a CR inside one record (JSON whitespace) is still read."""
    import gzip

    import zstandard

    corpus = _corpus_dir(tmp_path)
    data = RECORDS.replace("\n", "\r").encode()
    compress = {"": bytes, ".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}[suffix]
    mac = corpus / f"mac.jsonl{suffix}"
    mac.write_bytes(compress(data))
    with pytest.raises(CorruptInput) as e:
        preprocess([str(corpus / "a.jsonl"), str(mac)], sp_model, str(tmp_path / "out"), progress=False,
                   skip_bad_records=True)
    assert str(e.value).startswith(f"{mac}: {NOT_JSONL}: its records are separated by bare carriage returns"), e.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    inner = corpus / f"inner.jsonl{suffix}"  # CR as whitespace inside a record, CRLF line ends
    inner.write_bytes(compress(b'{"text":\r"one"}\r\n{"text": "two"}\r\n'))
    assert preprocess([str(inner)], sp_model, str(tmp_path / "o2"), progress=False).documents == 2


def test_our_outputs_matched_by_a_glob_are_left_out_and_refused_when_named(tmp_path, sp_model):
    """A glob over a directory holding an earlier run's output (here one without its manifest, as a merge
    of inputs without manifests writes it) read its .bin/.idx as corpus text: with --skip-bad-records
    they were "bad records" and the run succeeded. Left out as a directory input leaves them out, with a
    line saying so; named alone, refused; a glob matching only them is no corpus."""
    corpus = _corpus_dir(tmp_path)
    preprocess([str(corpus / "a.jsonl")], sp_model, str(corpus / "out"), progress=False, max_shard_tokens=100)
    (corpus / "out_text_document.shards.json").unlink()
    (corpus / "out_text_document_00000.bin.tmp-host-12").write_bytes(b"\0\1")  # a killed run's temporary
    ours = sorted(str(p) for p in corpus.iterdir() if not p.name.endswith(".jsonl"))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--no-progress", "--input",
                        str(corpus / "*"), "--tokenizer-model", sp_model, "--output-prefix", str(tmp_path / "o"),
                        "--skip-bad-records"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bad records" not in r.stdout, r.stdout  # the .bin/.idx were read as corpus text
    assert f"left out {len(ours)} files of earlier outputs" in r.stdout, r.stdout
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == 60
    skipped = []
    assert expand_inputs([str(corpus / "*")], skipped) == [str(corpus / "a.jsonl"), str(corpus / "b.jsonl")]
    assert skipped == ours and len(ours) > 3
    assert expand_inputs([str(corpus)]) == [str(corpus / "a.jsonl"), str(corpus / "b.jsonl")]
    for f in ours:
        with pytest.raises(ValueError, match=re.escape(f"--input {f}: a dataset file that preprocessing or merging "
                                                       "writes")):
            expand_inputs([str(corpus / "a.jsonl"), f])
    with pytest.raises(FileNotFoundError, match="no corpus files match, only outputs of earlier runs"):
        expand_inputs([str(corpus / "out_*")])
