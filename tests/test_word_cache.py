"""The word cache gives exactly SentencePiece's ids, for every model kind it accepts, and refuses
the models where it could not."""

import random
import zlib

import numpy as np
import pytest
import sentencepiece as spm

from megatron_osp.data.builtin_corpus import iter_documents
from megatron_osp.data.word_cache import WordCacheEncoder, unsupported_reason
from sentencepiece import sentencepiece_model_pb2 as model_pb2

ODD = ["é", "ü", "漢", "字", "🙂", "Ａ", "ﬁ", "\x00", "\x01", "\x7f", "\u200b", "\u3000", "\u00a0", "①", "™",
       "\u0301", "ß", "İ", "\ufeff", "𝔘"]
SEPARATORS = [" ", "  ", "\t", "\n", "\r\n", "   \n  ", "\n\n\n", "    "]


@pytest.fixture(scope="module")
def lines():
    out = []
    for doc in iter_documents(include_source=True):
        out += [x for x in doc.splitlines() if x.strip()]
        if len(out) > 30_000:
            break
    return out


def _train(tmp_path, lines, name, **options):
    prefix = str(tmp_path / name)
    defaults = dict(vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2)
    defaults.update(options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, **defaults)
    return prefix + ".model"


def _random_texts(lines, n, seed):
    """Corpus words joined by whitespace runs, with odd characters, control bytes, leading and
    trailing whitespace, long unbroken runs, and empty texts."""
    rng = random.Random(seed)
    words = " ".join(lines[:3000]).split()
    texts = ["", " ", "\n\t ", "a", "x" * 400, "\x14", "\x00\x01", "\x14\x14 ", " \x14", "a \x14 b", "\x7f"]
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 60)):
            w = rng.choice(words)
            if rng.random() < 0.15:
                k = rng.randrange(len(w) + 1)
                w = w[:k] + rng.choice(ODD) + w[k:]
            parts.append(w)
            parts.append(rng.choice(SEPARATORS) if rng.random() < 0.4 else " ")
        text = "".join(parts)
        if rng.random() < 0.3:
            text = rng.choice(SEPARATORS) + text
        texts.append(text)
    # All ASCII, many of them short (texts that are only control characters, only spaces).
    texts += ["".join(chr(rng.randrange(128)) for _ in range(rng.choice([1, 2, 3, rng.randint(1, 80)])))
              for _ in range(300)]
    return texts


MODELS = {
    "default": {},  # what our train_sentencepiece does
    "keeps_whitespace": dict(remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                             split_digits=True),  # code: runs of spaces are pieces ("▁▁▁▁")
    "no_dummy_prefix": dict(add_dummy_prefix=False),
    "identity_normalizer": dict(normalization_rule_name="identity"),
    "nfkc_cf": dict(normalization_rule_name="nfkc_cf"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_ids_as_sentencepiece(tmp_path, lines, name):
    model = _train(tmp_path, lines, name, **MODELS[name])
    sp = spm.SentencePieceProcessor(model_file=model)
    enc = WordCacheEncoder.for_model(model)
    assert enc is not None, unsupported_reason(model_pb2.ModelProto.FromString(open(model, "rb").read()))
    texts = _random_texts(lines, 400, seed=zlib.crc32(name.encode()))
    expected = sp.encode(texts)
    for start in range(0, len(texts), 64):  # in chunks: later chunks hit the cache
        got = enc.encode_batch(texts[start:start + 64])
        for text, g, e in zip(texts[start:start + 64], got, expected[start:start + 64]):
            assert g.tolist() == e, repr(text)
    assert len(enc) > 100
    # A second pass, every word cached, and the flat form.
    ids, lengths = enc.encode_flat(texts)
    assert ids.tolist() == [t for e in expected for t in e]
    assert lengths.tolist() == [len(e) for e in expected]


@pytest.mark.parametrize("name", ["default", "keeps_whitespace", "no_dummy_prefix", "nfkc_cf"])
def test_ascii_normalization_matches_sentencepiece(tmp_path, lines, name):
    model = _train(tmp_path, lines, name, **MODELS[name])
    sp = spm.SentencePieceProcessor(model_file=model)
    cache = WordCacheEncoder(model)._cache
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(128)] + [" "] * 40 + ["\n", "\t"] * 10
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert cache.normalize_ascii(text).decode() == sp.normalize(text), repr(text)


def test_full_cache_and_long_words_stay_exact(tmp_path, lines):
    """Words the cache does not keep (it is full, or they are too long) are encoded every time."""
    model = _train(tmp_path, lines, "small")
    sp = spm.SentencePieceProcessor(model_file=model)
    enc = WordCacheEncoder(model, max_entries=20, max_word_bytes=6)
    texts = _random_texts(lines, 150, seed=3)
    for start in range(0, len(texts), 32):
        got = enc.encode_batch(texts[start:start + 32])
        assert [g.tolist() for g in got] == sp.encode(texts[start:start + 32])
    assert len(enc) == 20


def test_bpe_of_single_words(tmp_path, lines):
    model = _train(tmp_path, lines, "w")
    proto = model_pb2.ModelProto.FromString(open(model, "rb").read())
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    raw = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    cache = WordCacheEncoder(model)._cache
    words = {"▁" + w for line in lines[:2000] for w in line.split()} | {"▁" + o * 3 for o in ODD if o.strip()}
    for w in sorted(words):
        assert cache.bpe(w) == raw.encode(w), w


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(model_type="unigram"), "model type UNIGRAM"),
        (dict(byte_fallback=False), "no byte fallback"),
        (dict(user_defined_symbols=["<tool>"]), "user_defined piece '<tool>'"),
        (dict(split_by_whitespace=False), "spans a word boundary"),
        (dict(treat_whitespace_as_suffix=True), "treat_whitespace_as_suffix"),
    ],
)
def test_models_it_cannot_copy_are_refused(tmp_path, lines, options, reason):
    model = _train(tmp_path, lines, "r", **options)
    with pytest.raises(ValueError, match=reason):
        WordCacheEncoder(model)
    assert WordCacheEncoder.for_model(model) is None  # preprocessing then calls SentencePiece


def test_tokenizer_uses_it_and_can_be_told_not_to(tmp_path, lines):
    from megatron_osp.data.tokenizer import SentencePieceTokenizer

    model = _train(tmp_path, lines, "t")
    texts = _random_texts(lines, 50, seed=5)
    with_cache, without = SentencePieceTokenizer(model), SentencePieceTokenizer(model, word_cache=False)
    a, b = with_cache.encode_flat(texts, threads=1), without.encode_flat(texts, threads=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert with_cache._word_cache and without._word_cache is False
