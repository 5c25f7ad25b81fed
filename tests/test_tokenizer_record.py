"""A checkpoint records the tokenizer whose ids its model learned (training/tokenizer_record.py), and a
run that starts from it on data of another tokenizer of the same vocabulary size is refused by name
before any work; data of the same tokenizer (another corpus, a re-saved copy of the tokenizer) loads.

Two SentencePiece models of 300 pieces trained on different text pass every size and range check:
without the record the second run trained on, each token read as another one's embedding."""

import json
import shutil

import pytest

from megatron_osp.testing.distributed import run_distributed


def _tokenizer(d, words, seed):
    from megatron_osp.data.tokenizer import train_sentencepiece

    d.mkdir()
    lines = [" ".join(words[(i * seed + j) % len(words)] for j in range(8)) for i in range(300)]
    (d / "c.jsonl").write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i, t in enumerate(lines)))
    return str(train_sentencepiece(d / "c.jsonl", d / "tok", vocab_size=300))


def _data(d, name, tokenizer, seed):
    from megatron_osp.data.preprocess import preprocess

    docs = d / f"{name}.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the fox {i * seed} jumps over {name} dogs " * 3}) + "\n"
                            for i in range(80)))
    preprocess([str(docs)], tokenizer, str(d / name), append_eod=True, progress=False)
    return str(d / f"{name}_text_document")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokrecord")
    a = _tokenizer(d / "a", ("the", "fox", "jumps", "over", "lazy", "dogs", "a", "b"), 3)
    b = _tokenizer(d / "b", ("zyx", "wvu", "quick", "brown", "cats", "sleep", "c", "q"), 5)
    copy = d / "a_copy.model"
    shutil.copy(a, copy)
    return {"a": a, "b": b, "a_copy": str(copy), "data_a": _data(d, "da", a, 1), "data_a2": _data(d, "da2", a, 2),
            "data_b": _data(d, "db", b, 1), "root": d}


def _overrides(data, run_dir, *extra):
    return ["model.preset=test", "model.vocab_size=320", f"data.paths=[{data}]", "train.train_steps=2",
            "train.warmup_steps=0", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.eval_batches=1", "train.tensorboard=false", "train.progress_bar=false",
            f"train.run_dir={run_dir}", *extra]


def _worker(rank, world, s):
    from megatron_osp.training.checkpoint import CheckpointError, read_train_state
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    root = s["root"]
    first = load_config(None, _overrides(s["data_a"], f"{root}/first", f"data.tokenizer_model={s['a']}"))
    Trainer(first, log=lambda *_: None).train()
    ckpt = f"{root}/first/checkpoints"
    out = {"record": read_train_state(ckpt).get("tokenizer")}
    starts = {  # a new run from the checkpoint: data of the other tokenizer, named or by its manifest only
        "b_named": _overrides(s["data_b"], f"{root}/b1", f"data.tokenizer_model={s['b']}", f"train.load={ckpt}"),
        "b_manifest": _overrides(s["data_b"], f"{root}/b2", f"data.eod_id=2", f"train.load={ckpt}"),
        "a_other_corpus": _overrides(s["data_a2"], f"{root}/a2", f"data.tokenizer_model={s['a_copy']}",
                                     f"train.load={ckpt}", "train.load_weights_only=true"),  # (finished: weights)
    }
    for name, overrides in starts.items():
        try:
            Trainer(load_config(None, overrides), log=lambda *_: None)
            out[name] = None
        except CheckpointError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def trained(setup):
    return run_distributed(_worker, 1, {k: str(v) for k, v in setup.items()}, timeout=300)[0]


def test_a_run_from_a_checkpoint_on_another_tokenizers_data_is_refused(setup, trained):
    from megatron_osp.data.tokenizer_identity import tokenizer_fingerprint

    out = trained
    record = out["record"]
    assert record["tokenizer_fingerprint"] == tokenizer_fingerprint(setup["a"]) and record["source"] == setup["a"]
    for case in ("b_named", "b_manifest"):
        err = out[case]
        assert err is not None and "tokenizer: the checkpoint's model learned the ids of " + setup["a"] in err, case
        assert "which encodes differently" in err
    assert setup["b"] in out["b_named"] and "the preprocessing manifest of " + setup["data_b"] in out["b_manifest"]
    assert out["a_other_corpus"] is None  # same tokenizer (a copy of its file), other data: loads


def test_records_compare_by_what_they_encode(setup, tmp_path):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.tokenizer_record import checkpoint_record, data_record, file_record, run_record, same

    a, a_copy, b = file_record(setup["a"]), file_record(setup["a_copy"]), file_record(setup["b"])
    assert same(a, a_copy) is True and same(a, b) is False
    assert same(a, data_record([setup["data_a"]])) is True and same(a, data_record([setup["data_b"]])) is False
    assert same(a, None) is None and file_record(tmp_path / "missing.model") is None
    # a SentencePiece model against a tokenizer.json: fingerprints of different kinds cannot be compared
    hf = {"tokenizer_sha256": "0" * 64, "tokenizer_fingerprint": "hf1:" + "0" * 64}
    assert same(a, hf) is None
    # no data.tokenizer_model: the datasets' manifests name it; a dataset without a manifest names none
    cfg = load_config(None, _overrides(setup["data_b"], tmp_path / "r", "data.eod_id=2"))
    assert same(run_record(cfg), b) is True
    plain = tmp_path / "plain"
    for ext in (".bin", ".idx"):
        shutil.copy(setup["data_b"] + ext, str(plain) + ext)
    assert run_record(load_config(None, _overrides(plain, tmp_path / "r", "data.eod_id=2"))) is None
    # a checkpoint saved before records were written: its run config's files decide
    assert same(checkpoint_record({}, cfg), b) is True
    assert checkpoint_record({"tokenizer": a}, cfg) == a


def test_evaluation_refuses_data_of_another_tokenizer_before_any_model_loads(setup, trained, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from megatron_osp.analysis.loading import check_data_tokenizer

    ckpt = str(setup["root"] / "first" / "checkpoints")
    check_data_tokenizer(ckpt, setup["data_a2"], "--data")  # the model's tokenizer: passes
    with pytest.raises(ValueError, match="learned the ids of " + setup["a"]):
        check_data_tokenizer(ckpt, setup["data_b"], "--data")
    # an HF directory: its tokenizer.model (or tokenizer.json) is the model's
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    shutil.copy(setup["b"], hf / "tokenizer.model")
    check_data_tokenizer(str(hf), setup["data_b"], "--calibration-data")
    with pytest.raises(ValueError, match="--calibration-data " + setup["data_a"]):
        check_data_tokenizer(str(hf), setup["data_a"], "--calibration-data")
    (hf / "tokenizer.model").unlink()
    check_data_tokenizer(str(hf), setup["data_a"], "--calibration-data")  # nothing to compare: not refused
    # the tool: exit 2 naming both, before any model loads, nothing written
    spec = importlib.util.spec_from_file_location("eq", Path(__file__).resolve().parents[1] / "tools" /
                                                  "evaluate_quantization.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "out"
    assert tool.main([ckpt, "--data", setup["data_b"], "--documents", "0:1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert setup["data_b"] in err and setup["a"] in err and "encodes differently" in err
    assert not out.exists()
