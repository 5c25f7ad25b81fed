"""Local multiple-choice task documents that lm-evaluation-harness scores wrongly without a word, or stops
on only after the model has loaded (analysis/task_checks.py through downstream.check_tasks): two equal
choices, an empty choice, a question that is a number alone. No model is involved."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from test_downstream import MC_YAML  # noqa: E402


def _refusals(tmp_path, docs_by_task: dict) -> list[str]:
    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir(parents=True)
    for name, rows in docs_by_task.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(MC_YAML.replace("toy_mc", name).format(data=tasks / f"{name}.jsonl"))
    try:
        check_tasks(parse_tasks(",".join(docs_by_task)), str(tasks))
    except ValueError as e:
        return [line.strip() for line in str(e).splitlines()[1:]]
    return []


def test_equal_empty_choices_and_number_questions_are_refused_by_document(tmp_path):
    """Equal choices: the harness picks one of them (the first for exact ties), so an answer on the other
    was counted wrong, silently. An empty choice stopped the run after the model loaded (assert
    len(continuation_enc) > 0), and so did a question that is a number alone ("2": the harness reads it
    as a choice index, then 'Context is not a string'). Now each is refused naming file and document;
    a well-formed task, a string answer and a question holding digits among words pass."""
    good = [{"question": f"q{i}", "choices": ["a", "b", "c"], "label": i % 3} for i in range(4)]
    docs = {
        "fine": good + [{"question": "1998 was", "choices": ["a", "b"], "label": "b"}],
        "dup": good[:2] + [{"question": "q", "choices": ["a", "b", "a"], "label": 2}],
        "empty": good[:2] + [{"question": "q", "choices": ["a", " "], "label": 0}],
        "number": good[:2] + [{"question": "2", "choices": ["a", "b", "c"], "label": 0}],
    }
    lines = _refusals(tmp_path, docs)
    tasks = tmp_path / "tasks"
    assert lines == [
        f"task dup: {tasks / 'dup.jsonl'}: document 3: choices 0 and 2 are both 'a': equal choices score the "
        "same, so which one the harness picks is arbitrary (the first, for exact ties) and an answer on the "
        "other is counted wrong",
        f"task empty: {tasks / 'empty.jsonl'}: document 3: choice 1 is ' ': an empty choice has no tokens to "
        "score (the harness stops on it, or scores only the delimiter)",
        f"task number: {tasks / 'number.jsonl'}: document 3: its text is the number 2 alone, which the harness "
        "reads as a choice index (a multiple-input task's) and stops on ('Context is not a string'): give it "
        "other text",
    ], lines
    assert _refusals(tmp_path / "ok", {"fine": docs["fine"]}) == []


def test_an_unreadable_local_file_names_the_readers_error(tmp_path):
    """A JSON lines file with a lone surrogate ("\\ud800") was refused only with datasets' "An error
    occurred while generating the dataset"; the reader's error under it, naming the row, is now given."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    good = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(2)]
    lines = [json.dumps(r) for r in good] + ['{"question": "q \\ud800", "choices": ["a", "b"], "label": 0}']
    (tasks / "uni.jsonl").write_text("\n".join(lines) + "\n")
    (tasks / "uni.yaml").write_text(MC_YAML.replace("toy_mc", "uni").format(data=tasks / "uni.jsonl"))
    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    with pytest.raises(ValueError) as e:
        check_tasks(parse_tasks("uni"), str(tasks))
    assert "task uni: its local data files cannot be read (DatasetGenerationError" in str(e.value), e.value
    assert "caused by ArrowInvalid: JSON parse error: The surrogate pair in string is invalid. in row 2" in \
        str(e.value) and "(rows count from 0)" in str(e.value), e.value


def test_a_question_with_one_choice_is_refused_by_document(tmp_path):
    """A question with a single choice was accepted: the harness scores it right whatever the model does
    (the one choice is always the most likely), inflating the accuracy. Refused naming file and document."""
    good = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(3)]
    lines = _refusals(tmp_path, {"single": good + [{"question": "q", "choices": ["a"], "label": 0}]})
    assert lines == [f"task single: {tmp_path / 'tasks' / 'single.jsonl'}: document 4: has one answer choice "
                     "(['a']): it is scored right whatever the model does"], lines


def test_a_document_after_a_blank_line_is_named_by_its_line_too(tmp_path):
    """The JSON lines reader skips blank lines, so after one a document's number is not its line: the
    refusal named 'document 3' for the record on line 5. The line is now given where the two differ."""
    good = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(2)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    bad = {"question": "q", "choices": ["a", "b"], "label": 7}
    (tasks / "gap.jsonl").write_text(json.dumps(good[0]) + "\n\n" + json.dumps(good[1]) + "\r\n\n"
                                     + json.dumps(bad) + "\n")
    (tasks / "gap.yaml").write_text(MC_YAML.replace("toy_mc", "gap").format(data=tasks / "gap.jsonl"))
    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    with pytest.raises(ValueError) as e:
        check_tasks(parse_tasks("gap"), str(tasks))
    assert f"task gap: {tasks / 'gap.jsonl'}: document 3 (line 5): answer index 7 is outside its 2 choices" \
        in str(e.value), e.value


def test_few_shot_examples_drawn_from_the_evaluated_documents_are_refused(tmp_path):
    """A local task with only a test split and no fewshot_split takes its few-shot examples from the
    evaluated documents, and the harness leaves the asked document out only when fewshot_split names
    the test split: 2-shot, a question could be shown with its own answer just before it (3 of 5
    here, measured), silently raising the accuracy. Refused naming the task and the YAML line to add;
    with 'fewshot_split: test' it passes."""
    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(5)]
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, extra in (("leak", ""), ("apart", "fewshot_split: test\n")):
        (tasks / f"{name}.yaml").write_text(MC_YAML.replace("toy_mc", name).format(data=tasks / "data.jsonl") + extra)
    with pytest.raises(ValueError) as e:
        check_tasks(parse_tasks("leak:2,apart:2"), str(tasks))
    lines = [line.strip() for line in str(e.value).splitlines()[1:]]
    assert lines == ["task leak: its 2-shot examples are drawn from the evaluated documents (split 'test') without "
                     "leaving the asked one out, so a question can be shown with its own answer: add 'fewshot_split: "
                     "test' to its YAML (the harness then leaves it out) or give it a training split"], lines
    check_tasks(parse_tasks("leak:0,apart:2"), str(tasks))


def test_a_fractional_label_is_named_as_such(tmp_path):
    """One label written as 1.0 in a JSON lines file makes the reader read every label of the file as a
    float, and the template renders them as '0.0', '1.0': each document was refused as "answer '0.0' is
    not one of its choices", naming documents whose line says 0. The refusal now says why."""
    good = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(2)]
    lines = _refusals(tmp_path, {"frac": good + [{"question": "q", "choices": ["a", "b"], "label": 1.0}]})
    data = tmp_path / "tasks" / "frac.jsonl"
    why = ("is a number with a fraction, not a choice index: one answer written as 1.0 or 1.5 in a JSON lines "
           "file makes the reader read that field of every document as a float")
    assert lines == [f"task frac: {data}: document 1: answer '0.0' {why}",
                     f"task frac: {data}: document 2: answer '1.0' {why}",
                     f"task frac: {data}: document 3: answer '1.0' {why}"], lines
