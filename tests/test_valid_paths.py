"""``data.valid_paths``: a held-out validation set of its own (Megatron-LM's --valid-data-path). Its
documents, all of them, give the eval loss and the kurtosis batches; training then reads every document
of ``data.paths`` (``data.split`` must say "100"). A validation dataset that training also reads, or of
another tokenizer, is refused by name before any work; the validation set may change on resume (a
record in metrics.jsonl says so)."""

import json
import os
import shutil

import numpy as np
import pytest

from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_osp.testing.distributed import run_distributed

EOD = 255
TRAIN_IDS, VALID_IDS = (1, 128), (128, 250)  # token ids tell which corpus a sample came from


def _corpus(prefix, ids, seed, n_docs=60):
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), dtype=np.uint16) as w:
        for _ in range(n_docs):
            w.add_document(np.append(rng.integers(*ids, int(rng.integers(10, 60))), EOD).astype(np.uint16))
    return str(prefix)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("validpaths")
    return {"train": _corpus(d / "train", TRAIN_IDS, 0), "valid": _corpus(d / "valid", VALID_IDS, 1),
            "valid2": _corpus(d / "valid2", VALID_IDS, 2, n_docs=30)}


def _overrides(c, run_dir, *extra):
    return ["model.preset=test", f"data.paths=[{c['train']}]", f"data.eod_id={EOD}", "train.train_steps=3",
            "train.warmup_steps=1", "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_interval=1",
            "train.eval_batches=2", "train.tensorboard=false", "train.progress_bar=false",
            f"train.run_dir={run_dir}", *extra]


def _own(c, *extra):
    return ["data.split=100", f"data.valid_paths=[{c['valid']}]", *extra]


def _config(overrides):
    from megatron_osp.training.config import load_config

    return load_config(None, overrides)


def _tokens(ds):
    return np.concatenate([ds[i]["tokens"].numpy() for i in range(len(ds))])


def test_validation_reads_the_valid_set_and_training_every_document(corpora, tmp_path):
    from megatron_osp.training.data import build_datasets

    n_docs = len(IndexedDataset(corpora["train"]))
    train, valid = build_datasets(_config(_overrides(corpora, tmp_path / "own", *_own(corpora))), 400, 16)
    assert set(np.unique(train.document_index).tolist()) == set(range(n_docs))  # nothing held out
    assert valid.dataset.prefix == corpora["valid"] and valid.documents == range(len(IndexedDataset(corpora["valid"])))
    v, t = _tokens(valid), _tokens(train)
    assert ((v >= VALID_IDS[0]) & (v != EOD)).sum() > 0 and not ((v > 0) & (v < TRAIN_IDS[1])).any()
    assert not ((t >= VALID_IDS[0]) & (t != EOD)).any()
    # The split-based run holds out data.paths' last documents for validation, never trained on.
    train_split, valid_split = build_datasets(_config(_overrides(corpora, tmp_path / "split")), 400, 16)
    assert max(np.unique(train_split.document_index)) < round(0.98 * n_docs) <= valid_split.documents.start
    # A blend of validation sets, by weight; its indices are cached and reused like the training ones.
    blend = _own(corpora, f"data.valid_paths=[{corpora['valid']},{corpora['valid2']}]", "data.valid_weights=[3,1]")
    _, blended = build_datasets(_config(_overrides(corpora, tmp_path / "blend", *blend)), 400, 16)
    assert [d.dataset.prefix for d in blended.datasets] == [corpora["valid"], corpora["valid2"]]
    assert np.bincount(blended.dataset_index).tolist() == [12, 4]
    cache = tmp_path / "blend" / "index_cache"
    before = sorted(p.name for p in cache.iterdir())
    assert any("valid" in name for name in before)
    _, again = build_datasets(_config(_overrides(corpora, tmp_path / "blend", *blend)), 400, 16)
    assert sorted(p.name for p in cache.iterdir()) == before
    np.testing.assert_array_equal(_tokens(again), _tokens(blended))


def _train_worker(rank, world, overrides, valid_prefix, first=None):
    """The run of ``overrides`` (after a first segment of overrides ``first``, when given): its val loss,
    the same model's loss on ``valid_prefix`` measured apart, and its console lines."""
    from megatron_osp.data.gpt_dataset import GPTDataConfig, GPTDataset
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    if first is not None:
        Trainer(load_config(None, first), log=lambda *_: None).train()
    lines = []
    trainer = Trainer(load_config(None, overrides), log=lines.append)
    summary = trainer.train()
    if valid_prefix is None:
        return summary["val_loss"], None, lines
    # The same model's loss on the validation corpus's samples, built here apart from the run's config.
    raw = IndexedDataset(valid_prefix)
    n = trainer.config.train.eval_batches * trainer.config.train.global_batch_size
    cfg = GPTDataConfig(paths=[valid_prefix], sequence_length=32, seed=trainer.config.train.seed, eod_id=EOD)
    trainer.valid_ds = GPTDataset(raw, range(len(raw)), n, "valid", cfg)
    return summary["val_loss"], trainer.evaluate(), lines


