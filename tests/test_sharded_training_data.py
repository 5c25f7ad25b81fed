"""A sharded preprocessing output is trained on by its prefix: ``data.paths=[PREFIX_text_document]``
reads the shards its ``.shards.json`` manifest lists, exactly as if they had been listed one by one.
(It used to stop with "PREFIX_text_document.bin does not exist".)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MASTER_ADDR", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from megatron_osp.data.builtin_corpus import write_corpus
    from megatron_osp.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("sharded")
    write_corpus(d / "corpus.jsonl", max_documents=80)
    model = str(train_sentencepiece(d / "corpus.jsonl", d / "tok", vocab_size=350))
    result = _run([str(REPO / "tools" / "preprocess_data.py"), "--input", str(d / "corpus.jsonl"),
                   "--tokenizer-model", model, "--output-prefix", str(d / "corpus"), "--append-eod",
                   "--max-shard-tokens", "40000", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    family = str(d / "corpus_text_document")
    shards = [str(d / d_["name"]) for d_ in json.loads(Path(family + ".shards.json").read_text())["datasets"]]
    assert len(shards) >= 3 and not os.path.exists(family + ".bin")
    return {"family": family, "shards": shards, "tokenizer": model}


def _train(paths, run_dir, *extra):
    return _run(["-m", "megatron_osp.training.pretrain", "model.preset=test", "model.vocab_size=384",
                 f"data.paths=[{','.join(paths)}]", "data.split=70,30,0", *extra, "train.train_steps=3",
                 "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
                 "train.log_interval=1", "train.eval_batches=1", "train.tensorboard=false",
                 "train.progress_bar=false", "train.kurtosis_interval=0", f"train.run_dir={run_dir}"])


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_sharded_prefix_trains_on_its_shards_as_if_listed(sharded, tmp_path):
    tok = f"data.tokenizer_model={sharded['tokenizer']}"
    by_prefix = _train([sharded["family"]], tmp_path / "prefix", tok)
    assert by_prefix.returncode == 0, by_prefix.stderr[-3000:]
    listed = _train(sharded["shards"], tmp_path / "listed", tok)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert len(_losses(tmp_path / "prefix")) == 3
    assert _losses(tmp_path / "prefix") == _losses(tmp_path / "listed")


def test_a_sharded_prefix_with_one_weight_is_refused_by_name(sharded, tmp_path):
    result = _train([sharded["family"]], tmp_path / "run", f"data.tokenizer_model={sharded['tokenizer']}",
                    "data.weights=[1.0]")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{sharded['family']} is a sharded output ({len(sharded['shards'])} datasets)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_data_of_another_tokenizer_of_the_same_size_is_refused_by_name(sharded, tmp_path):
    """Two tokenizers of 350 pieces give the same dtype and id range, so nothing else tells their data
    apart: the manifests' tokenizer hashes do (it used to train on the mix)."""
    from megatron_osp.data.preprocess import preprocess
    from megatron_osp.data.tokenizer import train_sentencepiece
    from megatron_osp.training.config import load_config
    from megatron_osp.data.tokenizer_identity import tokenizer_fingerprint
    from megatron_osp.training.data_checks import data_problems

    corpus = Path(sharded["tokenizer"]).parent / "corpus.jsonl"
    other = str(train_sentencepiece(corpus, tmp_path / "other", vocab_size=350, sample_documents=60))
    preprocess([str(corpus)], other, str(tmp_path / "o"), progress=False)
    mine, theirs = sharded["shards"][0], str(tmp_path / "o_text_document")

    def problems(paths, tokenizer):
        return data_problems(load_config(None, ["model.vocab_size=384", f"data.paths=[{','.join(paths)}]",
                                                f"data.tokenizer_model={tokenizer}"]))

    assert problems([sharded["family"]], sharded["tokenizer"]) == []
    assert problems([mine, theirs], sharded["tokenizer"]) == [
        f"data.paths: {theirs}: made with another tokenizer than {mine} (their manifests record tokenizer files "
        f"of sha256 {_sha(other)[:12]} and {_sha(sharded['tokenizer'])[:12]}, which encode differently: "
        f"tokenizer_fingerprint {tokenizer_fingerprint(other)[:16]} and {tokenizer_fingerprint(sharded['tokenizer'])[:16]}"
        "); datasets of different tokenizers cannot be merged or trained on together"]
    assert problems([theirs], sharded["tokenizer"]) == [
        f"data.paths: {theirs} was made with another tokenizer than data.tokenizer_model={sharded['tokenizer']} "
        f"(its manifest records a tokenizer file of sha256 {_sha(other)[:12]}, which encodes differently)"]


