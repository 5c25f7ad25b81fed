"""Documents tokenized twice, once for training and once as a validation set (two preprocessing runs of the
same texts), were trained and validated on without a word: no file is shared and no byte copy is made, so
the checks of data.valid_paths (the same .bin, a byte copy, a merge's sources) saw nothing. Every dataset's
manifest entry now records a content sample (data/content_identity.py: the hashes of the documents whose
hash is a multiple of 1024), and a validation set that shares half of its sampled documents with the
training data is refused, from the manifests alone."""

import json

import numpy as np
import pytest

from megatron_osp.data import content_identity
from megatron_osp.data.content_identity import SAMPLE_FIELD, recorded_sample, sampled_documents, training_sample
from megatron_osp.data.merge import merge_datasets
from megatron_osp.data.preprocess import preprocess

TEXTS = [f"record {i} says {i * 7919 % 10007} and {i % 97}" for i in range(12000)]


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sp_model):
    """Training: every text, sharded. Valid: 4,000 of the same texts, in another order, a run of its own.
    Held out: 8,000 texts training does not have."""
    d = tmp_path_factory.mktemp("retok")
    rng = np.random.default_rng(0)
    again = [TEXTS[i] for i in rng.permutation(len(TEXTS))[:4000]]
    other = [t.replace("record", "other record") for t in TEXTS[:8000]]  # a sample of about 8
    out = {}
    for name, texts, shard in (("train", TEXTS, 40000), ("valid", again, None), ("held", other, None)):
        preprocess([_write(d / f"{name}.jsonl", texts)], sp_model, str(d / name), progress=False,
                   max_shard_tokens=shard)
        out[name] = str(d / f"{name}_text_document")
    out["dir"] = d
    return out


def _shards(family):
    m = json.loads(open(family + ".shards.json").read())
    return [str(family).rsplit("/", 1)[0] + "/" + e["name"] for e in m["datasets"]], m


def test_the_sample_is_chosen_by_content_and_recorded_per_dataset(runs):
    shards, m = _shards(runs["train"])
    assert len(shards) > 1 and all(e[SAMPLE_FIELD]["scheme"] == content_identity.SAMPLE_SCHEME for e in m["datasets"])
    per_shard = [recorded_sample(s) for s in shards]
    union = training_sample(shards)
    assert sum(map(len, per_shard)) == len(union) > 3  # each sampled document in one shard
    assert all(int(h) % content_identity.SAMPLE_RATE == 0 for h in union)
    # the valid run's sample is the training sample's part for its documents: the same texts, the same hashes
    valid = recorded_sample(runs["valid"])
    assert len(valid) >= 3 and set(valid.tolist()) <= set(union.tolist())
    held = recorded_sample(runs["held"])
    assert len(held) >= 3 and not set(held.tolist()) & set(union.tolist())
    # the hash is of a document's ids and their order: the same document hashes alike wherever it is
    lengths, tokens = np.array([3, 2, 3]), np.array([5, 6, 7, 8, 9, 5, 6, 7], dtype=np.uint16)
    content_identity.SAMPLE_RATE, rate = 1, content_identity.SAMPLE_RATE
    try:
        hashes = [h for _, h in sampled_documents(lengths, tokens)]
    finally:
        content_identity.SAMPLE_RATE = rate
    assert hashes[0] == hashes[2] != hashes[1]


def _random_documents(rng, n, low, high, vocab=50000):
    lengths = rng.integers(low, high, n)
    return lengths, rng.integers(0, vocab, int(lengths.sum())).astype(np.int32)