def test_a_run_logs_the_val_loss_of_the_valid_set(corpora, tmp_path):
    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.resume_check import check_compatible

    # The run's first 2 steps validated on valid2; resumed, the rest on valid: the change is recorded.
    run, valid2 = tmp_path / "own", f"data.valid_paths=[{corpora['valid2']}]"
    first = _overrides(corpora, run, *_own(corpora, valid2), "train.exit_at_step=2")
    [(logged, direct, lines)] = run_distributed(_train_worker, 1, _overrides(corpora, run, *_own(corpora)),
                                                corpora["valid"], first)
    assert logged == pytest.approx(direct, rel=1e-6)
    assert json.loads((run / "summary.json").read_text())["val_loss"] == pytest.approx(logged, rel=1e-6)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2, 3]
    assert records[2] == {"step": 2, "event": "valid_set_changed",
                          "from": {"valid_paths": [corpora["valid2"]], "valid_weights": None},
                          "to": {"valid_paths": [corpora["valid"]], "valid_weights": None}}
    assert (f"validation set changed at step 2: from {[corpora['valid2']]} to {[corpora['valid']]}; the val losses "
            "and kurtosis after this step are of the new set") in lines
    [(split_based, _, _)] = run_distributed(_train_worker, 1, _overrides(corpora, tmp_path / "split"), None)
    assert abs(logged - split_based) > 1e-3  # ids never trained on: not the held-out share's loss
    # A resume may change the validation set; it may not turn data.paths' held-out share into training data.
    save_dir = run / "checkpoints"
    other = _overrides(corpora, run, *_own(corpora, valid2))
    assert check_compatible(save_dir, _config(other), resume=True, same_run=True) == (
        {"valid_paths": [corpora["valid"]], "valid_weights": None},
        {"valid_paths": [corpora["valid2"]], "valid_weights": None})
    assert check_compatible(save_dir, _config(other), resume=True) is None  # train.load: another run's record
    with pytest.raises(CheckpointError, match=r"data\.split: checkpoint '100', this run '98,2,0'"):
        check_compatible(save_dir, _config(_overrides(corpora, run)), resume=True, same_run=True)


