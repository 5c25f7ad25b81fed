"""Preprocessing with tokenizers built like widely used models' (trained here, offline), on text that
real corpora hold.

Families: Hugging Face ``tokenizer.json`` of GPT-2 (byte-level BPE), Llama-3 / tiktoken (Split with a
cl100k-like pattern, ByteLevel without its regex, ignore_merges), Qwen (NFC, Split, ByteLevel), ChatML
specials and added tokens with lstrip / single_word, Mistral / Llama-2 (Metaspace, BPE with byte
fallback), BERT WordPiece (lowercase, accents stripped, by BertNormalizer and by NFD + StripAccents),
T5-style Unigram; SentencePiece ``.model`` BPE and Unigram, byte fallback on and off, no dummy
prefix, Llama-style (identity normalization, whitespace kept, digits split), user-defined symbols.

For each, the documents preprocessing writes (workers 1 and 2, word cache on and off), read back by
our IndexedDataset and by Megatron-Core's, are the library's own encoding of each text
(``Tokenizer.encode(text, add_special_tokens=False)``, ``SentencePieceProcessor.encode``) plus EOD,
empty ones dropped, a lone surrogate skipped as a bad record. The end-of-document token is guessed
as the family's EOS (a special token before an ordinary piece of another candidate's spelling), or
refused naming the special tokens (BERT).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.preprocess import preprocess
from megatron_osp.data.tokenizer import HFTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello, world! It's a test.", "日本語のテキスト、中文，한국어 텍스트", "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵",
    "e\u0301 a\u0308 combining \u0345\u20dd", "مرحبا بالعالم שלום עולם \u200f\u200e", "zero\u200bwidth\u200djoin\u200c\ufeff",
    "line one\r\nline two\r\n", "tab\tseparated\t\tvalues\t", "nul\x00 ctrl \x01\x1b[31m \x7f \x85 \u2028 \u2029",
    "a" * 100_000, "word " * 20_000, "x" + "\u00e9" * 5000, "😀" * 3000, "   ", "\n\n\n", "\t \r\n ", "",
    " leading", "trailing ", "  double  spaces  ", "<|endoftext|> literal <|endoftext|>", "</s> <s> <unk> [SEP] [CLS] <eos>",
    "<|im_start|>user\nhi<|im_end|>\n", "<mask> x <mask> hello world, hello worlds", "▁ meta ▁▁ symbol",
    "ＦＵＬＬ ﬁ ½ ² Ǆ ß İ ı", "1234567890123 3.14 0xFF", "I'M SURE they'll SAY it's WE'VE", "\u3000ideographic\u00a0nbsp",
    "\U0001F600\U000E0001 tag \U0010FFFF \ue000", "def f(x):\n    return x ** 2  # square\n",
]
SURROGATE_LINE = '{"text": "half a pair \\ud800 here"}'

# tiktoken's cl100k_base split pattern (Llama-3 uses it), and Qwen2's (digits one by one).
CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN = CL100K.replace(r"\p{N}{1,3}", r"\p{N}")


def _corpus() -> list[str]:
    from megatron_osp.data.builtin_corpus import iter_documents

    docs = []
    for d in iter_documents():
        docs.append(d[:2000])
        if len(docs) == 150:
            break
    return docs + ["日本語のテキストです。中文文本。한국어 🙂 café naïve", "مرحبا بالعالم שלום עולם"] * 5


def _hf(kind: str, docs):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    byte_level = pre_tokenizers.ByteLevel
    bpe = dict(vocab_size=800, initial_alphabet=byte_level.alphabet())

    def split(pattern):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        byte_level(add_prefix_space=False, use_regex=False)])

    if kind in ("gpt2", "chatml"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = byte_level(add_prefix_space=False), decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if kind == "chatml" else [])
        trainer = trainers.BpeTrainer(special_tokens=specials, **bpe)
    elif kind == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer, tok.decoder = split(CL100K), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], **bpe)
    elif kind == "qwen":
        tok = Tokenizer(models.BPE())
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizers.NFC(), split(QWEN), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], **bpe)
    elif kind == "mistral":
        tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"]
                                      + [f"<0x{i:02X}>" for i in range(256)])
    elif kind in ("bert", "bert_nfd"):
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        if kind == "bert":
            tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        else:
            tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(),
                                                   normalizers.StripAccents()])
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=800, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    elif kind == "t5_unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=800, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    elif kind == "gemma_like":  # its EOS is "<eos>"; HTML in the corpus makes "</s>" an ordinary piece
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        docs = ["old <s>price</s> new</s>. x</s>, y</s>z"] * 50 + list(docs)
        trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    else:
        raise KeyError(kind)
    tok.train_from_iterator(docs, trainer)
    first = {"bert": "[CLS]", "llama3": "<|begin_of_text|>", "mistral": "<s>"}.get(kind)
    if first:  # post-processors that add specials only with add_special_tokens=True
        tok.post_processor = processors.TemplateProcessing(single=f"{first} $A", special_tokens=[(first, tok.token_to_id(first))])
    if kind == "chatml":
        tok.add_tokens([AddedToken("<mask>", lstrip=True, special=False, normalized=False),
                        AddedToken("hello world", single_word=True)])
    return tok


SP_OPTIONS = {
    "sp_bpe": {},
    "sp_bpe_no_byte_fallback": dict(byte_fallback=False),
    "sp_bpe_no_dummy_prefix": dict(add_dummy_prefix=False),
    "sp_llama": dict(normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                     allow_whitespace_only_pieces=True),
    "sp_user_symbols": dict(user_defined_symbols=["<|im_start|>", "<|im_end|>", "</s>x"]),
    "sp_unigram": dict(model_type="unigram"),
    "sp_unigram_no_byte_fallback": dict(model_type="unigram", byte_fallback=False),
}
HF_KINDS = ["gpt2", "chatml", "llama3", "qwen", "mistral", "bert", "bert_nfd", "t5_unigram"]
CACHED = {"gpt2", "chatml", "sp_bpe", "sp_bpe_no_dummy_prefix", "sp_llama"}  # the word caches apply


def _sp(path: Path, docs, options) -> Path:
    import sentencepiece as spm

    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    kw = dict(vocab_size=700, model_type="bpe", byte_fallback=True, character_coverage=0.9995, bos_id=1, eos_id=2,
              unk_id=0, pad_id=-1, minloglevel=2, num_threads=1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path), **{**kw, **options})
    return path.with_suffix(".model")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """family -> its tokenizer file, built on first use."""
    root, docs, built = tmp_path_factory.mktemp("families"), _corpus(), {}

    def get(kind: str) -> Path:
        if kind not in built:
            if kind in SP_OPTIONS:
                built[kind] = _sp(root / kind, docs, SP_OPTIONS[kind])
            else:
                built[kind] = root / f"{kind}.json"
                _hf(kind, docs).save(str(built[kind]))
        return built[kind]

    return get


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """TEXTS as JSON lines, every other one with non-ASCII characters written raw, and a lone surrogate
    as the fourth line."""
    lines = [json.dumps({"text": t}, ensure_ascii=i % 2 == 0) for i, t in enumerate(TEXTS)]
    lines.insert(3, SURROGATE_LINE)
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _library_ids(path: Path, texts) -> list[list[int]]:
    if path.suffix == ".model":
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(path)).encode(list(texts))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def _read_both(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset as CoreIndexedDataset

    ours, core = IndexedDataset(prefix), CoreIndexedDataset(prefix)
    got = [ours[i].tolist() for i in range(len(ours))]
    assert [core[i].tolist() for i in range(len(core))] == got
    return got


@pytest.mark.parametrize("kind", HF_KINDS + list(SP_OPTIONS))
def test_written_ids_are_the_library_encoding_plus_eod(tmp_path, build, corpus, kind):
    path = build(kind)
    eod_token = "[SEP]" if kind.startswith("bert") else None
    eod = load_tokenizer(path, eod_token).eod
    expected = [ids + [eod] for ids in _library_ids(path, TEXTS) if ids]
    runs = [(1, True), (2, False)] + ([(2, True), (1, False)] if kind in CACHED else [])
    for workers, word_cache in runs:
        out = tmp_path / f"o{workers}{word_cache}"
        stats = preprocess([str(corpus)], str(path), str(out), workers=workers, word_cache=word_cache,
                           eod_token=eod_token, skip_bad_records=True, progress=False, chunk_lines=5)
        assert (stats.bad_records, stats.bad_locations) == (1, [f"{corpus}:4"])
        assert stats.documents + stats.empty_documents == len(TEXTS)
        assert _read_both(f"{out}_text_document") == expected, (workers, word_cache)
    if kind in CACHED:  # the fast path was the one checked
        tok = load_tokenizer(path)
        tok.encode_flat(["x"])
        assert tok._word_cache


@pytest.mark.parametrize("kind, token", [
    ("gpt2", "<|endoftext|>"), ("chatml", "<|endoftext|>"), ("llama3", "<|end_of_text|>"), ("qwen", "<|endoftext|>"),
    ("mistral", "</s>"), ("t5_unigram", "</s>"), ("gemma_like", "<eos>"),
])
def test_the_guessed_end_of_document_token_is_the_familys_eos(build, kind, token):
    tok = HFTokenizer(build(kind))
    assert (tok.eod_token, tok.eod) == (token, tok._tok.token_to_id(token))
    assert tok.eod_special


def test_gemma_like_vocabulary_holds_the_other_spelling_as_an_ordinary_piece(build):
    """What makes the guess above matter: "</s>" is a piece text produces, so taking it would end
    documents with a token that also occurs inside them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(build("gemma_like")))
    piece = tok.token_to_id("</s>")
    assert piece is not None and piece in tok.encode("a </s> b", add_special_tokens=False).ids


def test_sentencepiece_eod_is_its_eos_and_naming_another_is_refused(build):
    tok = load_tokenizer(build("sp_bpe"))
    assert tok.eod == 2
    with pytest.raises(ValueError, match="--eod-token applies to Hugging Face tokenizers"):
        load_tokenizer(build("sp_bpe"), "</s>")


def test_bert_without_an_eos_is_refused_naming_its_special_tokens(tmp_path, build, corpus):
    """BERT has no end-of-sequence token: the CLI stops before any work, says which tokens it has;
    naming [SEP] works."""
    path = build("bert")
    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(corpus), "--tokenizer-model",
           str(path), "--output-prefix", str(tmp_path / "o"), "--append-eod", "--no-progress", "--skip-bad-records"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "no end-of-document token among <|endoftext|>, </s>" in r.stderr and "pass --eod-token" in r.stderr
    assert "(its special tokens: [PAD], [UNK], [CLS], [SEP], [MASK])" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    r = subprocess.run(cmd + ["--eod-token", "[SEP]", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("end-of-document token '[SEP]', id 3 (given by --eod-token)\n"), r.stdout
