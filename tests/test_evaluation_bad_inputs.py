"""Bad input to tools/evaluate_quantization.py (and the checks evaluate_downstream.py shares), refused
before any model is evaluated, on tiny saved HF Llamas: settings that cannot apply, counts below 1,
labels that collide, held-out tokens outside the vocabulary.
"""

import re

import numpy as np
import pytest
import torch

from megatron_osp.analysis.quantization import parse_setting
from test_quantization import _tiny_llama


def test_settings_that_cannot_apply_are_refused_before_any_evaluation(tmp_path, capsys):
    """A weight group size of 0, or one that does not divide a linear's input width, and QuaRot on tied
    embeddings used to fail only when that setting's turn came, after the settings (and models) before
    it had been evaluated, and the run then wrote nothing. Now: refused first, naming the setting and
    the model (evaluate_quantization.py: before any model loads), as are window/batch counts below 1."""
    import sys
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_osp.data.indexed import IndexedDatasetWriter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import evaluate_quantization

    _tiny_llama(0).save_pretrained(tmp_path / "m0")
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(tmp_path / "m1")
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(90) % 96)
    capsys.readouterr()
    rc = evaluate_quantization.main([str(tmp_path / "m0"), str(tmp_path / "m1"), "--data", str(tmp_path / "held"),
                                     "--seq-length", "8", "--device", "cpu", "--settings", "fp", "4-4-4-g32",
                                     "--output-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 2 and "== " not in out, out  # no model was loaded
    assert f"{tmp_path / 'm1'}: setting 4-4-4-g32: weight group size 32 does not divide" in err and "48" in err, err
    assert not (tmp_path / "out").exists()
    # Counts below 1 used to fail after the model loaded (--batch-size 0: "range() arg 3 must not be zero";
    # --stats-windows 0, --num-windows -3: a RuntimeError traceback) or be ignored (--seq-length 0).
    for option in ("--num-windows", "--batch-size", "--seq-length", "--stats-windows", "--calibration-windows"):
        rc = evaluate_quantization.main([str(tmp_path / "m0"), "--data", str(tmp_path / "held"), "--settings", "fp",
                                         option, "0", "--output-dir", str(tmp_path / "out")])
        out, err = capsys.readouterr()
        assert rc == 2 and f"{option} must be >= 1, got 0" in err and "== " not in out, err
    assert not (tmp_path / "out").exists()

    with pytest.raises(ValueError, match="group size .* must be >= 1"):
        parse_setting("4-4-4-g0")
    from megatron_osp.analysis.evaluation import check_settings

    with pytest.raises(ValueError, match="setting 4-4-4-g24: weight group size 24 does not divide the 32 input "
                                         "columns of layer_1"):
        check_settings(_tiny_llama(), [parse_setting("4-4-4-g24")])
    check_settings(_tiny_llama(), [parse_setting("4-4-4-g32"), parse_setting("4-4-4+quarot")])
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="setting 4-4-4\\+quarot: QuaRot .* ties it to the embedding"):
        check_settings(tied, [parse_setting("4-4-4+quarot")])
    # apply_setting refuses by the same check, before it changes any weight
    from megatron_osp.analysis.evaluation import apply_setting

    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, m in ((parse_setting("4-4-4-g24"), model), (parse_setting("4-4-4+quarot"), tied)):
        with pytest.raises(ValueError, match=f"setting {re.escape(bad.name)}: "):
            with apply_setting(m, bad):
                pass
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_models_with_the_same_default_label_stay_apart(tmp_path, capsys):
    """Two models whose default labels agree (two HF directories both named "model"; two checkpoints of
    one run) used to share one label: the plots, keyed by label, silently drew only the second, and the
    tables had two indistinguishable rows. Now the second is labelled with its path; --labels naming a
    model twice is refused."""
    import json
    import sys
    from pathlib import Path

    from megatron_osp.analysis import plots
    from megatron_osp.data.indexed import IndexedDatasetWriter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import evaluate_quantization

    for seed, parent in ((0, "a"), (1, "b")):
        _tiny_llama(seed).save_pretrained(tmp_path / parent / "model")
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(90) % 96)
    drawn = []
    real = plots.plot_perplexity_vs_bits
    plots.plot_perplexity_vs_bits = lambda models, path: (drawn.append(list(models)), real(models, path))
    try:
        common = ["--data", str(tmp_path / "held"), "--seq-length", "8", "--num-windows", "2", "--documents", "0:1",
                  "--device", "cpu", "--settings", "fp", "--weight-error-windows", "0", "--stats-windows", "1"]
        models = [str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model")]
        assert evaluate_quantization.main(models + common + ["--output-dir", str(tmp_path / "out")]) == 0
    finally:
        plots.plot_perplexity_vs_bits = real
    labels = [m["label"] for m in json.loads((tmp_path / "out" / "quantization.json").read_text())["models"]]
    assert labels == ["model", f"model ({models[1]})"], labels
    if plots.plots_available():
        assert drawn == [labels]
    capsys.readouterr()
    assert evaluate_quantization.main(models + common + ["--labels", "x", "x", "--output-dir", str(tmp_path / "o2")]) == 2
    assert "--labels names a model twice" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_held_out_tokens_outside_the_vocabulary_are_named(tmp_path, capsys):
    """--data tokenized by another (larger) tokenizer used to end in "IndexError: index out of range in
    self" from the embedding, a traceback; now one line naming the data, the id and the vocabulary."""
    import sys
    from pathlib import Path

    from megatron_osp.data.indexed import IndexedDatasetWriter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import evaluate_quantization

    _tiny_llama(0).save_pretrained(tmp_path / "m")  # vocabulary 96
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document((np.arange(90) * 7) % 100)  # ids up to 99 (98 is the 15th token)
    rc = evaluate_quantization.main([str(tmp_path / "m"), "--data", str(tmp_path / "held"), "--documents", "0:1",
                                     "--seq-length", "8", "--num-windows", "4", "--device", "cpu", "--settings", "fp",
                                     "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--data {tmp_path / 'held'}: token id" in err and "outside the model's vocabulary of 96" in err, err
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_model_loads(tmp_path, capsys):
    """--output-dir naming a file (or a path under one) used to be found only when the report was first
    written: after the first finished setting, or, with one unit, after the whole evaluation, as a
    FileExistsError traceback with nothing saved. Now: one line naming it, before any model loads; the
    file is untouched. open_report (shared with evaluate_downstream.py) refuses it the same way."""
    import sys
    from pathlib import Path

    from megatron_osp.analysis.report_resume import open_report
    from megatron_osp.data.indexed import IndexedDatasetWriter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import evaluate_quantization

    _tiny_llama(0).save_pretrained(tmp_path / "m0")
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(90) % 64)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    for out_dir in (blocker, blocker / "sub"):
        capsys.readouterr()
        rc = evaluate_quantization.main([str(tmp_path / "m0"), "--data", str(tmp_path / "held"), "--seq-length", "8",
                                         "--documents", "0:1", "--device", "cpu", "--settings", "fp",
                                         "--weight-error-windows", "0", "--no-plots", "--output-dir", str(out_dir)])
        out, err = capsys.readouterr()
        assert rc == 2 and "== " not in out, (out, err)  # no model was loaded
        assert f"--output-dir {out_dir}: {blocker} is not a directory" in err and "Traceback" not in err, err
        assert blocker.read_text() == "keep me"
        with pytest.raises(ValueError, match="is not a directory"):
            open_report(out_dir / "downstream.json", resume=False, overwrite=False, request={"models": []})


def test_held_out_documents_follow_the_first_megatron_model_even_after_an_hf_one(tmp_path, capsys, monkeypatch):
    """The held-out documents default to the validation split of the first Megatron model's run (the
    tool's help). With an HF directory listed first they were the last 5% whatever that run's data.split
    held out: for data.split='98,2,0', documents 0.95..0.98 it trained on were evaluated as held out.
    config_facts stands in for the Megatron run's config (its data.split '50,50,0')."""
    import sys
    from pathlib import Path

    import megatron_osp.analysis.loading as loading
    from megatron_osp.data.indexed import IndexedDatasetWriter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import evaluate_quantization

    for name in ("hf", "run"):
        _tiny_llama(0).save_pretrained(tmp_path / name)
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        for i in range(20):
            writer.add_document(np.arange(40) % 64)
    real = loading.config_facts
    monkeypatch.setattr(loading, "config_facts", lambda p: (8, "50,50,0", None) if Path(p).name == "run" else real(p))
    for i, order in enumerate((("hf", "run"), ("run", "hf"))):
        capsys.readouterr()
        rc = evaluate_quantization.main([*(str(tmp_path / m) for m in order), "--data", str(tmp_path / "held"),
                                         "--seq-length", "8", "--num-windows", "2", "--device", "cpu", "--settings",
                                         "fp", "--weight-error-windows", "0", "--no-plots",
                                         "--output-dir", str(tmp_path / f"out{i}")])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert "from documents 0.5:1.0 of" in out, (order, out)


def test_runs_of_different_splits_are_scored_on_the_documents_every_one_held_out(tmp_path):
    """Two runs, data.split 98,2,0 and 90,10,0: the default held-out documents were the first run's
    validation share whatever the others held out; listed the other way round, documents 0.9..0.98 the
    first run trained on. Now the intersection, and a note; none in common is refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from evaluate_quantization import common_held_out

    for facts in ([("a", "98,2,0", None), ("b", "90,10,0", None)], [("b", "90,10,0", None), ("a", "98,2,0", None)]):
        calib, held, note = common_held_out("d", None, [("hf", None, None), *facts])
        assert held == (0.98, 1.0) and calib == (0.0, 0.9 if facts[0][0] == "b" else 0.98)
        assert note.startswith("held-out documents 0.98:1.0: the part every run held out (") and "b 0.9:1.0" in note
    assert common_held_out("d", None, [("a", "98,2,0", None), ("c", "98,2,0", None)]) == ((0.0, 0.98), (0.98, 1.0),
                                                                                          None)
    assert common_held_out("d", "0.5:0.7", [("a", "98,2,0", None), ("b", "90,10,0", None)])[1] == (0.5, 0.7)
    with pytest.raises(ValueError, match=r"the runs hold out no documents of d in common \(a 0\.5:0\.8, b 0\.9:1\.0\)"):
        common_held_out("d", None, [("a", "50,30,20", None), ("b", "90,10,0", None)])
