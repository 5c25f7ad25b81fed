"""Tokenizer fingerprints (megatron_osp/data/tokenizer_identity.py): files that encode alike share one
whatever their bytes, and any change that changes ids changes it. Each "same" case also checks the ids
really are the same, and each "different" case that the files really are tokenizers."""

import io
import json
import random

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from megatron_osp.data.tokenizer_identity import SP_TRAINING_ONLY, same_tokenizer, tokenizer_fingerprint

WORDS = "the quick brown fox jumps over lazy dog 123 4567 hello world naïve café".split()
_rng = random.Random(0)
LINES = [" ".join(_rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
PROBES = LINES[:20] + ["  x  y 99999 日本 \t\n", "fooooo barrrr", "<|endoftext|>the fox<|endoftext|>", "Hello World"]


# --- Hugging Face tokenizer.json ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_json():
    """A byte-level BPE tokenizer.json as the current library writes it (with a post-processor and a
    decoder, which do not change the ids preprocessing writes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", 0)])
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _ids(text):
    return [e.ids for e in Tokenizer.from_str(text).encode_batch(PROBES, add_special_tokens=False)]


def _old_style(d):
    """``d`` as older tokenizers wrote it: merges as "a b" strings, no ignore_merges or byte_fallback in
    the model, no use_regex in ByteLevel."""
    d = json.loads(json.dumps(d))
    d["model"]["merges"] = [" ".join(m) for m in d["model"]["merges"]]
    for key in ("ignore_merges", "byte_fallback"):
        del d["model"][key]
    del d["pre_tokenizer"]["use_regex"]
    return d


def test_hf_reserialized_tokenizer_keeps_its_fingerprint(hf_json, tmp_path):
    d = json.loads(hf_json)
    base = _write(tmp_path, "base.json", hf_json)
    variants = {
        "key order and whitespace": json.dumps(dict(reversed(list(d.items()))), indent=4, sort_keys=False),
        "old merges format, defaults left out": json.dumps(_old_style(d)),
        "old file re-saved by this library": Tokenizer.from_str(json.dumps(_old_style(d))).to_str(pretty=True),
        "no version string": json.dumps({k: v for k, v in d.items() if k != "version"}),
        "no post-processor or decoder": json.dumps({**d, "post_processor": None, "decoder": None}),
        "added tokens listed in another order": json.dumps({**d, "added_tokens": d["added_tokens"][::-1]}),
    }
    want = tokenizer_fingerprint(base)
    assert want.startswith("hf1:")
    for name, text in variants.items():
        path = _write(tmp_path, "v.json", text)
        assert path.read_bytes() != base.read_bytes(), name
        assert _ids(text) == _ids(hf_json), name  # the premise: these encode alike
        assert tokenizer_fingerprint(path) == want, name


def test_hf_old_metaspace_is_read_as_its_prepend_scheme(tmp_path):
    """Older tokenizers wrote Metaspace's add_prefix_space; the library reads it as prepend_scheme
    "always" and split true, and re-saves it so."""
    old = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
           "post_processor": None, "decoder": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False,
                     "vocab": {"a": 0, "b": 1, "ab": 2, "\u2581": 3, "\u2581ab": 4}, "merges": ["a b", "\u2581 ab"]}}
    resaved = Tokenizer.from_str(json.dumps(old)).to_str()
    assert '"prepend_scheme":"always"' in resaved and "add_prefix_space" not in resaved
    assert _ids(resaved) == _ids(json.dumps(old))
    fp = tokenizer_fingerprint(_write(tmp_path, "old.json", json.dumps(old)))
    assert tokenizer_fingerprint(_write(tmp_path, "new.json", resaved)) == fp
    never = json.loads(resaved)
    never["pre_tokenizer"]["prepend_scheme"] = "never"
    assert _ids(json.dumps(never)) != _ids(resaved)
    assert tokenizer_fingerprint(_write(tmp_path, "never.json", json.dumps(never))) != fp


def test_hf_truncation_and_padding_are_turned_off_so_they_change_no_id(hf_json, tmp_path):
    """A tokenizer.json saved for a model's inputs with truncation (max_length 8) and padding: the
    library's encode_batch cut every document to 8 ids and padded short ones, and preprocessing wrote
    that without a word. HFTokenizer turns both off (and says so in the EOD line preprocessing prints),
    so the file is the same tokenizer as the one without them, in ids and in fingerprint."""
    from megatron_osp.data.preprocess import eod_note
    from megatron_osp.data.tokenizer import HFTokenizer

    tok = Tokenizer.from_str(hf_json)
    tok.enable_truncation(8)
    tok.enable_padding(pad_id=0, pad_token="<|endoftext|>")
    cut = _write(tmp_path, "cut.json", tok.to_str())
    plain = _write(tmp_path, "plain.json", hf_json)
    docs = [" ".join(PROBES) * 3, "a"]
    assert [len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False)] == [8, 8]  # what it did
    ours = HFTokenizer(cut, eod_token="<|endoftext|>")
    whole = HFTokenizer(plain, eod_token="<|endoftext|>")
    for word_cache in (True, False):
        ours._word_cache = whole._word_cache = None if word_cache else False
        assert [list(x) for x in ours.encode_batch(docs)] == [list(x) for x in whole.encode_batch(docs)]
    assert len(ours.encode_batch(docs)[0]) > 8 and ours.switched_off == ["truncation to 8 tokens", "padding"]
    assert "truncation to 8 tokens and padding turned off" in eod_note(ours, "<|endoftext|>")
    assert whole.switched_off == [] and "turned off" not in eod_note(whole, "<|endoftext|>")
    assert tokenizer_fingerprint(cut) == tokenizer_fingerprint(plain)


def _swap_vocab_ids(d):
    a, b = sorted(d["model"]["vocab"])[100:102]
    v = d["model"]["vocab"]
    v[a], v[b] = v[b], v[a]


def _swap_merges(d):
    m = d["model"]["merges"]
    m[0], m[1] = m[1], m[0]


CHANGES = {
    "two vocabulary ids swapped": _swap_vocab_ids,
    "two merges in the other order": _swap_merges,
    "a lowercasing normalizer": lambda d: d.update(normalizer={"type": "Lowercase"}),
    "an added special token": lambda d: d["added_tokens"].append(
        {"id": 300, "content": "<mask>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}),
    "an added token's lstrip": lambda d: d["added_tokens"][0].update(lstrip=True),
    "ByteLevel add_prefix_space": lambda d: d["pre_tokenizer"].update(add_prefix_space=True),
    "BPE dropout": lambda d: d["model"].update(dropout=0.5),
}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_hf_changes_of_the_ids_change_the_fingerprint(hf_json, tmp_path, change):
    d = json.loads(hf_json)
    CHANGES[change](d)
    changed = json.dumps(d)
    Tokenizer.from_str(changed)  # still a tokenizer the library reads
    assert tokenizer_fingerprint(_write(tmp_path, "c.json", changed)) != \
        tokenizer_fingerprint(_write(tmp_path, "base.json", hf_json))


# --- SentencePiece ------------------------------------------------------------------------------------

def _train(model_type, **options):
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_writer=out, model_type=model_type,
                                   byte_fallback=True, minloglevel=2, num_threads=1,
                                   **{"vocab_size": 300, **options})
    return out.getvalue()


def _sp_ids(data):
    return spm.SentencePieceProcessor(model_proto=data).encode(PROBES)


def _edit(data, edit):
    proto = model_pb2.ModelProto()
    proto.ParseFromString(data)
    edit(proto)
    return proto.SerializeToString()


def _other_value(spec, name):
    """Set ``spec.name`` to a value other than its current one."""
    field = spec.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        getattr(spec, name).append("x" if field.type == field.TYPE_STRING else b"x")
    elif field.type == field.TYPE_BOOL:
        setattr(spec, name, not getattr(spec, name))
    elif field.type == field.TYPE_STRING:
        setattr(spec, name, getattr(spec, name) + "/elsewhere")
    elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
        setattr(spec, name, getattr(spec, name) * 0.5 + 0.125)
    else:
        setattr(spec, name, getattr(spec, name) + 3)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sp_training_only_fields_leave_ids_and_fingerprint_alone(tmp_path, model_type):
    """Each cleared TrainerSpec field, changed: the encoder gives the same ids (so clearing it is right)
    and the fingerprint is the same; the file's bytes differ."""
    data = _train(model_type)
    base = tmp_path / "base.model"
    base.write_bytes(data)
    want = tokenizer_fingerprint(base)
    assert want.startswith("sp1:")
    for name in SP_TRAINING_ONLY:
        edited = _edit(data, lambda p: _other_value(p.trainer_spec, name))
        assert edited != data, name
        assert _sp_ids(edited) == _sp_ids(data), name
        (tmp_path / "e.model").write_bytes(edited)
        assert tokenizer_fingerprint(tmp_path / "e.model") == want, name


def test_sp_trained_twice_from_other_paths_is_one_tokenizer(tmp_path):
    """Two real training runs on copies of one corpus, with other input and output paths and sampling
    sizes that sample everything: byte-different files (the paths are recorded), one fingerprint."""
    models_ = []
    for i, sample in ((0, 0), (1, 1_000_000)):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "corpus.txt").write_text("\n".join(LINES) + "\n")
        spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / f"tok{i}"), vocab_size=300,
                                       model_type="bpe", byte_fallback=True, num_threads=1, minloglevel=2,
                                       input_sentence_size=sample)
        models_.append(d / f"tok{i}.model")
    a, b = models_
    assert a.read_bytes() != b.read_bytes()
    assert _sp_ids(a.read_bytes()) == _sp_ids(b.read_bytes())
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def _swap_pieces(p):
    a, b = p.pieces[300 - 20], p.pieces[300 - 19]
    a.piece, b.piece = b.piece, a.piece


