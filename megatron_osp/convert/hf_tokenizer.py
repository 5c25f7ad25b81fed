"""The tokenizer of an HF export, tokenizing exactly as the training data was tokenized.

A SentencePiece ``.model`` (what ``tools/train_tokenizer.py`` makes and preprocessing encodes with)
becomes ``tokenizer.json`` + ``tokenizer_config.json`` (transformers' own converter, offline) plus the
``.model`` itself as ``tokenizer.model`` (llama.cpp reads it). Three things make stock
``AutoTokenizer.from_pretrained(dir)`` give SentencePiece's ids on any text:

- ``split_special_tokens: true`` in tokenizer_config.json: transformers (4.4x and 5.x) then never
  turns the literal strings ``<unk>``, ``<s>``, ``</s>`` of a text into the special ids 0/1/2, as
  SentencePiece never does (WikiText has thousands of literal ``<unk>``). ``bos_token``/``eos_token``
  and their ids stay set, so ``generate`` stops at ``</s>`` and ``decode`` shows them.
- The pieces SentencePiece never matches in text (control, unknown, unused and byte pieces) cannot be
  produced from text by the converted model either: a BPE loses the merges that would build them. A
  Unigram's get a score far below any other path, which keeps them out wherever their characters are
  in the vocabulary; HF's Unigram matches every piece it has, so next to characters outside the
  vocabulary (byte fallback) a Unigram export can still differ: the export says so (a warning).
- ``add_bos_token``/``add_eos_token`` are false: preprocessing adds no BOS and ends each document
  with ``</s>`` as a separator, so ``tokenizer(text)`` gives ``sp.encode(text)``, the ids training saw
  for that text (append ``eos_token_id`` to separate documents, as preprocessing does).

The result is checked before it is published: texts full of those literals must encode to
SentencePiece's ids, else a BPE export stops (ExportError) and nothing is written.

A Hugging Face tokenizer (``tokenizer.json`` or a directory with one) is copied with its configs; the
special ids come from the directory's generation_config.json / config.json (a model imported by
``convert_from_hf``) or its tokenizer_config.json, the end-of-sequence id falling back to the run's
end-of-document id; ``split_special_tokens`` is set when the project's HFTokenizer (which made the
training data) splits them too, or when the training data was made with ``--special-tokens-in-text
split`` (its manifests say so): the exported tokenizer then encodes ``<|endoftext|>`` in a text as
characters, as the model saw such text in training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_osp.convert.llama import ExportError

__all__ = ["save_tokenizer", "tokenizer_vocab_size", "special_ids_of_hf_dir", "copy_hf_tokenizer", "check_matches_sentencepiece",
           "SPECIAL_KEYS", "PROBE_TEXTS", "IMPORTED_IDS", "IMPORTED_TOKENIZER"]

SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
_TOKEN_FIELDS = {"bos_token_id": "bos_token", "eos_token_id": "eos_token", "pad_token_id": "pad_token",
                 "unk_token_id": "unk_token"}
# Texts the exported tokenizer must encode exactly like SentencePiece (the export's own check).
PROBE_TEXTS = (
    "a <s> b </s> c <unk> d",
    "<unk><s></s>",
    " = Valkyria <unk> = \n <unk> 's game was <unk> @-@ <unk> .",
    "x</s>y<s>z <pad> <mask> [UNK] <|endoftext|>",
    "  leading and  double spaces\nnew line\ttab ",
    "",
)
_NEVER_SCORE = -1e9
IMPORTED_IDS = "special_token_ids.json"  # the HF model's ids, kept by convert_from_hf with its tokenizer copy
IMPORTED_TOKENIZER = "hf_tokenizer"  # convert_from_hf's copy of an HF tokenizer, beside the checkpoint


def _hf_files(directory: Path) -> list[Path]:
    return [f for f in sorted(directory.iterdir())
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens"))]


# ---------------------------------------------------------------------------------- SentencePiece
def _never_in_text(sp) -> dict[int, str]:
    """Pieces SentencePiece never produces from text: control (<s>, </s>), unknown, unused, byte."""
    return {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i)}


def _fix_model(tokenizer_json: Path, sp) -> str:
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data["model"]
    never = _never_in_text(sp)
    if model["type"] == "BPE":
        pieces = set(never.values())

        def joined(m):
            return "".join(m) if isinstance(m, list) else m.replace(" ", "", 1)

        model["merges"] = [m for m in model["merges"] if joined(m) not in pieces]
    elif model["type"] == "Unigram":
        # Every piece is in HF's Unigram trie and cannot be renamed (byte fallback and added tokens
        # look them up by name); a score far below any path keeps them out wherever the piece's
        # characters are in the vocabulary.
        for i in never:
            model["vocab"][i][1] = _NEVER_SCORE
    else:
        raise ExportError(f"tokenizer conversion gave a {model['type']} model; expected BPE or Unigram")
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return model["type"]


def _save_sentencepiece(src: Path, directory: Path, log) -> dict:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(src))
    staging = directory / ".tokenizer_src"
    staging.mkdir()
    try:
        shutil.copy2(src, staging / "tokenizer.model")
        # The generic converter reproduces SentencePiece's own encoding (LlamaTokenizer's
        # legacy=False rules differ on newlines and repeated spaces).
        tok = AutoTokenizer.from_pretrained(str(staging), local_files_only=True)
        tok.save_pretrained(str(directory))
    finally:
        shutil.rmtree(staging)
    shutil.copy2(src, directory / "tokenizer.model")
    kind = _fix_model(directory / "tokenizer.json", sp)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id(),
           "unk_token_id": sp.unk_id()}
    ids = {k: (v if v >= 0 else None) for k, v in ids.items()}
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # readable by transformers 4.x and 5.x
    for key in ("is_local", "local_files_only", "unk_id"):
        cfg.pop(key, None)
    for key, field in _TOKEN_FIELDS.items():
        if ids[key] is not None:
            cfg[field] = sp.id_to_piece(ids[key])
        else:
            cfg.pop(field, None)
    cfg.update(split_special_tokens=True, add_bos_token=False, add_eos_token=False)
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    try:
        check_matches_sentencepiece(directory, src)
    except ExportError as e:
        if kind == "BPE":
            raise
        log(f"warning: {e}. A SentencePiece Unigram model cannot be reproduced exactly by Hugging Face's "
            "Unigram, which matches every piece (<s>, <0x41>, ...) in text where SentencePiece matches "
            "only normal ones; text holding such strings next to characters outside the vocabulary "
            "tokenizes differently (BPE, train_tokenizer.py's default, has no such difference)")
    return ids


def check_matches_sentencepiece(directory, sp_model, texts=PROBE_TEXTS) -> None:
    """ExportError unless stock AutoTokenizer on ``directory`` encodes ``texts`` like ``sp_model``."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    for text in texts:
        got, want = tok(text)["input_ids"], sp.encode(text)
        if got != want:
            raise ExportError(
                f"the exported tokenizer encodes {text!r} as {got}, but {sp_model} (which tokenized the "
                f"training data) as {want}; transformers {_transformers_version()} may not honour "
                "split_special_tokens")
    for key, field in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")):
        want = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}[key]
        if want >= 0 and (getattr(tok, key) != want or getattr(tok, field) != sp.id_to_piece(want)):
            raise ExportError(f"the exported tokenizer's {field} is {getattr(tok, field)!r} "
                              f"(id {getattr(tok, key)}), {sp_model} has {sp.id_to_piece(want)!r} (id {want})")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------------------------- HF tokenizers
