"""--special-tokens-in-text: what preprocessing makes of a special token written out in a document's
text (``<|endoftext|>`` in a scraped web page), megatron_osp/data/special_text.py.

With a byte-level BPE trained here (``<|endoftext|>`` its special EOD): ``encode`` (the default) writes
the EOD id mid-document, as before; ``split`` writes no special id and decodes back to the text, on
every encode path (word cache and library, one worker and several); ``refuse`` exits 1 naming file,
line, key and token and writes nothing. The manifest records the setting, and merging or training on
an ``encode`` and a ``split`` dataset together is refused naming both. SentencePiece encodes ``</s>``
in text as characters in every mode.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.merge import merge_datasets, merge_tasks
from megatron_osp.data.preprocess import BadRecord, preprocess

REPO = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
DOC = f"The page said {EOT} in the middle, then went on about the fox."
TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog, {i * 7} times." for i in range(40)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from megatron_osp.testing.tokenizers import byte_level_bpe

    root = tmp_path_factory.mktemp("special")
    tok = byte_level_bpe(TEXTS + [DOC.replace(EOT, "")], 400, [EOT])
    tok.save(str(root / "tokenizer.json"))
    corpus = root / "c.jsonl"  # the special token on line 3, and at the start and end of line 6
    lines = TEXTS[:2] + [DOC] + TEXTS[2:4] + [f"{EOT}{TEXTS[4]}{EOT}"] + TEXTS[5:]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return {"tokenizer": str(root / "tokenizer.json"), "corpus": str(corpus), "lines": lines,
            "eod": tok.token_to_id(EOT)}


def _run(hf, out, **kw):
    kw.setdefault("progress", False)
    preprocess([hf["corpus"]], hf["tokenizer"], str(out), **kw)
    return str(out) + "_text_document"


def _docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _manifest(prefix):
    return json.loads(Path(prefix + ".shards.json").read_text())


def test_encode_writes_the_eod_mid_document_and_split_writes_the_text(hf, tmp_path):
    from tokenizers import Tokenizer

    lib = Tokenizer.from_file(hf["tokenizer"])
    eod = hf["eod"]
    encoded, split = _docs(_run(hf, tmp_path / "e")), _docs(_run(hf, tmp_path / "s", special_tokens_in_text="split"))
    default = _run(hf, tmp_path / "d")
    assert _docs(default) == encoded and _manifest(default)["special_tokens_in_text"] == "encode"
    assert _manifest(str(tmp_path / "s_text_document"))["special_tokens_in_text"] == "split"
    # encode: the EOD id inside document 2 (and at both ends of document 5's text), before its own EOD
    assert encoded[2][-1] == eod and eod in encoded[2][:-1] and encoded[5][0] == eod
    assert encoded[2][:-1] == lib.encode(DOC, add_special_tokens=False).ids
    # split: no EOD but the one appended; the ids decode back to the text
    for doc, text in zip(split, hf["lines"]):
        assert doc[-1] == eod and eod not in doc[:-1]
        assert lib.decode(doc[:-1], skip_special_tokens=False) == text
    assert split[2] != encoded[2] and split[0] == encoded[0]


@pytest.mark.parametrize("mode", ["encode", "split"])
def test_every_encode_path_gives_the_same_ids(hf, tmp_path, mode):
    """The word cache and the library's encode_batch, one worker and two (each loads its tokenizer)."""
    from tokenizers import Tokenizer

    from megatron_osp.data.tokenizer import HFTokenizer

    runs = {(w, c): _docs(_run(hf, tmp_path / f"o{w}{c}", workers=w, word_cache=c, special_tokens_in_text=mode,
                               chunk_lines=4))
            for w in (1, 2) for c in (True, False)}
    first = runs[(1, True)]
    assert all(docs == first for docs in runs.values())
    lib = Tokenizer.from_file(hf["tokenizer"])
    lib.encode_special_tokens = mode == "split"
    assert [d[:-1] for d in first] == [lib.encode(t, add_special_tokens=False).ids for t in hf["lines"]]
    tok = HFTokenizer(hf["tokenizer"], special_tokens_in_text=mode)
    assert [list(x) for x in tok.encode_batch(hf["lines"])] == [d[:-1] for d in first]
    assert tok._word_cache, "the word cache is not in use for this byte-level BPE"
    if mode == "split":  # the cache splits documents holding the special token itself, as the library
        assert tok._word_cache._words(DOC) is not None