SP_CHANGES = {
    "two pieces' ids swapped": _swap_pieces,
    "a piece's score": lambda p: setattr(p.pieces[280], "score", p.pieces[280].score - 100),
    "add_dummy_prefix off": lambda p: setattr(p.normalizer_spec, "add_dummy_prefix", False),
    "a piece made user-defined": lambda p: setattr(p.pieces[280], "type", p.SentencePiece.USER_DEFINED),
    "whitespace as suffix": lambda p: setattr(p.trainer_spec, "treat_whitespace_as_suffix", True),
    "another eos piece": lambda p: setattr(p.trainer_spec, "eos_piece", "<eos>"),
}


@pytest.mark.parametrize("change", SP_CHANGES, ids=list(SP_CHANGES))
def test_sp_changes_of_the_ids_change_the_fingerprint(tmp_path, change):
    data = _train("bpe")
    (tmp_path / "a.model").write_bytes(data)
    (tmp_path / "b.model").write_bytes(_edit(data, SP_CHANGES[change]))
    spm.SentencePieceProcessor(model_file=str(tmp_path / "b.model"))  # still a model SentencePiece reads
    assert tokenizer_fingerprint(tmp_path / "a.model") != tokenizer_fingerprint(tmp_path / "b.model")


def test_sp_other_training_is_another_tokenizer(tmp_path):
    for name, data in (("a", _train("bpe")), ("b", _train("bpe", vocab_size=310)), ("c", _train("unigram"))):
        (tmp_path / f"{name}.model").write_bytes(data)
    fps = {tokenizer_fingerprint(tmp_path / f"{n}.model") for n in "abc"}
    assert len(fps) == 3