def test_the_hash_is_of_the_ids_and_their_order_not_the_stored_dtype():
    rng = np.random.default_rng(1)
    lengths, tokens = _random_documents(rng, 2000, 1, 60, vocab=65535)
    hashes = content_identity.document_hashes(lengths, tokens)
    for dtype in (np.uint16, np.int64, np.uint32):  # the same ids stored otherwise
        assert np.array_equal(content_identity.document_hashes(lengths, tokens.astype(dtype)), hashes)
    # a document hashes alike whatever precedes it
    alone = content_identity.document_hashes(lengths[7:8], tokens[lengths[:7].sum():lengths[:8].sum()])
    assert alone[0] == hashes[7]
    # one token changed, two tokens swapped, one token dropped or appended: another hash, for every document
    ends = np.cumsum(lengths)
    changed, swapped = tokens.copy(), tokens.copy()
    i = ends - 1 - rng.integers(0, lengths)  # a token of each document
    changed[i] = (changed[i] + 1 + rng.integers(0, 100, len(i))) % 65535
    two = lengths > 1
    a, b = (ends - lengths)[two], (ends - 1)[two]
    keep = tokens[a] != tokens[b]
    a, b = a[keep], b[keep]
    swapped[a], swapped[b] = tokens[b], tokens[a]
    assert not np.any(content_identity.document_hashes(lengths, changed) == hashes)
    differs = content_identity.document_hashes(lengths, swapped) != hashes
    assert differs.sum() == len(a) > 1000
    shorter = np.delete(tokens, ends - 1)
    assert not np.any(content_identity.document_hashes(lengths - 1, shorter)[two] == hashes[two])
    # hashing in blocks of whole documents gives what one block gives
    old = content_identity._BLOCK_TOKENS
    content_identity._BLOCK_TOKENS = 37
    try:
        assert np.array_equal(content_identity.document_hashes(lengths, tokens), hashes)
    finally:
        content_identity._BLOCK_TOKENS = old


def test_empty_documents_are_hashed_and_never_sampled():
    lengths, tokens = np.array([0, 2, 0, 0, 2, 0]), np.array([3, 4, 3, 4], np.uint16)
    hashes = content_identity.document_hashes(lengths, tokens)
    assert hashes[1] == hashes[4] and hashes[0] == hashes[2] == hashes[3] == hashes[5] != hashes[1]
    rate = content_identity.SAMPLE_RATE
    content_identity.SAMPLE_RATE = 1  # every document a multiple: only the ones with tokens are kept
    try:
        assert [i for i, _ in sampled_documents(lengths, tokens)] == [1, 4]
        assert sampled_documents(np.zeros(3, np.int64), np.zeros(0, np.uint16)) == []
        assert sampled_documents(np.zeros(0, np.int64), np.zeros(0, np.uint16)) == []
    finally:
        content_identity.SAMPLE_RATE = rate
    with pytest.raises(ValueError, match="5 tokens for documents of 4"):
        content_identity.document_hashes(lengths, np.arange(5))


@pytest.mark.parametrize("low, high", [(1, 4), (20, 21), (200, 800)])
def test_the_sample_keeps_about_one_document_in_1024(low, high):
    """The low bits that choose the sample are well mixed: on random documents (short ones too, where
    few tokens feed a hash) the number kept is Binomial(n, 1/1024), within 5 standard deviations."""
    rng = np.random.default_rng(low)
    n = 1_000_000 if high <= 21 else 40_000
    lengths, tokens = _random_documents(rng, n, low, high)
    kept = sampled_documents(lengths, tokens)
    p = 1 / content_identity.SAMPLE_RATE
    assert abs(len(kept) - n * p) <= 5 * (n * p * (1 - p)) ** 0.5, (len(kept), n * p)
    hashes = content_identity.document_hashes(lengths, tokens)
    assert all(h == hashes[i] and h % content_identity.SAMPLE_RATE == 0 for i, h in kept)
    # each of the 10 low bits on its own is set in about half of the hashes
    bits = (hashes[:, None] >> np.arange(10, dtype=np.uint64)) & np.uint64(1)
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) <= 5 * (0.25 / n) ** 0.5)


