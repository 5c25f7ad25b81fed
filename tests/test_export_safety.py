"""HF export and import never destroy their inputs (issue #14, cases 4 and 6), through the CLI tools.

- ``convert_to_hf.py RUN/checkpoints RUN --overwrite`` (and outputs that are the checkpoint, inside
  it, inside the run, contain the run, or a symlink to it) exits 2 naming both paths before anything
  is written; the run is unchanged to the byte.
- ``--overwrite`` replaces a previous export, never a directory that is not one (a stray file, no
  config.json/model.safetensors) nor a file.
- ``convert_from_hf.py`` refuses to write into its source HF directory, inside it, or into an
  existing run; both stay unchanged.
- An HF model with only tokenizer.json (no tokenizer.model), imported with relative paths, exports
  from another working directory with its bos/eos ids in config.json, generation_config.json and
  the tokenizer files.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from hf_run_fixtures import make_run, run_tool, tool
from test_hf_convert import _tool  # the tools' main(), in this process, for refusals (no model is built)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.read_bytes() if p.stat().st_size < 1 << 16 else None)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    paths = make_run(root, steps=1)
    run_tool([tool("convert_to_hf"), str(paths["checkpoints"]), str(root / "hf")])
    paths["hf"] = root / "hf"
    return paths


def test_export_into_its_own_run_is_refused_and_the_run_survives(run, capsys):
    run_dir, ckpt = run["run"], run["checkpoints"]
    before = _snapshot(run_dir)
    assert "config.yaml" in before and "metrics.jsonl" in before and any(k.endswith(".distcp") for k in before)
    # The command of the issue, as a user runs it.
    proc = run_tool([tool("convert_to_hf"), str(ckpt), str(run_dir), "--overwrite"], check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: refusing to export into") and str(run_dir) in err and "run directory" in err, err
    assert _snapshot(run_dir) == before
    # Other overlapping outputs, and the checkpoint given as its iter_N directory.
    link = run["root"] / "link_to_run"
    link.symlink_to(run_dir, target_is_directory=True)
    iteration = next(ckpt.glob("iter_*"))
    to_hf = _tool("convert_to_hf")
    for source, output in ((ckpt, link), (ckpt, ckpt), (ckpt, iteration), (ckpt, ckpt / "hf"), (ckpt, run_dir / "hf"),
                           (ckpt, run["root"]), (iteration, run_dir), (iteration, ckpt)):
        assert to_hf.main([str(source), str(output), "--overwrite"]) == 2, output
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: refusing to export into") and str(output) in err, err
        assert str(run_dir) in err or str(ckpt) in err or str(iteration) in err, err
        assert _snapshot(run_dir) == before, output
    assert not list(run["root"].glob(".*.tmp-*")) and not (run_dir / "hf").exists()


def test_overwrite_replaces_only_a_previous_export(run, tmp_path, capsys):
    ckpt = run["checkpoints"]
    out = tmp_path / "hf"
    shutil.copytree(run["hf"], out)
    (out / "model.safetensors").write_bytes(b"stale")
    run_tool([tool("convert_to_hf"), str(ckpt), str(out), "--overwrite"])  # a previous export: replaced
    assert (out / "model.safetensors").read_bytes() == (run["hf"] / "model.safetensors").read_bytes()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with_extra = tmp_path / "with_extra"
    shutil.copytree(run["hf"], with_extra)
    (with_extra / "eval_results.txt").write_text("keep me too")
    (with_extra / "subdir").mkdir()
    plain_file = tmp_path / "file.bin"
    plain_file.write_bytes(b"data")
    for target, words in ((notes, "todo.txt"), (with_extra, "eval_results.txt"), (plain_file, "not a directory")):
        before = _snapshot(tmp_path)
        assert _tool("convert_to_hf").main([str(ckpt), str(target), "--overwrite"]) == 2, target
        err = capsys.readouterr().err
        assert str(target) in err and words in err, err
        assert _snapshot(tmp_path) == before
    assert (notes / "todo.txt").read_text() == "keep me" and plain_file.read_bytes() == b"data"


def test_import_never_writes_into_its_source_or_an_existing_run(run, capsys):
    hf, run_dir = run["hf"], run["run"]
    hf_before, run_before = _snapshot(hf), _snapshot(run_dir)
    proc = run_tool([tool("convert_from_hf"), str(hf), str(hf)], check=False)
    assert proc.returncode == 2 and "refusing to import into" in proc.stderr, (proc.stdout, proc.stderr)
    for output, words in ((hf / "ckpt", "refusing to import into"), (run_dir, "not empty"),
                          (run["checkpoints"], "already holds a checkpoint")):
        assert _tool("convert_from_hf").main([str(hf), str(output)]) == 2, output
        err = capsys.readouterr().err
        assert words in err and str(output) in err, err
    assert _snapshot(hf) == hf_before and _snapshot(run_dir) == run_before


def test_tokenizer_json_only_import_keeps_bos_eos_and_exports_from_elsewhere(run, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    work = tmp_path / "work"
    src = work / "llama_json"
    shutil.copytree(run["hf"], src)
    (src / "tokenizer.model").unlink()  # an HF model with only tokenizer.json
    config = json.loads((src / "config.json").read_text())
    bos, eos = config["bos_token_id"], config["eos_token_id"]
    assert (bos, eos) == (1, 2)
    run_tool([tool("convert_from_hf"), "llama_json", "imported", "--tokenizer", "llama_json/tokenizer.json"],
             cwd=work)  # relative paths, as typed
    from megatron_osp.data.tokenizer_identity import tokenizer_fingerprint
    from megatron_osp.training.checkpoint import read_train_state

    # the checkpoint records the tokenizer.json its model learned: a run from it refuses other data
    record = read_train_state(work / "imported")["tokenizer"]
    assert record["tokenizer_fingerprint"] == tokenizer_fingerprint(src / "tokenizer.json")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(src), str(tmp_path / "moved_away"))  # the source is gone; the checkpoint suffices
    run_tool([tool("convert_to_hf"), str(work / "imported"), "../out"], cwd=elsewhere)
    out = tmp_path / "out"
    exported = json.loads((out / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (bos, eos)
    generation = GenerationConfig.from_pretrained(str(out))
    assert (generation.bos_token_id, generation.eos_token_id) == (bos, eos)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (tok.bos_token_id, tok.eos_token_id) == (bos, eos) and tok.eos_token == "</s>"
    original = AutoTokenizer.from_pretrained(str(run["hf"]))
    text = "a <s> b </s> c <unk> d"
    assert tok(text)["input_ids"] == original(text)["input_ids"]


def test_export_finds_a_relative_tokenizer_from_another_directory(run, tmp_path):
    """A run that recorded its tokenizer relative to where it trained exports from anywhere."""
    import yaml

    from megatron_osp.training.checkpoint import resolve_checkpoint

    root = tmp_path / "project"
    shutil.copytree(run["root"], root, symlinks=True, ignore=shutil.ignore_patterns("hf", "link_to_run"))
    cfg_file = resolve_checkpoint(root / "run" / "checkpoints") / "run_config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["data"]["tokenizer_model"] = "tokenizer.model"  # as recorded by a run started in root
    cfg_file.write_text(yaml.safe_dump(cfg))
    integrity = cfg_file.parent / "checksums.json"
    if integrity.exists():  # a checksum manifest covers run_config.yaml: rewrite it for the edit
        run_tool(["-m", "megatron_osp.training.checkpoint_integrity", "write", str(cfg_file.parent)])
    proc = run_tool([tool("convert_to_hf"), str(root / "run" / "checkpoints"), str(tmp_path / "out")],
                    cwd=os.path.dirname(tmp_path))
    assert (tmp_path / "out" / "tokenizer.model").is_file(), proc.stdout + proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 2


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(run, tmp_path, capsys):
    """--tokenizer with more pieces than model.vocab_size (another model's tokenizer) used to export
    without complaint; its ids past the vocabulary have no embedding row. Now refused before any
    model is built, naming both sizes; nothing is written."""
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in open(run["corpus"], encoding="utf-8")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "big"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2)
    out = tmp_path / "hf"
    assert _tool("convert_to_hf").main([str(run["checkpoints"]), str(out), "--tokenizer",
                                        str(tmp_path / "big.model")]) == 2
    err = capsys.readouterr().err
    assert "big.model has 400 tokens, more than the model's vocabulary of 320" in err, err
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_evaluate_quantization_names_a_damaged_checkpoint_in_one_line(run, tmp_path, capsys):
    """A checkpoint with a missing shard used to end evaluate_quantization.py in a CheckpointError
    traceback; now exit 2 with the one line naming the file, and no report is written."""
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(run["checkpoints"], ckpt)
    shard = sorted(ckpt.glob("iter_*/*.distcp"))[0]
    shard.unlink()
    rc = _tool("evaluate_quantization").main([str(ckpt), "--data", run["data"], "--settings", "fp",
                                              "--num-windows", "2", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and f"missing shard file {shard}" in last, last
    assert not (tmp_path / "out").exists()


def test_a_missing_run_tokenizer_stops_the_export_unless_no_tokenizer(run, tmp_path, capsys):
    """A run whose recorded tokenizer is not on this machine used to export with only a warning line and
    no tokenizer files: an export AutoTokenizer cannot load, found out later. Now refused, naming the
    path and the two ways on; --no-tokenizer exports the model alone."""
    import yaml

    from megatron_osp.training.checkpoint import resolve_checkpoint
    from megatron_osp.training.checkpoint_integrity import write_manifest

    ckpt = tmp_path / "checkpoints"
    shutil.copytree(run["checkpoints"], ckpt)
    cfg_file = resolve_checkpoint(ckpt) / "run_config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["data"]["tokenizer_model"] = str(tmp_path / "elsewhere" / "tokenizer.model")
    cfg_file.write_text(yaml.safe_dump(cfg))
    write_manifest(cfg_file.parent)  # a deliberate edit: vouch for it
    to_hf = _tool("convert_to_hf")
    assert to_hf.main([str(ckpt), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"the run's tokenizer {tmp_path / 'elsewhere' / 'tokenizer.model'}" in err and "--no-tokenizer" in err, err
    assert not (tmp_path / "hf").exists()
    assert to_hf.main([str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "generation_config.json",
                                                                   "model.safetensors"]


def test_overwrite_through_a_symlink_replaces_the_export_it_names(run, tmp_path):
    """--overwrite on a symlink to a previous export used to publish the new export in place of the link,
    then crash with "Cannot call rmtree on a symbolic link" (exit 1, a traceback) and leave a stray
    .link.old-PID link. Now the export behind the link is replaced and the link kept."""
    real, link = tmp_path / "real", tmp_path / "link"
    shutil.copytree(run["hf"], real)
    (real / "model.safetensors").write_bytes(b"stale")
    link.symlink_to(real, target_is_directory=True)
    assert _tool("convert_to_hf").main([str(run["checkpoints"]), str(link), "--overwrite"]) == 0
    assert link.is_symlink() and os.path.realpath(link) == str(real.resolve())
    assert (real / "model.safetensors").read_bytes() == (run["hf"] / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_run_directory_exports_as_its_checkpoints(run, tmp_path):
    """The evaluation tools take a run directory; convert_to_hf.py refused it ("not a checkpoint")."""
    run_tool([tool("convert_to_hf"), str(run["run"]), str(tmp_path / "hf")])
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (run["hf"] / name).read_bytes(), name


def test_a_tokenizer_of_other_ids_than_the_model_learned_is_refused(run, tmp_path, capsys):
    """--tokenizer naming another SentencePiece model of the same vocabulary size (trained on other text)
    used to export without a word: AutoTokenizer then fed the model ids it never learned. The checkpoint
    records the tokenizer its model learned (train_state.json), so the export is refused before any model
    is built, naming both; a byte copy of the run's own tokenizer still exports."""
    import sentencepiece as spm

    texts = [json.loads(line)["text"][::-1].upper() for line in open(run["corpus"], encoding="utf-8")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "other"),
                                   vocab_size=320, model_type="bpe", byte_fallback=True, minloglevel=2)
    out = tmp_path / "hf"
    assert _tool("convert_to_hf").main([str(run["checkpoints"]), str(out), "--tokenizer",
                                        str(tmp_path / "other.model")]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer {tmp_path / 'other.model'} encodes differently from {run['tokenizer']}" in err, err
    assert "--tokenizer" in err and not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))
    shutil.copy(run["tokenizer"], tmp_path / "copy.model")
    assert _tool("convert_to_hf").main([str(run["checkpoints"]), str(out), "--tokenizer",
                                        str(tmp_path / "copy.model")]) == 0
    assert (out / "tokenizer.model").read_bytes() == run["tokenizer"].read_bytes()


