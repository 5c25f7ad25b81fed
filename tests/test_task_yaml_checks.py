"""Local task YAMLs the harness cannot build, refused by file and key before any model loads
(analysis/task_checks.yaml_problems through downstream.check_tasks). No model is involved."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from test_downstream import MC_YAML  # noqa: E402


def test_unknown_keys_bad_shots_and_unknown_metrics_are_named_with_their_yaml(tmp_path):
    """An unknown key was reported as 'its local data files cannot be read (TypeError: TaskConfig.__init__()
    got an unexpected keyword argument ...)', num_fewshot: five as "'>' not supported between instances
    of 'str' and 'int'", an unknown metric as 'KeyError: None': none named the YAML file, two not the
    field. Now each names the task, its YAML file and the key; a well-formed YAML passes."""
    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(3)]
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yamls = {
        "typo": MC_YAML.replace("metric_list:", "metrc_list:\n  - metric: acc\nmetric_list:"),
        "shots": MC_YAML + "num_fewshot: five\n",
        "metric": MC_YAML.replace("metric: acc_norm", "metric: accc"),
        "fine": MC_YAML + "num_fewshot: 0\nmetadata:\n  version: 1\n",
    }
    for name, text in yamls.items():
        (tasks / f"{name}.yaml").write_text(text.replace("toy_mc", name).format(data=tasks / "data.jsonl"))
    with pytest.raises(ValueError) as e:
        check_tasks(parse_tasks("typo,shots,metric,fine"), str(tasks))
    lines = [line.strip() for line in str(e.value).splitlines()]
    assert lines[0] == "task YAMLs the harness cannot build:", lines
    assert lines[1:] == [
        f"task typo: {tasks / 'typo.yaml'}: unknown key 'metrc_list' (not a field of the harness's task config)",
        f"task shots: {tasks / 'shots.yaml'}: num_fewshot is 'five', not a whole number >= 0",
        f"task metric: {tasks / 'metric.yaml'}: metric 'accc' is not a metric of lm-evaluation-harness (" + lines[3].split(" (", 1)[-1],
    ], lines
    assert "acc_norm" in lines[3] and "exact_match" in lines[3]
    check_tasks(parse_tasks("fine"), str(tasks))


def test_a_task_declared_by_two_yamls_is_refused_naming_both(tmp_path):
    """Tasks regenerated into a subdirectory of --include-path (or a copy kept beside the YAML) declare
    the same task name twice: the harness scored the first in path order and skipped the other with a
    log line, whichever data that was. Refused naming both files; the other tasks there are not."""
    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    tasks = tmp_path / "tasks"
    (tasks / "v1").mkdir(parents=True)
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(3)]
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path, name in ((tasks / "same.yaml", "same"), (tasks / "v1" / "same.yaml", "'same'  # older"),
                       (tasks / "other.yaml", "other")):
        path.write_text(MC_YAML.replace("toy_mc", name).format(data=tasks / "data.jsonl"))
    with pytest.raises(ValueError) as e:
        check_tasks(parse_tasks("same,other"), str(tasks))
    lines = [line.strip() for line in str(e.value).splitlines()[1:]]
    assert lines == [f"task same: declared by 2 YAMLs under --include-path ({tasks / 'same.yaml'}, "
                     f"{tasks / 'v1' / 'same.yaml'}): the harness evaluates the first and skips the others without "
                     "a word; remove or rename the ones not meant"], lines
    check_tasks(parse_tasks("other"), str(tasks))


def test_a_task_whose_yaml_does_not_parse_is_not_just_unknown(tmp_path):
    """The harness skips a YAML it cannot parse without a word, so '--tasks broken' was refused as 'not a
    task of lm-evaluation-harness nor of --include-path': the file and its YAML error are now named."""
    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: json\ndoc_to_text: \"{{question}}\n")
    (tasks / "fine.yaml").write_text("task: fine\nprocess_docs: !function utils.process\n")  # not requested
    with pytest.raises(ValueError) as e:
        check_tasks(parse_tasks("broken"), str(tasks))
    lines = str(e.value).splitlines()
    assert lines[0].startswith("--tasks: broken: not a task of lm-evaluation-harness nor of --include-path"), lines
    assert len(lines) == 2 and lines[1].startswith(f"  the harness skipped {tasks / 'broken.yaml'}:4: not valid "
                                                   "YAML (while scanning a quoted scalar on line 3: found unexpected "
                                                   "end of stream)"), lines