def test_a_sample_of_another_scheme_is_not_judged(runs, tmp_path):
    """Manifests written with an earlier scheme (blake2b of the stored bytes) hold other hashes: not compared."""
    import shutil
    d = tmp_path / "old"
    d.mkdir()
    for f in runs["dir"].iterdir():
        if f.name.startswith("valid_text_document"):
            shutil.copy(f, d / f.name)
    family = d / "valid_text_document.shards.json"
    m = json.loads(family.read_text())
    assert recorded_sample(str(d / "valid_text_document")) is not None
    for e in m["datasets"]:
        e[SAMPLE_FIELD]["scheme"] = "blake2b-64 of the ids as stored, hash % 1024 == 0"
    family.write_text(json.dumps(m))
    assert recorded_sample(str(d / "valid_text_document")) is None


def test_a_validation_set_tokenized_again_from_training_texts_is_refused(runs, sp_model, tmp_path):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.data_checks import data_problems

    def problems(train, valid):
        return data_problems(load_config(None, [
            "model.preset=test", "model.vocab_size=320", f"data.paths=[{train}]", f"data.tokenizer_model={sp_model}",
            "data.split=100", f"data.valid_paths=[{valid}]", f"train.run_dir={tmp_path / 'run'}"]))

    found = problems(runs["train"], runs["valid"])
    assert len(found) == 1, found
    assert found[0].startswith(f"data.valid_paths: {runs['valid']}: ") and "tokenized again" in found[0], found
    assert "are in the training datasets' samples too: it holds about 100% of its documents in common" in found[0]
    assert problems(runs["train"], runs["held"]) == []
    # a merge of the training shards carries their samples (the union): the same verdict
    shards, _ = _shards(runs["train"])
    merged = str(runs["dir"] / "merged")
    merge_datasets(shards, merged)
    assert len(recorded_sample(merged)) == len(training_sample(shards))
    assert problems(merged, runs["valid"])[0].startswith(f"data.valid_paths: {runs['valid']}: ")


def test_a_merge_lineage_is_named_as_such_not_as_documents_tokenized_again(runs, sp_model, tmp_path):
    """A validation set merged from training shards (or a training set merged from the validation set)
    shares its content sample too; the merge's manifest names the cause: one problem, in its words."""
    from megatron_osp.training.config import load_config
    from megatron_osp.training.data_checks import data_problems

    def problems(train, valid):
        return data_problems(load_config(None, [
            "model.preset=test", "model.vocab_size=320", f"data.paths=[{train}]", f"data.tokenizer_model={sp_model}",
            "data.split=100", f"data.valid_paths=[{valid}]", f"train.run_dir={tmp_path / 'run'}"]))

    shards, _ = _shards(runs["train"])
    valid = str(tmp_path / "valid_merged")
    merge_datasets(shards[:2], valid)
    found = problems(runs["train"], valid)
    assert len(found) == 1 and "was merged from" in found[0] and "tokenized again" not in found[0], found
    train = str(tmp_path / "train_merged")
    merge_datasets([runs["valid"], runs["held"]], train)
    found = problems(train, runs["valid"])
    assert len(found) == 1 and "was merged from" in found[0] and "tokenized again" not in found[0], found


@pytest.mark.parametrize("shared, sampled, refused", [(3, 6, False), (4, 6, False), (5, 6, True), (3, 3, True),
                                                      (2, 2, False), (8, 10, True), (7, 10, False)])
def test_only_a_set_most_of_whose_sample_training_holds_is_refused(monkeypatch, shared, sampled, refused):
    """Documents tokenized again are all in training's sample; a held-out part of an un-deduplicated
    crawl shares some exact duplicates, and a small sample of it can reach half by chance (6 sampled
    documents of a set 30% of which training holds: 26%). The bar is 4/5 of the sample and 3 documents."""
    mine = np.arange(1, sampled + 1, dtype=np.uint64) * 1024
    pool = np.concatenate([mine[:shared], np.arange(1, 50, dtype=np.uint64) * 1024 + 10 ** 9])
    monkeypatch.setattr(content_identity, "recorded_sample", lambda prefix: mine)
    note = content_identity.retokenized_overlap(["valid"], np.unique(pool))
    assert (note is not None) == refused, note
    if refused:
        assert note.startswith(f"{shared} of the {sampled} documents its content sample holds")