def test_a_tokenizer_of_the_other_kind_is_compared_by_its_ids(run, tmp_path, capsys):
    """A checkpoint trained on SentencePiece data exported with an unrelated HF tokenizer.json used to pass
    (fingerprints of different kinds were not compared): both now encode probe texts, and different ids
    are refused naming both files (also a conversion that differs only at a text's start and end, which
    the first probe text alone did not show); the tokenizer.json the export converted from the run's
    .model encodes alike and still exports."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"][::-1].upper() for line in open(run["corpus"], encoding="utf-8")]
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    hf.save(str(other))
    out = tmp_path / "hf"
    assert _tool("convert_to_hf").main([str(run["checkpoints"]), str(out), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer {other} encodes differently from {run['tokenizer']}" in err, err
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))
    converted = run["hf"] / "tokenizer.json"
    assert converted.is_file()
    # A conversion that keeps the spaces at a text's start and end, which SentencePiece strips
    # (remove_extra_whitespaces): alike on the first probe text, which has none; the others catch it.
    from megatron_osp.training.tokenizer_record import PROBE_TEXT, same_by_encoding

    spec = json.loads(converted.read_text())
    rules = spec["normalizer"]["normalizers"]
    strip = [r for r in rules if r.get("pattern") == {"Regex": "\\A +| +\\z"}]
    assert len(strip) == 1, rules
    rules.remove(strip[0])
    unstripped = tmp_path / "unstripped" / "tokenizer.json"
    unstripped.parent.mkdir()
    unstripped.write_text(json.dumps(spec))
    assert same_by_encoding(run["tokenizer"], unstripped, texts=[PROBE_TEXT]) is True
    assert _tool("convert_to_hf").main([str(run["checkpoints"]), str(out), "--tokenizer", str(unstripped)]) == 2
    assert f"tokenizer {unstripped} encodes differently from {run['tokenizer']}" in capsys.readouterr().err
    assert _tool("convert_to_hf").main([str(run["checkpoints"]), str(out), "--tokenizer", str(converted)]) == 0
    assert (out / "tokenizer.json").is_file()


def test_an_output_that_cannot_be_written_is_refused_before_the_model_is_built(run, tmp_path, capsys, monkeypatch):
    """An output under a file (or in a read-only directory) used to be found out only when writing, after
    the model was read and built: the export said 'error: [Errno 17] File exists: <the file>', the import
    ended in a NotADirectoryError traceback. Now both name the output and why, before any model is built."""
    import megatron_osp.models.gpt as gpt

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(gpt, "build_gpt_model", no_build)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for name, source in (("convert_to_hf", run["checkpoints"]), ("convert_from_hf", run["hf"])):
        output = blocker / "out"
        assert _tool(name).main([str(source), str(output)]) == 2, name
        err = capsys.readouterr().err
        assert f"error: output {output} cannot be written: {blocker} is not a directory" in err, err
    assert blocker.read_text() == "x"