def test_data_of_a_byte_different_copy_of_the_tokenizer_trains_with_it(sharded, tmp_path):
    """A copy of the SentencePiece model whose training-only fields (input path, threads) differ has other
    bytes but makes the same ids: its data mixes with the original's, and either file is accepted as
    data.tokenizer_model (the sha256 refused both). Manifests without fingerprints still go by the sha256."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    from megatron_osp.data.preprocess import preprocess

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(sharded["tokenizer"]).read_bytes())
    proto.trainer_spec.input[:] = ["/elsewhere/corpus.txt"]
    proto.trainer_spec.num_threads += 7
    copy = tmp_path / "copy.model"
    copy.write_bytes(proto.SerializeToString())
    assert _sha(copy) != _sha(sharded["tokenizer"])
    corpus = Path(sharded["tokenizer"]).parent / "corpus.jsonl"
    preprocess([str(corpus)], str(copy), str(tmp_path / "c"), progress=False)
    mine, theirs = sharded["shards"][0], str(tmp_path / "c_text_document")
    assert _problems([mine, theirs], sharded["tokenizer"]) == []
    assert _problems([mine, theirs], str(copy)) == []
    assert _problems([sharded["family"]], str(copy)) == []
    manifest = Path(theirs + ".shards.json")
    m = json.loads(manifest.read_text())
    del m["tokenizer_fingerprint"]  # as written before fingerprints were
    manifest.write_text(json.dumps(m))
    assert _problems([theirs], str(copy)) == []  # same file: same sha256
    assert _problems([mine, theirs], str(copy))[0].startswith(f"data.paths: {theirs}: made with another tokenizer ")
    assert _problems([theirs], sharded["tokenizer"])[0].startswith(f"data.paths: {theirs} was made with another ")


def _sha(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()



def _problems(paths, tokenizer):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.data_checks import data_problems

    return data_problems(load_config(None, ["model.vocab_size=384", f"data.paths=[{','.join(map(str, paths))}]",
                                            f"data.tokenizer_model={tokenizer}"]))


@pytest.mark.parametrize("ext", [".bin", ".idx"])
def test_a_data_path_with_its_extension_is_refused_naming_the_prefix(sharded, ext):
    """It said "X.bin.bin and X.bin.idx does not exist"."""
    shard = sharded["shards"][0]
    assert _problems([shard + ext], sharded["tokenizer"]) == [
        f"data.paths: {shard}{ext} is a file name, not a dataset prefix: give the prefix without {ext}, {shard}"]


def test_a_hugging_face_tokenizer_as_tokenizer_model_is_refused_with_the_settings_to_use(sharded, tmp_path):
    """It said "not a SentencePiece model": training takes data.eod_id (and model.vocab_size) instead."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "<|endoftext|>": 7}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    way_out = (f"data.tokenizer_model='{tmp_path / 'tokenizer.json'}' is a Hugging Face tokenizer.json, but training "
               "reads only SentencePiece .model files: leave data.tokenizer_model unset and set data.eod_id=")
    assert _problems([sharded["family"]], tmp_path / "tokenizer.json")[0] == (
        way_out + "2 (the id the data's manifest records) and model.vocab_size >= 8")
    os.rename(tmp_path / "tokenizer.json", tmp_path / "tok.model")  # the name does not matter; no data: its guess
    assert _problems([], tmp_path / "tok.model")[1] == (
        way_out.replace("tokenizer.json'", "tok.model'") + "7 (its '<|endoftext|>', if that is the token "
        "preprocessing used) and model.vocab_size >= 8")


def test_one_dataset_at_two_entries_of_data_paths_is_refused_naming_both(sharded, tmp_path):
    """The same prefix listed twice (another spelling, a link, a family and one of its shards) was
    blended as two datasets: most likely a mistake; each pair is named by its entries, with the summed
    weight to give instead."""
    family, (first, second) = sharded["family"], sharded["shards"][:2]
    link = tmp_path / "link"
    for ext in (".bin", ".idx"):
        os.symlink(first + ext, str(link) + ext)
    assert _problems([first, second, os.path.relpath(first)], sharded["tokenizer"]) == [
        f"data.paths: entries 0 ({first}) and 2 ({os.path.relpath(first)}) are the same dataset, most likely by "
        "mistake (it would be drawn for both entries); give it once (to draw more of it, set data.weights: a "
        "weight per entry)"]
    from megatron_osp.training.config import load_config
    from megatron_osp.training.data_checks import data_problems

    weighted = data_problems(load_config(None, ["model.vocab_size=384", f"data.paths=[{first},{second},{link}]",
                                                "data.weights=[0.5,1,2]", f"data.tokenizer_model={sharded['tokenizer']}"]))
    assert weighted == [
        f"data.paths: entries 0 ({first}) and 2 ({link}) are the same dataset, most likely by mistake (it would be "
        "drawn for both entries); give it once, with the two weights summed (data.weights entries 0 and 2: "
        "0.5 + 2 = 2.5)"]
    assert _problems([family, second], sharded["tokenizer"]) == [
        f"data.paths: entries 0 ({family}) and 1 ({second}) both hold {second}, most likely by mistake (it would "
        "be drawn for both entries); give it once (to draw more of it, set data.weights: a weight per entry)"]
    assert _problems([family], sharded["tokenizer"]) == _problems([first, second], sharded["tokenizer"]) == []
