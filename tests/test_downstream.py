"""Downstream benchmarks under quantization (tools/evaluate_downstream.py, analysis/downstream.py).

A tiny Megatron checkpoint with a trained SentencePiece tokenizer, its HF export, and two local
lm-evaluation-harness tasks written here in the harness's YAML + JSONL format (a multiple-choice one
and a generative one): no download. Skipped without the ``[eval]`` extra.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from hf_run_fixtures import REPO, run_tool, tool, write_corpus  # noqa: E402
from test_evaluation_partial import failing_load  # noqa: E402

WORDS = ["the", "game", "season", "of", "and", "was", "in", "to", "a", "valkyria"]
MC_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(directory: Path, missing: bool = False) -> Path:
    """toy_mc (16 questions, 4 choices) and toy_gen (6 prompts); ``missing``: a task whose file is absent."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    mc = []
    for _ in range(16):
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(4)]
        mc.append({"question": " ".join(rng.choice(WORDS) for _ in range(6)), "choices": choices,
                   "label": rng.randrange(4)})
    gen = [{"question": " ".join(rng.choice(WORDS) for _ in range(5)), "answer": rng.choice(WORDS)} for _ in range(6)]
    for name, rows in (("toy_mc", mc), ("toy_gen", gen)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "toy_mc.yaml").write_text(MC_YAML.format(data=directory / "toy_mc.jsonl"))
    (directory / "toy_gen.yaml").write_text(GEN_YAML.format(data=directory / "toy_gen.jsonl"))
    if missing:  # a local file that is absent, and a hub dataset that no cache holds
        (directory / "toy_missing.yaml").write_text(
            MC_YAML.replace("toy_mc", "toy_missing").format(data=directory / "nowhere.jsonl"))
        local = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: -\n"
        hub = MC_YAML.format(data="-").replace("task: toy_mc", "task: toy_hub")
        assert local in hub
        (directory / "toy_hub.yaml").write_text(hub.replace(local, "dataset_path: osp-test/never-downloaded\n"))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A Megatron checkpoint (test preset with a window of 64, OSP defaults, vocab 320, the run's tokenizer
    recorded) and its HF export. Init std 0.3 so the untrained model's choices are far from ties."""
    import torch

    from megatron_osp import parallel
    from megatron_osp.convert.hf_export import export_checkpoint
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    root = tmp_path_factory.mktemp("downstream")
    write_corpus(root / "corpus.jsonl", 80, seed=0)
    run_tool([tool("train_tokenizer"), "--input", str(root / "corpus.jsonl"), "--output-prefix",
              str(root / "tokenizer"), "--vocab-size", "320"])
    parallel.init_distributed(1, 1)
    try:
        # a window of 64: every toy task's document fits (the test preset's 32 did not: the harness cut them)
        cfg = get_preset("test", vocab_size=320, init_method_std=0.3, seq_length=64)
        torch.manual_seed(0)
        model = build_gpt_model(cfg, transformer_config(cfg), seed=11).eval()
        config = RunConfig(model=cfg)
        config.data.tokenizer_model = str(root / "tokenizer.model")
        save_checkpoint(root / "run" / "checkpoints", 1, [model], config, save_rng=False)
        export_checkpoint(root / "run" / "checkpoints", root / "hf", log=lambda *_: None)
    finally:
        parallel.shutdown()
    from megatron_osp.data.indexed import IndexedDatasetWriter

    gen = torch.Generator().manual_seed(0)
    with IndexedDatasetWriter(root / "calib") as writer:
        for _ in range(8):
            writer.add_document(torch.randint(0, 320, (80,), generator=gen).numpy())
    return {"root": root, "run": root / "run", "hf": root / "hf", "tasks": write_tasks(root / "tasks"),
            "calib": root / "calib"}