@pytest.mark.parametrize("workers", [1, 2])
def test_refuse_names_file_line_and_token_and_writes_nothing(hf, tmp_path, workers):
    before = _run(hf, tmp_path / "out")  # an earlier output of the prefix stays as it was
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--no-progress", "--input",
                        hf["corpus"], "--tokenizer-model", hf["tokenizer"], "--output-prefix", str(tmp_path / "out"),
                        "--append-eod", "--workers", str(workers), "--special-tokens-in-text", "refuse"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert f"error: {hf['corpus']}:3: key 'text' holds the special token '{EOT}' written out (at character 14)" \
        in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files and Path(before + ".bin").exists()
    with pytest.raises(BadRecord, match=re.escape(f"{hf['corpus']}:3: key 'text' holds the special token")):
        _run(hf, tmp_path / "new", special_tokens_in_text="refuse", workers=workers)
    assert not list(tmp_path.glob("new*")) and not list(tmp_path.glob(".new*"))
    # --skip-bad-records: those records are skipped and counted, the rest written as split/encode would
    stats = preprocess([hf["corpus"]], hf["tokenizer"], str(tmp_path / "skip"), progress=False, workers=workers,
                       skip_bad_records=True, special_tokens_in_text="refuse")
    assert stats.bad_records == 2 and stats.bad_locations == [f"{hf['corpus']}:3", f"{hf['corpus']}:6"]
    kept = [d for i, d in enumerate(_docs(before)) if i not in (2, 5)]
    assert _docs(str(tmp_path / "skip_text_document")) == kept
    assert _manifest(str(tmp_path / "skip_text_document"))["special_tokens_in_text"] == "refuse"


def test_refuse_names_a_parquet_row(hf, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["plain", "plain too", DOC]}), src)
    with pytest.raises(BadRecord, match=re.escape(f"{src}:row 3: key 'text' holds the special token '{EOT}'")):
        preprocess([str(src)], hf["tokenizer"], str(tmp_path / "p"), progress=False, special_tokens_in_text="refuse")
    assert not list(tmp_path.glob("p_*"))


def test_encode_and_split_datasets_are_refused_together_naming_both(hf, tmp_path):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.data_checks import data_problems

    enc, split = _run(hf, tmp_path / "enc"), _run(hf, tmp_path / "split", special_tokens_in_text="split")
    message = (f"{split}: made with --special-tokens-in-text split, {enc} with encode (their manifests: "
               "special_tokens_in_text)")
    with pytest.raises(ValueError, match=re.escape(message)):
        merge_datasets([enc, split], str(tmp_path / "m"))
    assert not list(tmp_path.glob("m*"))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input", enc, split,
                        "--output-prefix", str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    problems = data_problems(load_config(None, ["model.vocab_size=512", f"data.paths=[{enc},{split}]",
                                                f"data.eod_id={hf['eod']}"]))
    assert [p for p in problems if "special-tokens" in p] == [f"data.paths: {message}; a special token written in "
                                                             "a document's text (<|endoftext|> in a web page) is its "
                                                             "id in one and ordinary text in the other: preprocess "
                                                             "them with one setting"]
    # A manifest without the field was made as encode: it merges with encode, not with split.
    old = _run(hf, tmp_path / "old")
    m = _manifest(old)
    del m["special_tokens_in_text"]
    Path(old + ".shards.json").write_text(json.dumps(m))
    merge_datasets([enc, old], str(tmp_path / "m1"))
    with pytest.raises(ValueError, match=re.escape(f"{split}: made with --special-tokens-in-text split, {old} "
                                                   "with encode")):
        merge_datasets([old, split], str(tmp_path / "m2"))
    # refuse wrote only records without such text: its ids are either mode's, so it mixes with both.
    refused = _run(hf, tmp_path / "ref", special_tokens_in_text="refuse", skip_bad_records=True)
    merge_datasets([enc, refused], str(tmp_path / "m3"))
    merge_datasets([refused, split], str(tmp_path / "m4"))
    with pytest.raises(ValueError, match=re.escape(f"{split}: made with --special-tokens-in-text split, {enc}")):
        merge_datasets([enc, refused, split], str(tmp_path / "m5"))


