"""examples/downstream_local_tasks.py on inputs a user may give it: a repetitive corpus, a malformed
record, an out-of-range option, an output directory whose name YAML would cut short."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_run_fixtures import REPO, write_corpus

EXAMPLE = REPO / "examples" / "downstream_local_tasks.py"


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, str(EXAMPLE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_bad_inputs_are_refused_with_file_and_line_and_nothing_hangs(tmp_path):
    """A corpus whose held-out documents hold fewer than 4 different spans used to loop forever; a
    malformed line or a record without 'text' ended in a traceback without the line; --held-out 1.7 took
    the last 70% of the documents without a word (a negative slice); --span 0 looped forever; an output
    directory that is a file ended in a mkdir traceback. Each is now one error line, and no task file is
    written."""
    repetitive = tmp_path / "rep.jsonl"
    repetitive.write_text("".join(json.dumps({"text": "ab" * 200}) + "\n" for _ in range(20)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x" * 300}) + "\n\n" + "{broken\n")
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text(json.dumps({"text": "x" * 300}) + "\n" + json.dumps({"text": 5}) + "\n")
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 60, seed=0)
    out = tmp_path / "tasks"
    cases = [
        ((repetitive, out, "--held-out", "0.5"), f"error: {repetitive}: its held-out documents hold fewer than 4 "
                                                 "different 16-character spans"),
        ((bad, out), f"error: {bad}:3: not valid JSON"),
        ((nokey, out), f"error: {nokey}:2: no string under key 'text' (it holds int)"),
        ((corpus, out, "--held-out", "1.7"), "--held-out must be a fraction in (0, 1], got 1.7"),
        ((corpus, out, "--span", "0"), "--span must be >= 1, got 0"),
    ]
    a_file = tmp_path / "a_file"  # an output directory that is a file, or under one: a mkdir traceback before
    a_file.write_text("x")
    cases += [((corpus, a_file, "--held-out", "0.3"), f"error: output directory {a_file}: {a_file} is not a directory"),
              ((corpus, a_file / "sub", "--held-out", "0.3"), f"output directory {a_file / 'sub'}: {a_file} is not a")]
    for args, expected in cases:
        done = _run(*args)
        assert done.returncode != 0 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not out.exists()


def test_an_output_directory_with_yaml_characters_gives_loadable_tasks(tmp_path):
    """The task YAMLs named their data file unquoted: under a directory named 'run #1: tasks' YAML read
    the path as '.../run' (a comment, then a mapping), and the harness could not find it. And N-shot:
    the tasks have only a test split, which gives their few-shot examples leaving the asked question
    out only with 'fewshot_split: test' in the YAML (without it task_checks refuses them)."""
    pytest.importorskip("lm_eval")
    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 60, seed=0)
    out = tmp_path / "run #1: tasks"
    done = _run(corpus, out, "--held-out", "0.3", "--questions", "12")
    assert done.returncode == 0, done.stderr
    check_tasks(parse_tasks("local_cloze,local_complete"), str(out))
    check_tasks(parse_tasks("local_cloze:3,local_complete:2"), str(out))


def test_questions_fit_the_models_window_and_sizes_that_cannot_are_refused(tmp_path):
    """The defaults (160-character passages + 24-character choices) exceeded the quickstart model's
    128-token window with its character-level tokenizer: the harness cut every passage short (with a
    warning). Now each question, in a byte-level tokenizer's tokens (one per UTF-8 byte, the most a
    character-level one with byte fallback gives) plus BOS, fits the window with its longest choice, or
    with the 24 generated tokens; sizes that cannot fit the default, --seq-length or --model's window
    are refused by option, nothing written."""
    from megatron_osp.testing.tokenizers import byte_level_bpe

    corpus = tmp_path / "corpus.jsonl"
    texts = write_corpus(corpus, 80, seed=2)  # with 'série', 'naïve': characters of two bytes
    done = _run(corpus, tmp_path / "tasks", "--held-out", "0.5", "--questions", "40")
    assert done.returncode == 0, done.stderr
    tok = byte_level_bpe(texts, vocab_size=257)  # no merges: one token per byte
    n = lambda s: len(tok.encode(s).ids) + 1  # noqa: E731  (+ BOS)
    cloze = [json.loads(line) for line in open(tmp_path / "tasks" / "local_cloze.jsonl", encoding="utf-8")]
    complete = [json.loads(line) for line in open(tmp_path / "tasks" / "local_complete.jsonl", encoding="utf-8")]
    assert len(cloze) == 40 and complete
    assert max(n(r["context"] + c) for r in cloze for c in r["choices"]) <= 128
    assert max(n(r["context"]) for r in complete) + 24 <= 128

    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    out = tmp_path / "refused"
    for args, expected in (
        (("--context", "120"), "--context 120 + --span 16 (+ 2 for BOS and the first piece) does not fit the "
                               "quickstart model's 128-token window"),
        (("--seq-length", "120"), "--context 96 + 24 generated tokens (+ 2 for BOS and the first piece) does not "
                                  "fit --seq-length 120"),
        (("--model", model), f"does not fit the 64-token window of --model {model}"),
        (("--model", tmp_path / "nowhere"), f"--model {tmp_path / 'nowhere'} does not exist"),
    ):
        done = _run(corpus, out, *args)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not out.exists()
    assert _run(corpus, out, "--model", model, "--context", "30", "--span", "8", "--held-out", "0.5").returncode == 0


def test_tasks_of_other_questions_are_not_replaced_without_overwrite(tmp_path):
    """Rerunning the generator with another seed, size or corpus replaced the task files an earlier
    downstream report was scored on, without a word. Now refused naming the files, which stay as they
    were; the same command again is a no-op that succeeds, and --overwrite replaces them."""
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 60, seed=0)
    out = tmp_path / "tasks"
    common = (corpus, out, "--held-out", "0.3", "--questions", "12")
    assert _run(*common).returncode == 0
    before = {f.name: f.read_text() for f in out.iterdir()}
    assert _run(*common).returncode == 0 and {f.name: f.read_text() for f in out.iterdir()} == before
    done = _run(*common, "--seed", "1")
    assert done.returncode != 0 and f"error: {out / 'local_cloze.jsonl'}" in done.stderr, done.stderr
    assert "--overwrite replaces them" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert {f.name: f.read_text() for f in out.iterdir()} == before
    assert _run(*common, "--seed", "1", "--overwrite").returncode == 0
    assert (out / "local_cloze.jsonl").read_text() != before["local_cloze.jsonl"]