def _token_content(value):
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def special_ids_of_hf_dir(directory) -> dict:
    """bos/eos/pad/unk ids an HF directory declares: special_token_ids.json (written by the import),
    generation_config.json, config.json, then tokenizer_config.json's token strings looked up in
    tokenizer.json. eos may be a list."""
    d = Path(directory)
    ids: dict = {}
    for name in (IMPORTED_IDS, "generation_config.json", "config.json"):
        f = d / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from None
            for key in SPECIAL_KEYS:
                if ids.get(key) is None and data.get(key) is not None:
                    ids[key] = data[key]
    tok_cfg, tok_json = d / "tokenizer_config.json", d / "tokenizer.json"
    if tok_cfg.is_file() and tok_json.is_file():
        from tokenizers import Tokenizer

        cfg = json.loads(tok_cfg.read_text())
        tok = Tokenizer.from_file(str(tok_json))
        for key, field in _TOKEN_FIELDS.items():
            content = _token_content(cfg.get(field))
            if ids.get(key) is None and content is not None and tok.token_to_id(content) is not None:
                ids[key] = tok.token_to_id(content)
    return {k: ids.get(k) for k in SPECIAL_KEYS}


def copy_hf_tokenizer(src, dest: Path) -> None:
    """Copy an HF tokenizer (``tokenizer.json`` or a directory holding one) into ``dest``."""
    src = Path(src)
    if src.is_dir():
        if not (src / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer directory {src} has no tokenizer.json")
        for f in _hf_files(src):
            shutil.copy2(f, dest / f.name)
    else:
        shutil.copy2(src, dest / "tokenizer.json")
        if src.name == "tokenizer.json":  # its directory's configs belong to it
            for f in _hf_files(src.parent):
                if f.name != "tokenizer.json":
                    shutil.copy2(f, dest / f.name)


def _save_hf(src: Path, directory: Path, eod_id: int | None, special_tokens_in_text: str | None = None) -> dict:
    from tokenizers import Tokenizer

    copy_hf_tokenizer(src, directory)
    source_dir = src if src.is_dir() else src.parent
    ids = special_ids_of_hf_dir(source_dir) if (src.is_dir() or src.name == "tokenizer.json") else {}
    ids = {k: ids.get(k) for k in SPECIAL_KEYS}
    if ids["eos_token_id"] is None and eod_id is not None:
        ids["eos_token_id"] = eod_id  # the token training ended every document with
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for key, field in _TOKEN_FIELDS.items():
        value = ids[key][0] if isinstance(ids[key], list) and ids[key] else ids[key]
        if _token_content(cfg.get(field)) is None and isinstance(value, int) and tok.id_to_token(value) is not None:
            cfg[field] = tok.id_to_token(value)
    eos = _token_content(cfg.get("eos_token"))
    if special_tokens_in_text == "split" or (eos is not None and _training_splits(src, eos, tok.token_to_id(eos))):
        cfg["split_special_tokens"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return ids


def _training_splits(src: Path, token: str, token_id) -> bool:
    """Whether the project's HFTokenizer (preprocessing) encodes the literal ``token`` as characters."""
    try:
        from megatron_osp.data.tokenizer import HFTokenizer

        return HFTokenizer(src).encode(token) != [token_id]
    except Exception:  # noqa: BLE001 - no EOD candidate etc.: keep the tokenizer's own behaviour
        return False


# ---------------------------------------------------------------------------------- entry point
def tokenizer_vocab_size(tokenizer_model) -> int:
    """How many ids the tokenizer can produce: a SentencePiece model's pieces, or an HF tokenizer's
    vocabulary with its added tokens; ValueError naming the file when it cannot be read."""
    src = Path(tokenizer_model)
    try:
        if src.is_dir() or src.suffix == ".json":
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(src / "tokenizer.json" if src.is_dir() else src)).get_vocab_size(
                with_added_tokens=True)
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(src)).get_piece_size()
    except Exception as e:  # noqa: BLE001 - both libraries raise plain Exception/OSError/RuntimeError variants
        raise ValueError(f"tokenizer {src} cannot be read: {e}") from None


def save_tokenizer(tokenizer_model, directory, *, eod_id: int | None = None, log=print,
                   special_tokens_in_text: str | None = None) -> dict:
    """Write the tokenizer files into ``directory``; returns the special ids (bos/eos/pad/unk, None
    where undefined) for config.json and generation_config.json."""
    src, directory = Path(tokenizer_model), Path(directory)
    if not src.exists():
        raise FileNotFoundError(f"tokenizer {src} does not exist")
    if src.is_dir() or src.suffix == ".json":
        return _save_hf(src, directory, eod_id, special_tokens_in_text)
    return _save_sentencepiece(src, directory, log)