def test_a_valid_set_change_is_one_metrics_record_that_readers_skip(tmp_path):
    """RunLog's event line: once per resume step (the same resume started again adds none), and not
    among the steps' metrics that resumed runs read (train_loss, tokens)."""
    from megatron_osp.training.run_log import RunLog, mean_tail

    steps = [{"step": s, "loss": 5.0 - s, "consumed_samples": 8 * s, "tokens": 256 * s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    change = ({"valid_paths": ["a"], "valid_weights": None}, {"valid_paths": None, "valid_weights": None})
    lines = []
    for _ in range(2):  # the resume at step 2, started again (killed before its next checkpoint)
        log = RunLog(tmp_path, None, lines.append, 1, 1, writer=True)
        earlier = log.earlier_metrics(2)
        assert earlier == steps[:2] and mean_tail(earlier) == 3.5
        log.valid_set_changed(2, change)
        log.valid_set_changed(2, None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == steps[:2] + [{"step": 2, "event": "valid_set_changed", "from": change[0], "to": change[1]}]
    assert lines == ["validation set changed at step 2: from ['a'] to data.split's validation share of data.paths; "
                     "the val losses and kurtosis after this step are of the new set"]


def _copy(prefix, to, last_token=None):
    """A byte copy of dataset ``prefix`` at ``to``; ``last_token``: its .bin's last token replaced."""
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, str(to) + ext)
    if last_token is not None:
        tokens = np.memmap(str(to) + ".bin", dtype=np.uint16, mode="r+")
        tokens[-1] = last_token
        tokens.flush()
        del tokens
    return str(to)


def test_a_valid_set_that_cannot_work_is_refused_by_name(corpora, tmp_path, monkeypatch):
    from megatron_osp.data.token_range import TokenRangeError
    from megatron_osp.training.data import build_datasets
    from megatron_osp.training.data_checks import data_problems
    from megatron_osp.training.validation import ConfigError

    base = _overrides(corpora, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data\.split='98,2,0' holds out validation/test shares of data\.paths, "
                                          r"but data\.valid_paths is set: .* set data\.split='100'"):
        _config(base + [f"data.valid_paths=[{corpora['valid']}]"])
    with pytest.raises(ConfigError, match=r"data\.split='90,0,10' holds out"):
        _config(base + _own(corpora, "data.split=90,0,10"))
    with pytest.raises(ConfigError, match=r"data\.valid_weights=\[1\.0\] is used only with data\.valid_paths"):
        _config(base + ["data.valid_weights=[1]"])
    with pytest.raises(ConfigError, match=r"data\.valid_weights has 2 entries but data\.valid_paths has 1"):
        _config(base + _own(corpora, "data.valid_weights=[1,2]"))
    with pytest.raises(ConfigError, match=r"data\.valid_paths=\[\]: must be a non-empty list"):
        _config(base + _own(corpora, "data.valid_paths=[]"))

    def problems(*extra):
        return data_problems(_config(base + _own(corpora, *extra)))

    assert problems() == []
    missing = str(tmp_path / "nope")
    assert problems(f"data.valid_paths=[{missing}]") == [
        f"data.valid_paths: {missing}.bin and {missing}.idx does not exist"]
    # The training corpus itself, under another name (a symlink), would be trained on.
    link = tmp_path / "link"
    for ext in (".bin", ".idx"):
        os.symlink(corpora["train"] + ext, str(link) + ext)
    assert problems(f"data.valid_paths=[{corpora['valid']},{link}]") == [
        f"data.valid_paths: {link} is also read for training (data.paths: {corpora['train']}): its documents would "
        "be trained on; hold out another dataset, or leave data.valid_paths unset to validate on data.split's share"]
    # A byte copy of it under another name too, judged by content (data/content_identity.py).
    copy = _copy(corpora["train"], tmp_path / "copy")
    assert problems(f"data.valid_paths=[{corpora['valid']},{copy}]") == [
        f"data.valid_paths: {copy} has the same content as {corpora['train']}, which data.paths reads for training "
        "(the same .idx bytes, .bin size and first and last MiB of .bin): its documents would be trained on; hold "
        "out another dataset, or leave data.valid_paths unset to validate on data.split's share"]
    # Another dataset of the same layout (.bin size, .idx) is not one, nor, below, one of another .bin size
    # (only stat'ed: no file of it is read).
    assert problems(f"data.valid_paths=[{_copy(corpora['train'], tmp_path / 'edited', last_token=EOD - 1)}]") == []
    from megatron_osp.data import content_identity

    def unread(*_):
        raise AssertionError("a dataset of another .bin size was read")

    monkeypatch.setattr(content_identity, "_bin_edges", unread)
    monkeypatch.setattr(content_identity, "_same_bytes", unread)
    assert problems() == []
    # Its token ids are checked against the vocabulary as the training data's are.
    wide = _corpus(tmp_path / "wide", (200, 300), 3)
    with pytest.raises(TokenRangeError, match=rf"{wide}\.bin: token ids reach 29\d, outside model\.vocab_size=256"):
        build_datasets(_config(base + _own(corpora, f"data.valid_paths=[{wide}]")), 400, 16)


def test_content_identity_reads_the_idx_and_the_edges_of_the_bin(corpora, tmp_path, monkeypatch):
    from megatron_osp.data import content_identity
    from megatron_osp.data.content_identity import copies_of, same_content

    monkeypatch.setattr(content_identity, "_EDGE", 64)  # the edges of a large .bin, on a small one
    monkeypatch.setattr(content_identity, "_BLOCK", 40)
    train, n = corpora["train"], os.path.getsize(corpora["train"] + ".bin") // 2
    copy, tail = _copy(train, tmp_path / "copy"), _copy(train, tmp_path / "tail", last_token=EOD - 1)
    middle = _copy(train, tmp_path / "middle")
    tokens = np.memmap(middle + ".bin", dtype=np.uint16, mode="r+")
    tokens[n // 2] += 1  # not read: the same content as far as this check goes
    tokens.flush()
    del tokens
    raw = IndexedDataset(train)
    docs = [np.array(raw[i]) for i in range(len(raw))]  # two documents swapped: the same .bin size and edges
    assert len(docs[20]) != len(docs[21])
    docs[20], docs[21] = docs[21], docs[20]
    with IndexedDatasetWriter(str(tmp_path / "swapped"), dtype=np.uint16) as w:
        for d in docs:
            w.add_document(d)
    assert not same_content(train, str(tmp_path / "swapped"))
    assert n > 4 * 64 and same_content(train, copy) and same_content(train, middle) and not same_content(train, tail)
    assert same_content(train, train) and not same_content(train, corpora["valid"])
    assert copies_of([corpora["valid"], tail, copy, train], [corpora["valid2"], train]) == {copy: train}


def _preprocessed(tmp_path, name, tokenizer, texts, **kw):
    from megatron_osp.data.preprocess import preprocess

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([str(src)], tokenizer, str(tmp_path / name), progress=False, **kw)
    return str(tmp_path / f"{name}_text_document")


def test_a_valid_set_of_another_tokenizer_or_a_trained_family_is_refused(sp_model, tmp_path):
    from megatron_osp.data.tokenizer import train_sentencepiece
    from megatron_osp.training.data_checks import data_problems

    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(120)]
    family = _preprocessed(tmp_path, "fam", sp_model, texts, max_shard_tokens=600)
    shards = [str(tmp_path / d["name"]) for d in json.loads(open(family + ".shards.json").read())["datasets"]]
    held = _preprocessed(tmp_path, "held", sp_model, texts[:30])
    no_eod = _preprocessed(tmp_path, "noeod", sp_model, texts[:30], append_eod=False)
    other_tok = str(train_sentencepiece(tmp_path / "held.jsonl", tmp_path / "other", vocab_size=300))
    other = _preprocessed(tmp_path, "other", other_tok, texts[:30])

    def problems(paths, valid):
        return data_problems(_config(["model.preset=test", "model.vocab_size=320", f"data.paths=[{','.join(paths)}]",
                                      f"data.tokenizer_model={sp_model}", "data.split=100",
                                      f"data.valid_paths=[{','.join(valid)}]"]))

    assert len(shards) >= 3
    assert problems(shards[:-1], [shards[-1]]) == []  # a held-out shard of the family: its own documents
    assert problems([family], [held]) == []
    assert problems(shards[:2], [family]) == [
        f"data.valid_paths: {shards[0]} (a shard of {family}) is also read for training (data.paths: {shards[0]}): "
        "its documents would be trained on; hold out another dataset, or leave data.valid_paths unset to validate "
        "on data.split's share"]
    [mix] = problems([family], [other])
    assert mix.startswith(f"data.valid_paths: {other}: made with another tokenizer than {shards[0]}"), mix
    [eod] = problems([family], [no_eod])
    assert eod.startswith(f"data.valid_paths: {no_eod}: its documents do not end with an EOD token, {shards[0]}'s do"), eod
    # Merged under another name: the merge's manifest (merged_from) says where its documents came from,
    # through a merge of a merge too, and in both directions.
    from megatron_osp.data.merge import merge_datasets

    second = _preprocessed(tmp_path, "second", sp_model, texts[30:60])
    merge_datasets([held, second], str(tmp_path / "m1"))
    merge_datasets([str(tmp_path / "m1"), shards[0]], str(tmp_path / "m2"))
    assert problems([str(tmp_path / "m2")], [held]) == [
        f"data.valid_paths: {held} is among the datasets data.paths' {tmp_path / 'm2'} was merged from (its "
        "manifest's merged_from): its documents would be trained on"]
    assert problems([second], [str(tmp_path / "m1")]) == [
        f"data.valid_paths: {tmp_path / 'm1'} was merged from {second} (its manifest's merged_from), which data.paths "
        "trains on: its documents would be trained on"]
    assert problems([str(tmp_path / "m1")], [shards[-1]]) == []  # unrelated: fine


def test_quantization_evaluation_holds_out_a_valid_set_and_refuses_the_training_data(corpora):
    """tools/evaluate_quantization.py's default held-out documents for a run with data.valid_paths: all of
    --data when it is one of them; the training data (every document trained on) is refused by name
    where it used to stop with 'data.split='100' has no validation share'."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from evaluate_quantization import held_out_ranges

    valid = [corpora["valid"], corpora["valid2"]]
    assert held_out_ranges(corpora["valid2"], None, "100", valid, "m") == (None, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"m: its run validated on data.valid_paths=.* trained on every document "
                                         r"of data.paths \(data.split='100'\): pass --data one of the validation"):
        held_out_ranges(corpora["train"], None, "100", valid, "m")
    assert held_out_ranges(corpora["train"], "0.9:1", "100", valid, "m") == ((0.0, 0.9), (0.9, 1.0))
    assert held_out_ranges(corpora["train"], None, "98,2,0", None, "m") == ((0.0, 0.98), (0.98, 1.0))