def test_not_a_tokenizer_is_named(tmp_path):
    for name, data in (("x.json", b"{not json"), ("x.model", b"\x00\x01garbage"), ("e.model", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            tokenizer_fingerprint(tmp_path / name)


def test_records_compare_by_fingerprint_else_by_sha():
    a = {"tokenizer_sha256": "1" * 64, "tokenizer_fingerprint": "hf1:aa"}
    assert same_tokenizer(a, {"tokenizer_sha256": "2" * 64, "tokenizer_fingerprint": "hf1:aa"}) is True
    assert same_tokenizer(a, {"tokenizer_sha256": "1" * 64, "tokenizer_fingerprint": "hf1:bb"}) is False
    assert same_tokenizer(a, {"tokenizer_sha256": "2" * 64}) is False  # an old manifest: the file decides
    assert same_tokenizer(a, {"tokenizer_sha256": "1" * 64}) is True
    assert same_tokenizer(a, {"tokenizer_sha256": "2" * 64, "tokenizer_fingerprint": "hf2:cc"}) is False
    assert same_tokenizer(a, {}) is None


def test_a_mix_of_manifests_is_judged_pair_by_pair_in_any_order():
    """check_same_tokens compared every dataset with the first only: A (file X, no fingerprint), B (file X,
    fingerprint F) and C (file Y, fingerprint F) are one tokenizer, but were refused in the order A, B, C
    (A against C: other files) and accepted in B, A, C; and with a first dataset comparable to none of
    the others (a fingerprint alone), two of other files passed."""
    from itertools import permutations

    from megatron_osp.data.shardset import check_same_tokens

    x, y, z = "1" * 64, "2" * 64, "3" * 64
    fine = {"A": {"tokenizer_sha256": x}, "B": {"tokenizer_sha256": x, "tokenizer_fingerprint": "hf1:f"},
            "C": {"tokenizer_sha256": y, "tokenizer_fingerprint": "hf1:f"}, "C2": {"tokenizer_sha256": y}}
    for order in permutations(fine):
        check_same_tokens({p: fine[p] for p in order})
    bad = {"F": {"tokenizer_fingerprint": "hf1:f"}, "P": {"tokenizer_sha256": x}, "Q": {"tokenizer_sha256": z}}
    for order in permutations(bad):
        with pytest.raises(ValueError, match=r"^(Q: made with another tokenizer than P|P: made with another "
                                             r"tokenizer than Q) \(their manifests record tokenizer files of sha256"):
            check_same_tokens({p: bad[p] for p in order})
    # Fingerprints of one scheme that differ are refused even where a file joins them (as same_tokenizer).
    odd = {"A": {"tokenizer_sha256": x, "tokenizer_fingerprint": "hf1:f"},
           "B": {"tokenizer_sha256": x, "tokenizer_fingerprint": "hf1:g"}}
    with pytest.raises(ValueError, match=r"^B: made with another tokenizer than A .*which encode differently"):
        check_same_tokens(odd)
    # Nor where a chain joins them: A and B share fingerprint f, B and C a file, C's fingerprint is g.
    with pytest.raises(ValueError, match=r"^C: made with another tokenizer than A .*which encode differently"):
        check_same_tokens({"A": {"tokenizer_sha256": x, "tokenizer_fingerprint": "hf1:f"},
                           "B": {"tokenizer_sha256": y, "tokenizer_fingerprint": "hf1:f"},
                           "C": {"tokenizer_sha256": y, "tokenizer_fingerprint": "hf1:g"}})