def _without_env_report(monkeypatch):
    """The harness's environment report (torch.utils.collect_env: pip, conda, nvidia-smi... in a dozen
    subprocesses, ~0.8 s per task evaluation) left out of its results: no report or check here reads it."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


def _tool(args, monkeypatch):
    """tools/evaluate_downstream.py's main(args), in this process (its imports are done here already;
    a subprocess would import torch, Megatron and the harness again); asserts exit code 0."""
    from megatron_osp import parallel

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    _without_env_report(monkeypatch)
    try:
        assert evaluate_downstream.main([str(a) for a in args]) == 0
    finally:
        parallel.shutdown()  # the Megatron checkpoint's export started a world of one


def test_tool_megatron_and_export_agree_and_match_the_harness_cli(models, monkeypatch):
    """(c) a Megatron checkpoint and its HF export give the same numbers in every setting (the tool's
    main, in process); (a) the HF export's fp numbers equal lm-evaluation-harness's own CLI (a
    subprocess) on the same directory, to the last digit."""
    out = models["root"] / "out"
    _tool([str(models["run"]), str(models["hf"]), "--labels", "megatron,hf", "--settings", "fp,4-4-4,4-4-4+gptq",
           "--tasks", "toy_mc,toy_gen", "--include-path", str(models["tasks"]), "--device", "cpu",
           "--calibration-data", str(models["calib"]), "--calibration-windows", "4",
           "--batch-size", "4", "--output-dir", str(out)], monkeypatch)
    report = json.loads((out / "downstream.json").read_text())
    meg, hf = report["models"]
    assert (meg["label"], meg["kind"], hf["label"], hf["kind"]) == ("megatron", "megatron", "hf", "hf")
    assert list(hf["settings"]) == ["fp", "4-4-4", "4-4-4+gptq"]
    for setting in ("fp", "4-4-4", "4-4-4+gptq"):
        for task in ("toy_mc", "toy_gen"):
            assert meg["settings"][setting]["tasks"][task]["metrics"] == hf["settings"][setting]["tasks"][task]["metrics"]
    mc = hf["settings"]["fp"]["tasks"]["toy_mc"]
    assert set(mc["metrics"]) == {"acc", "acc_norm"} and mc["score_metric"] == "acc_norm" and mc["n"] == 16
    assert set(hf["settings"]["fp"]["tasks"]["toy_gen"]["metrics"]) == {"exact_match"}
    assert "drop" in hf["settings"]["4-4-4"]["tasks"]["toy_mc"] and "average_drop" in hf["settings"]["4-4-4"]
    md = (out / "downstream.md").read_text()
    assert "| task (metric) | megatron fp | megatron 4-4-4 | megatron 4-4-4+gptq | hf fp |" in md and "Drop from fp" in md
    assert (out / "downstream_average.png").read_bytes()[:4] == b"\x89PNG"

    cli_out = models["root"] / "cli"
    # a plain shell's environment (the in-process Megatron world of the fixture set torchrun's variables)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={models['hf']}", "--tasks", "toy_mc,toy_gen", "--include_path",
                           str(models["tasks"]), "--device", "cpu", "--batch_size", "4", "--output_path",
                           str(cli_out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(next(cli_out.rglob("results_*.json")).read_text())["results"]
    for task in ("toy_mc", "toy_gen"):
        ours = hf["settings"]["fp"]["tasks"][task]["metrics"]
        for metric, v in ours.items():
            assert v["value"] == cli[task][f"{metric},none"], (task, metric)
            assert v["stderr"] == cli[task][f"{metric}_stderr,none"], (task, metric)


def test_quantization_moves_an_outlier_models_loglikelihoods_much_more(models, monkeypatch):
    """(b) The same model with a planted outlier channel in every linear's input (the norm gain of channel
    7 times 50, the reading linears' column 7 divided by 50: the full-precision function is unchanged):
    under 8-8-8 its choices' log-likelihoods move far more than the unmodified model's do."""
    import torch

    from megatron_osp.analysis.downstream import check_tasks, evaluate_downstream, load_eval_model, parse_tasks

    _without_env_report(monkeypatch)
    specs = parse_tasks("toy_mc")
    tm = check_tasks(specs, str(models["tasks"]))
    change, fp_lls = {}, {}
    for planted in (False, True):
        em = load_eval_model(str(models["hf"]))
        if planted:
            with torch.no_grad():
                for layer in em.model.model.layers:
                    for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                                    layer.self_attn.v_proj)),
                                          (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                        norm.weight[7] *= 50.0
                        for lin in readers:
                            lin.weight[:, 7] /= 50.0
        res = evaluate_downstream(em, ["fp", "8-8-8"], specs, tm, batch_size=8, keep_loglikelihoods=True)
        fp = torch.tensor(res["settings"]["fp"]["tasks"]["toy_mc"]["loglikelihoods"])
        q = torch.tensor(res["settings"]["8-8-8"]["tasks"]["toy_mc"]["loglikelihoods"])
        assert fp.numel() == q.numel() == 16 * 4
        change[planted], fp_lls[planted] = float((q - fp).abs().mean()), fp
    torch.testing.assert_close(fp_lls[True], fp_lls[False], rtol=1e-4, atol=1e-4)  # same fp model
    assert change[True] > 3 * change[False], change


def test_missing_dataset_is_refused_by_name_before_any_model_loads(models, tmp_path, monkeypatch, capsys):
    """(d) A local task whose file is absent and a hub task not in the datasets cache: one error naming
    both and how to download, and no model is loaded."""
    import megatron_osp.analysis.downstream as downstream

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    tasks = write_tasks(tmp_path / "tasks", missing=True)
    calls = []
    monkeypatch.setattr(downstream, "load_eval_model", lambda *a, **k: calls.append(a))
    rc = evaluate_downstream.main([str(models["hf"]), "--tasks", "toy_mc,toy_missing,toy_hub", "--settings", "fp",
                                   "--include-path", str(tasks), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and calls == []
    assert "task toy_missing" in err and "nowhere.jsonl" in err, err
    assert "task toy_hub" in err and "osp-test/never-downloaded" in err, err
    assert "TaskManager().load(['toy_hub'])" in err, err
    assert "task toy_mc" not in err, err
    assert not (tmp_path / "out").exists()
    rc = evaluate_downstream.main([str(models["hf"]), "--tasks", "no_such_task", "--settings", "fp",
                                   "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "no_such_task: not a task" in capsys.readouterr().err


def test_local_tasks_example_writes_tasks_the_harness_loads(tmp_path):
    """examples/downstream_local_tasks.py (the quickstart's local benchmark): each cloze question's
    labelled choice is the passage's true continuation, and both tasks load offline."""
    import importlib.util

    from megatron_osp.analysis.downstream import check_tasks, parse_tasks

    write_corpus(tmp_path / "corpus.jsonl", 120, seed=1)
    docs = [json.loads(line)["text"] for line in open(tmp_path / "corpus.jsonl", encoding="utf-8")]
    spec = importlib.util.spec_from_file_location("local_tasks", REPO / "examples" / "downstream_local_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path / "corpus.jsonl"), str(tmp_path / "tasks"), "--held-out", "0.2",
                     "--questions", "20", "--context", "40", "--span", "8"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "tasks" / "local_cloze.jsonl", encoding="utf-8")]
    assert len(rows) == 20
    held = docs[int(len(docs) * 0.8):]
    for r in rows:
        assert len(r["choices"]) == 4 and any(r["context"] + r["choices"][r["label"]] in d for d in held)
    check_tasks(parse_tasks("local_cloze,local_complete"), str(tmp_path / "tasks"))