def test_array_tasks_carry_the_setting_and_refuse_a_mix(hf, tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    lines = Path(hf["corpus"]).read_text().splitlines(keepends=True)
    a.write_text("".join(lines[:20]))
    b.write_text("".join(lines[20:]))
    for i in range(2):
        preprocess([str(a), str(b)], hf["tokenizer"], str(tmp_path / "t"), progress=False, task=(i, 2),
                   special_tokens_in_text="split")
    merge_tasks(str(tmp_path / "t"))
    merged = str(tmp_path / "t_text_document")
    assert _manifest(merged)["special_tokens_in_text"] == "split"
    single = _run(hf, tmp_path / "single", special_tokens_in_text="split")
    assert _docs(merged) == _docs(single)
    preprocess([str(a), str(b)], hf["tokenizer"], str(tmp_path / "t"), progress=False, task=(1, 2))  # encode
    with pytest.raises(ValueError, match=r"task 1 .* comes from a different run than task\(s\) 0: "
                                         r"special_tokens_in_text='encode' vs special_tokens_in_text='split'"):
        merge_tasks(str(tmp_path / "t"), str(tmp_path / "again"))


def test_sentencepiece_encodes_the_text_of_its_control_pieces_as_characters_in_every_mode(sp_model, tmp_path):
    from megatron_osp.data.tokenizer import SentencePieceTokenizer

    src = tmp_path / "c.jsonl"
    texts = ["line one: abc xyz", "the fox </s> said <s> and <unk> to the </s>", "line two: the fox"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = {}
    for mode in ("encode", "split"):
        preprocess([str(src)], sp_model, str(tmp_path / mode), progress=False, special_tokens_in_text=mode)
        out[mode] = str(tmp_path / f"{mode}_text_document")
    sp = SentencePieceTokenizer(sp_model)
    assert _docs(out["encode"]) == _docs(out["split"])
    assert sp.eod not in _docs(out["split"])[1][:-1] and sp.decode(_docs(out["split"])[1][:-1]) == texts[1]
    merge_datasets([out["encode"], out["split"]], str(tmp_path / "m"))  # the same ids: they mix
    with pytest.raises(BadRecord, match=re.escape(f"{src}:2: key 'text' holds the special token '</s>' written out "
                                                  "(at character 8)")):
        preprocess([str(src)], sp_model, str(tmp_path / "r"), progress=False, special_tokens_in_text="refuse")
    assert not np.any([p.name.startswith("r_") for p in tmp_path.iterdir()])


@pytest.mark.parametrize("workers", [1, 2])
def test_an_eod_that_is_an_ordinary_vocabulary_entry_is_kept_out_of_split_and_refuse_texts(tmp_path, workers):
    """A tokenizer whose EOD (``</s>``) is in its vocabulary but not among its special tokens turns the
    text ``</s>`` into the EOD id whatever the mode: ``split`` and ``refuse`` used to write it mid-document.
    Now such a record is a bad record naming file, line, key and token offset."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "the": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    src = tmp_path / "c.jsonl"
    texts = ["hello world"] * 30 + ["the </s> hello"] + ["world the"] * 30
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run = dict(progress=False, workers=workers, chunk_lines=8)
    preprocess([str(src)], str(tmp_path / "tokenizer.json"), str(tmp_path / "e"), **run)
    assert _docs(str(tmp_path / "e_text_document"))[30] == [4, 1, 2, 1]  # encode: as before
    for mode in ("split", "refuse"):
        with pytest.raises(BadRecord, match=re.escape(f"{src}:31: key 'text' encodes to the end-of-document id 1 "
                                                      "('</s>', an ordinary vocabulary entry") + ".* at token 1: "):
            preprocess([str(src)], str(tmp_path / "tokenizer.json"), str(tmp_path / mode), special_tokens_in_text=mode, **run)
        assert not list(tmp_path.glob(f"{mode}_*"))
        stats = preprocess([str(src)], str(tmp_path / "tokenizer.json"), str(tmp_path / mode), special_tokens_in_text=mode,
                           skip_bad_records=True, **run)
        docs = _docs(str(tmp_path / f"{mode}_text_document"))
        assert stats.bad_records == 1 and len(docs) == 60 and all(1 not in d[:-1] for d in docs)
        assert docs == [d for i, d in enumerate(_docs(str(tmp_path / "e_text_document"))) if i != 30]


def test_refuse_finds_every_text_the_library_would_turn_into_a_special_id(tmp_path):
    """A special token matched on normalized text (a Lowercase normalizer: ``<SEP>`` is ``<sep>``) is
    looked for in the normalized text; where several start at one place, the longest is named."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    from megatron_osp.data.special_text import SpecialTextScan
    from megatron_osp.data.tokenizer import HFTokenizer

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "<": 3, ">": 4, "sep": 5}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<sep>", normalized=True, special=True), "</s>"])
    tok.add_tokens([AddedToken("<user>", special=False)])  # an added word: matched in every mode
    tok.save(str(tmp_path / "t.json"))
    assert tok.encode("a <SEP> b </s>", add_special_tokens=False).ids == [1, 6, 2, 7]
    refuse = HFTokenizer(tmp_path / "t.json", eod_token="</s>", special_tokens_in_text="refuse")
    assert refuse.find_special("a <SEP> b") == ("<sep>", None)
    assert refuse.find_special("a b </s>") == ("</s>", 4) and refuse.find_special("a <user> b") is None
    split = HFTokenizer(tmp_path / "t.json", eod_token="</s>", special_tokens_in_text="split")
    assert split.encode("a <SEP> b </s> <user>") == [1, 3, 5, 4, 2, 0, 0, 4, 8]
    scan = SpecialTextScan([("<s>", False), ("<s>x", False), ("<|eot|>", False), ("<|eom|>", False)])
    assert scan.find("1 <s>x") == ("<s>x", 2) and scan.find("<s>") == ("<s>", 0)
    assert scan.find("<|eo <|eom|>") == ("<|eom|>", 5) and scan.find("<|eot|") is None


def test_an_export_of_a_model_trained_on_split_data_splits_like_its_data(hf, tmp_path):
    """The exported tokenizer of a run (convert/hf_export.data_special_text -> save_tokenizer) encodes
    special-token text as the run's training data did: stock AutoTokenizer gives preprocessing's ids for
    the document under split, and the EOD id mid-text under encode; without manifests, the default."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from megatron_osp.convert.hf_export import data_special_text
    from megatron_osp.convert.hf_tokenizer import save_tokenizer

    runs = {mode: SimpleNamespace(data=SimpleNamespace(paths=[_run(hf, tmp_path / mode, special_tokens_in_text=mode)]))
            for mode in ("encode", "split")}
    lines = []
    assert data_special_text(runs["split"]) == "split"
    assert data_special_text(runs["encode"]) is None
    assert data_special_text(SimpleNamespace(data=SimpleNamespace(paths=[str(tmp_path / "gone")])), lines.append) is None
    assert "no manifest" in lines[0] and "gone" in lines[0]
    for mode, run in runs.items():
        out = tmp_path / f"export_{mode}"
        out.mkdir()
        save_tokenizer(hf["tokenizer"], out, eod_id=hf["eod"], special_tokens_in_text=data_special_text(run))
        ids = AutoTokenizer.from_pretrained(str(out))(DOC, add_special_tokens=False)["input_ids"]
        trained = _docs(run.data.paths[0])[2][:-1]  # the document, without its appended EOD
        assert ids == trained, mode
        assert (hf["eod"] in ids) == (mode == "encode")