def test_malformed_local_tasks_are_refused_by_document_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """Local task files the harness would have scored wrongly without a word (an answer index past the
    choices, an answer that is not a choice, a record without its label or answer field: all counted
    as wrong answers) or stopped on only after the model had loaded (a document with no choices: "not
    enough values to unpack"; more shots than examples: "Sample larger than population"). One error
    names each task, file, document and field; no model loads, nothing is written. Well-formed tasks
    (a null field that the template only tests, 4 shots from 5 examples) pass."""
    import megatron_osp.analysis.downstream as downstream

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    good = [{"question": f"q{i}", "choices": ["a", "b", "c"], "label": i % 3} for i in range(5)]
    bad = {"bad_range": [{"question": "q", "choices": ["a", "b"], "label": 5}],
           "bad_string": [{"question": "q", "choices": ["a", "b"], "label": "c"}],
           "bad_empty": [{"question": "q", "choices": [], "label": 0}],
           "bad_nolabel": [{"question": "q", "choices": ["a", "b"]}]}
    for name, rows in {"fine": good, "few": good[:3], **{k: good[:2] + v for k, v in bad.items()}}.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(MC_YAML.replace("toy_mc", name).format(data=tasks / f"{name}.jsonl"))
    with open(tasks / "fine.yaml", "a") as f:  # its 4-shot examples leave the asked document out
        f.write("fewshot_split: test\n")
    gen = GEN_YAML.replace("toy_gen", "gen").replace('"{{{{question}}}}"', '"{{{{question}}}}{{% if hint %}} {{{{hint}}}}{{% endif %}}"')
    (tasks / "gen.yaml").write_text(gen.format(data=tasks / "gen.jsonl"))
    (tasks / "gen.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "hint": None}) + "\n"
                                     + json.dumps({"question": "q", "hint": "h"}) + "\n")
    model = tmp_path / "hf"  # never loaded
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    from safetensors.torch import save_file  # whole weights: a directory without them is refused first
    import torch

    save_file({"x": torch.zeros(1)}, str(model / "model.safetensors"))
    calls = []
    monkeypatch.setattr(downstream, "load_eval_model", lambda *a, **k: calls.append(a))
    rc = evaluate_downstream.main([str(model), "--tasks", "fine:4,bad_range,bad_string,bad_empty,bad_nolabel,gen,"
                                   "few:5", "--settings", "fp", "--include-path", str(tasks),
                                   "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and calls == [] and not (tmp_path / "out").exists(), err
    lines = [line.strip() for line in err.splitlines()]
    expected = [
        f"task bad_range: {tasks / 'bad_range.jsonl'}: document 3: answer index 5 is outside its 2 choices (0..1)",
        f"task bad_string: {tasks / 'bad_string.jsonl'}: document 3: answer 'c' is not one of its choices ['a', 'b']",
        f"task bad_empty: {tasks / 'bad_empty.jsonl'}: document 3: has no answer choices (doc_to_choice gives [])",
        f"task bad_nolabel: {tasks / 'bad_nolabel.jsonl'}: document 3: field 'label' is missing or null",
        f"task gen: {tasks / 'gen.jsonl'}: document 2: field 'answer' is missing or null",
        "task few: 5-shot needs 5 few-shot examples, but its few-shot pool has 3",
    ]
    for line in expected:
        assert line in lines, err
    assert not any(line.startswith("task fine") for line in lines) and "document 1" not in err, err


def test_damaged_checkpoint_is_named_in_one_line(models, tmp_path, monkeypatch, capsys):
    """A Megatron checkpoint with a missing shard used to end evaluate_downstream.py in a CheckpointError
    traceback (from its export); now exit 2 with the line naming the file. (Task checks are not the
    subject here: skipped.)"""
    import shutil

    import megatron_osp.analysis.downstream as downstream
    from megatron_osp import parallel

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    shard = sorted(run.glob("checkpoints/iter_*/*.distcp"))[0]
    shard.unlink()
    monkeypatch.setattr(downstream, "check_tasks", lambda *a, **k: None)
    try:
        rc = evaluate_downstream.main([str(run), "--tasks", "toy_mc", "--settings", "fp", "--device", "cpu",
                                       "--output-dir", str(tmp_path / "out")])
    finally:
        parallel.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: checkpoint") and f"missing shard file {shard}" in err[-1], err
    assert not (tmp_path / "out").exists()


def test_hf_model_with_a_larger_tokenizer_is_refused_before_loading(models, tmp_path, monkeypatch, capsys):
    """An HF directory whose tokenizer has more tokens than config.json's vocab_size (another model's
    tokenizer) used to reach the harness, which stops with an IndexError from the embedding as soon as
    a prompt holds such an id; now refused by file before any task or model loads."""
    import shutil

    import megatron_osp.analysis.downstream as downstream

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    hf = tmp_path / "hf"
    shutil.copytree(models["hf"], hf)
    config = json.loads((hf / "config.json").read_text())
    config["vocab_size"] = 300  # the tokenizer has 320
    (hf / "config.json").write_text(json.dumps(config))
    calls = []
    monkeypatch.setattr(downstream, "check_tasks", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(downstream, "load_eval_model", lambda *a, **k: calls.append(a))
    rc = evaluate_downstream.main([str(hf), "--tasks", "toy_mc", "--settings", "fp", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and calls == [] and f"{hf / 'tokenizer.json'} has 320 tokens, more than the vocab_size 300" in err, err


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _fake_harness(monkeypatch):
    """evaluate_downstream.py's module, with a task whose score is a function of the (quantized) weights
    the harness model holds: the harness is not the subject (its TaskManager alone takes seconds)."""
    import megatron_osp.analysis.downstream as downstream

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    def fake_task(lm, spec, tm, limit=None, keep_loglikelihoods=False):
        total = sum(float(p.double().abs().sum()) for p in lm.model.parameters())
        score = (total * 1000) % 1
        return {"metrics": {"acc": {"value": score, "stderr": 0.01}}, "score_metric": "acc", "score": score,
                "stderr": 0.01, "num_fewshot": spec.num_fewshot, "n": limit, "seconds": 0.0}

    monkeypatch.setattr(downstream, "check_tasks", lambda *a, **k: None)
    monkeypatch.setattr(downstream, "evaluate_task", fake_task)
    return evaluate_downstream


def test_a_failing_model_leaves_the_earlier_ones_in_a_partial_report(models, tmp_path, monkeypatch, capsys):
    """The report used to be written only at the end: a model that failed to load (here: simulated, as
    a damaged weights file is refused before any model loads) lost every earlier model's scores. Now downstream.json/.md are rewritten after every
    (model, setting), marked partial, and the failure still stops the run with its error. The harness
    is not the subject (its TaskManager alone takes seconds): a task's score here is a function of the
    quantized weights the harness model holds."""
    import shutil

    evaluate_downstream = _fake_harness(monkeypatch)
    bad = tmp_path / "bad"
    shutil.copytree(models["hf"], bad)
    failing_load(monkeypatch, str(bad))
    good = str(models["hf"])
    common = ["--labels", "good,bad", "--tasks", "toy_mc,toy_gen", "--settings", "fp,4-4-4", "--limit", "4",
              "--device", "cpu", "--no-plots"]
    rc = evaluate_downstream.main([good, str(bad), *common, "--output-dir", str(tmp_path / "partial")])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {bad}: cannot be loaded" in err, err
    partial = json.loads((tmp_path / "partial" / "downstream.json").read_text())
    assert partial["complete"] is False and partial["progress"] == [
        {"model": good, "done": ["fp", "4-4-4"], "pending": []},
        {"model": str(bad), "done": [], "pending": ["fp", "4-4-4"]}]
    md = (tmp_path / "partial" / "downstream.md").read_text()
    assert "**Partial report**" in md and f"Not done: {bad} (fp, 4-4-4)" in md and "good 4-4-4" in md, md

    common[1] = "good"
    assert evaluate_downstream.main([good, *common, "--output-dir", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "downstream.json").read_text())
    assert full["complete"] is True and "Complete:" in (tmp_path / "full" / "downstream.md").read_text()
    scores = [s["tasks"]["toy_mc"]["score"] for s in full["models"][0]["settings"].values()]
    assert scores[0] != scores[1]  # the fake score sees the quantized weights
    assert _without_seconds(partial["models"]) == _without_seconds(full["models"])
    assert partial["meta"] == full["meta"]
    # more GPTQ calibration windows than --calibration-documents hold: refused before any model loads
    capsys.readouterr()
    rc = evaluate_downstream.main([good, *common[:4], "--settings", "fp,4-4-4+gptq", "--seq-length", "15",
                                   "--calibration-data", str(models["calib"]), "--calibration-windows", "41",
                                   "--output-dir", str(tmp_path / "gptq")])
    out, err = capsys.readouterr()
    assert rc == 2 and "== " not in out + err, out + err
    assert f"--calibration-windows 41: documents 0..7 of {models['calib']} hold only 40 windows of 16" in err, err


def test_an_earlier_report_is_kept_and_resumed(models, tmp_path, monkeypatch, capsys):
    """A second run into the same --output-dir used to replace the earlier report as soon as it finished
    its first setting. Now it is refused unless --overwrite; --resume keeps what the report holds and
    evaluates only the rest, here after a failing model was replaced, and gives the report a complete
    run writes; a model whose kept results were made from other files, or another lm-evaluation-harness
    version, is refused."""
    import shutil

    evaluate_downstream = _fake_harness(monkeypatch)
    good, bad, out = models["hf"], tmp_path / "bad", tmp_path / "out"
    shutil.copytree(good, bad)
    weights = bad / "model.safetensors"
    intact = weights.read_bytes()
    failing = failing_load(monkeypatch, str(bad))
    common = [str(good), str(bad), "--labels", "good,bad", "--tasks", "toy_mc,toy_gen", "--settings", "fp,4-4-4",
              "--limit", "4", "--device", "cpu", "--no-plots"]
    assert evaluate_downstream.main([*common, "--output-dir", str(out)]) == 2
    partial = (out / "downstream.json").read_text()
    capsys.readouterr()

    assert evaluate_downstream.main([*common, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'downstream.json'} already holds a partial report (2 of 4 units done)" in err, err
    assert "--resume" in err and (out / "downstream.json").read_text() == partial
    other = [("fp,8-8-8" if a == "fp,4-4-4" else a) for a in common]
    assert evaluate_downstream.main([*other, "--output-dir", str(out), "--resume"]) == 2
    assert "was made with options.settings = [\"fp\", \"4-4-4\"], this run asks for [\"fp\", \"8-8-8\"]" in capsys.readouterr().err

    failing.clear()  # the failing model is replaced: nothing of it was kept, so it may change
    weights.write_bytes(intact)
    import lm_eval

    with monkeypatch.context() as m:  # another harness installed since: its scores are not mixed in
        m.setattr(lm_eval, "__version__", "0.0.1", raising=False)
        assert evaluate_downstream.main([*common, "--output-dir", str(out), "--resume"]) == 2
        assert ('was made with versions.lm_eval = "' + str(json.loads(partial)["request"]["versions"]["lm_eval"])
                + '", this run has "0.0.1"') in capsys.readouterr().err
    assert (out / "downstream.json").read_text() == partial
    assert evaluate_downstream.main([*common, "--output-dir", str(out), "--resume"]) == 0
    assert f"== {good}: done in the earlier run" in capsys.readouterr().out
    resumed = json.loads((out / "downstream.json").read_text())
    assert resumed["complete"] is True
    assert resumed["models"][0] == json.loads(partial)["models"][0]  # kept as it was, seconds included
    assert evaluate_downstream.main([*common, "--output-dir", str(tmp_path / "fresh")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "downstream.json").read_text())
    assert _without_seconds(resumed["models"]) == _without_seconds(fresh["models"])

    weights.write_bytes(intact)  # rewritten after its results were kept: resuming would mix two models
    assert evaluate_downstream.main([*common, "--output-dir", str(out), "--resume"]) == 2
    assert f"model 2 ({bad}) has changed since the report's results for it were made" in capsys.readouterr().err
    assert evaluate_downstream.main([*common, "--output-dir", str(out), "--overwrite"]) == 0


def test_resume_keeps_the_tasks_of_a_setting_cut_short(models, tmp_path, monkeypatch, capsys):
    """The report is written after every task, so a run stopped in the middle of a setting (here: the
    second task of 4-4-4 raises) keeps the tasks done before; --resume evaluates only the rest (the
    calls are counted) and writes what a complete run writes."""
    import megatron_osp.analysis.downstream as downstream

    evaluate_downstream = _fake_harness(monkeypatch)
    score_of = downstream.evaluate_task
    calls = []

    def counted(lm, spec, tm, limit=None, keep_loglikelihoods=False):
        calls.append(spec.name)
        if kill_at is not None and len(calls) == kill_at:
            raise RuntimeError("the job's time limit")
        return score_of(lm, spec, tm, limit=limit, keep_loglikelihoods=keep_loglikelihoods)

    monkeypatch.setattr(downstream, "evaluate_task", counted)
    out = tmp_path / "out"
    common = [str(models["hf"]), "--tasks", "toy_mc,toy_gen", "--settings", "fp,4-4-4", "--limit", "4",
              "--device", "cpu", "--no-plots"]
    kill_at = 4  # fp: toy_mc, toy_gen; 4-4-4: toy_mc, then killed in toy_gen
    with pytest.raises(RuntimeError, match="time limit"):
        evaluate_downstream.main([*common, "--output-dir", str(out)])
    cut = json.loads((out / "downstream.json").read_text())
    assert cut["complete"] is False and cut["progress"][0]["done"] == ["fp"]
    assert cut["models"][0]["settings"]["4-4-4"]["partial"] is True
    assert list(cut["models"][0]["settings"]["4-4-4"]["tasks"]) == ["toy_mc"]
    assert "–" in (out / "downstream.md").read_text()

    calls.clear()
    kill_at = None
    assert evaluate_downstream.main([*common, "--output-dir", str(out), "--resume"]) == 0
    assert calls == ["toy_gen"]  # only what the report lacked
    resumed = json.loads((out / "downstream.json").read_text())
    assert resumed["complete"] is True and "partial" not in resumed["models"][0]["settings"]["4-4-4"]
    assert resumed["models"][0]["settings"]["4-4-4"]["tasks"]["toy_mc"] == \
        cut["models"][0]["settings"]["4-4-4"]["tasks"]["toy_mc"]
    assert evaluate_downstream.main([*common, "--output-dir", str(tmp_path / "fresh")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "downstream.json").read_text())
    assert _without_seconds(resumed["models"]) == _without_seconds(fresh["models"])
    assert list(resumed["models"][0]["settings"]["4-4-4"]["tasks"]) == ["toy_mc", "toy_gen"]


def test_a_local_task_longer_than_the_window_is_refused_before_any_model_loads(models, tmp_path, monkeypatch, capsys):
    """A local task's document longer than the model's window (64 tokens here) was cut from the left by the
    harness (a warning in its log) and the rest scored: another question than the one written. Refused
    before any model loads, for an HF directory and a Megatron checkpoint (its tokenizer as its export
    writes it, its window its sequence length), naming the task file, the document and its length, which
    is the harness's own count (a real HFLM on the loaded model). One that --limit leaves out passes."""
    import megatron_osp.analysis.downstream as downstream
    from lm_eval.models.huggingface import HFLM

    from megatron_osp.analysis.loading import load_for_analysis

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    tasks = write_tasks(tmp_path / "tasks")
    long_q = " ".join(["valkyria season"] * 12)
    mc = [json.loads(line) for line in (tasks / "toy_mc.jsonl").read_text().splitlines()]
    mc.insert(2, {"question": long_q, "choices": ["a game", "the season of the game"], "label": 0})
    (tasks / "toy_long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tasks / "toy_long.yaml").write_text(MC_YAML.replace("toy_mc", "toy_long").format(data=tasks / "toy_long.jsonl"))
    (tasks / "toy_glong.jsonl").write_text(json.dumps({"question": "the game", "answer": "a"}) + "\n"
                                           + json.dumps({"question": long_q, "answer": "a"}) + "\n")
    (tasks / "toy_glong.yaml").write_text(GEN_YAML.replace("toy_gen", "toy_glong").format(data=tasks / "toy_glong.jsonl"))
    late = mc[:2] + mc[3:6] + [mc[2]]  # its long document is past --limit 3: never evaluated, not refused
    (tasks / "toy_late.jsonl").write_text("".join(json.dumps(r) + "\n" for r in late))
    (tasks / "toy_late.yaml").write_text(MC_YAML.replace("toy_mc", "toy_late").format(data=tasks / "toy_late.jsonl"))

    lm = HFLM(pretrained=load_for_analysis(str(models["hf"])).model, tokenizer=str(models["hf"]), batch_size=1)
    assert lm.max_length == 64
    mc_tokens = max(sum(map(len, lm._encode_pair(long_q, " " + c))) for c in mc[2]["choices"])
    gen_tokens = len(lm.tok_encode(long_q))
    assert mc_tokens > 65 and gen_tokens > 60, (mc_tokens, gen_tokens)
    calls = []
    monkeypatch.setattr(downstream, "load_eval_model", lambda *a, **k: calls.append(a))
    rc = evaluate_downstream.main([str(models["hf"]), str(models["run"]), "--tasks", "toy_mc,toy_long,toy_glong,toy_late",
                                   "--settings", "fp", "--limit", "3", "--include-path", str(tasks),
                                   "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and calls == [], err
    for model in (models["hf"], models["run"]):
        assert (f"task toy_long: {tasks / 'toy_long.jsonl'}: document 3: its prompt and choice 1 is {mc_tokens} tokens, "
                f"more than {model}'s window of 64 (+1: the last token is only predicted): the harness would cut its "
                "beginning off") in err, err
        assert (f"task toy_glong: {tasks / 'toy_glong.jsonl'}: document 2: its prompt is {gen_tokens} tokens, more "
                f"than the 60 tokens the harness leaves for a prompt in {model}'s window of 64 (less 4 to generate)") in err
    assert "toy_mc" not in err and "toy_late" not in err and "document 1:" not in err, err
    assert err.count("task toy_long:") == 2 and not (tmp_path / "out").exists()


def test_an_hf_tokenizer_that_cannot_be_loaded_is_named(models, tmp_path):
    """The window check loads each model's tokenizer as the harness does: one that cannot be loaded (here a
    tokenizer.json that is not one) is named with its directory, not a transformers traceback."""
    import shutil

    from megatron_osp.analysis.task_length import model_windows

    bad = tmp_path / "bad"
    shutil.copytree(models["hf"], bad)
    (bad / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=f"^{bad}: its tokenizer or config.json cannot be loaded"):
        model_windows([str(bad)])
    windows, tmps = model_windows([str(models["hf"]), str(models["run"])])
    assert [w.window for w in windows] == [64, 64] and len(tmps) == 1
    tmps[0].cleanup()
