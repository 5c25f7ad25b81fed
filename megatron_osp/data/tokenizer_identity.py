"""Which tokenizers make the same ids: a fingerprint of a tokenizer file's behaviour, not its bytes.

A preprocessing manifest records ``tokenizer_sha256`` (the file used) and ``tokenizer_fingerprint``
(this module): two files of one fingerprint turn every text into the same ids, as preprocessing
encodes it (``megatron_osp/data/tokenizer.py``: HF ``add_special_tokens=False``, SentencePiece plain
``encode``). The sha256 refused such pairs, e.g. an HF ``tokenizer.json`` re-saved by a newer
``tokenizers`` (key order, whitespace, merges as pairs, fields the newer version writes out) or a
SentencePiece ``.model`` trained again with other input paths or thread counts.

The fingerprint is a SHA-256 of a canonical form of the parts that decide the ids, prefixed by the
kind and the canonical form's version (``hf1:``, ``sp1:``). A difference it cannot explain away
only makes two fingerprints differ (a refusal, as with the sha256); it never makes two tokenizers
that encode differently equal. ``same_tokenizer`` compares two manifests' records: by fingerprint
when both have one of the same kind and version, else by sha256 (manifests written before this).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

HF_SCHEME, SP_SCHEME = "hf1", "sp1"


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The file a tokenizer path names (a directory: its ``tokenizer.json``, as load_tokenizer reads it)."""
    p = Path(path)
    return p / "tokenizer.json" if p.is_dir() else p


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """``hf1:<sha256>`` of an HF ``tokenizer.json`` or ``sp1:<sha256>`` of a SentencePiece model.
    The kind is told by the content (JSON starts with ``{``), whatever the file is called."""
    file = tokenizer_file(path)
    data = file.read_bytes()
    if data.lstrip()[:1] == b"{":
        try:
            definition = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{file}: not a Hugging Face tokenizer.json ({e})") from None
        return f"{HF_SCHEME}:{_sha(hf_canonical(definition))}"
    return f"{SP_SCHEME}:{hashlib.sha256(sp_canonical(data, str(file))).hexdigest()}"


def same_tokenizer(a: dict, b: dict) -> bool | None:
    """Whether two records (``tokenizer_sha256`` and/or ``tokenizer_fingerprint``) name tokenizers of
    the same ids: fingerprints when both have one of one scheme, else sha256s; None when neither pair
    can be compared (a manifest that records neither)."""
    fa, fb = a.get("tokenizer_fingerprint"), b.get("tokenizer_fingerprint")
    if isinstance(fa, str) and isinstance(fb, str) and fa.split(":")[0] == fb.split(":")[0]:
        return fa == fb
    sa, sb = a.get("tokenizer_sha256"), b.get("tokenizer_sha256")
    if isinstance(sa, str) and isinstance(sb, str):
        return sa == sb
    return None


def _sha(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json.
#
# Kept (each changes ids that HFTokenizer.encode_flat writes):
#   model          vocabulary, merges and every model option (unk token, byte_fallback, dropout,
#                  ignore_merges, continuing_subword_prefix, ...): the ids themselves.
#   normalizer     changes the text before it is split and looked up.
#   pre_tokenizer  decides the words the model sees.
#   added_tokens   matched in the text before the model runs, with their own ids; their lstrip,
#                  rstrip, single_word, normalized and special flags change what matches.
# Left out (cannot change the ids preprocessing writes):
#   truncation,    ``Tokenizer.from_file`` turns them on, and ``encode_batch`` would then cut every
#   padding        document to max_length or pad it with pad ids that depend on the batch; HFTokenizer
#                  turns both off when it loads (data/tokenizer.py), so they change no id it writes.
#   version        the file format's version string, "1.0" for every current library.
#   post_processor adds BOS/EOS or pair templates only with add_special_tokens=True; preprocessing
#                  encodes with add_special_tokens=False (tokenizer.py), where TemplateProcessing,
#                  Bert/Roberta processing and ByteLevel (offsets only) leave the ids as they are.
#   decoder        ids -> text only; and newer libraries rewrite its fields (Metaspace's
#                  add_prefix_space -> prepend_scheme), so keeping it would refuse a plain re-save.
# Serialization differences made equal: key order and whitespace (canonical JSON), merges written as
# "a b" strings (older tokenizers) or ["a", "b"] pairs, added_tokens order (each has its id), and a
# field a newer library writes out with the value an older one used when it was absent (_DEFAULTS).

_HF_KEPT = ("model", "normalizer", "pre_tokenizer", "added_tokens")

# Fields older tokenizer.json files lack, with the value the library (0.23) reads when one is absent
# and writes out on every save: a file and its re-save by the library agree (tested). A field the
# library requires is not listed (a file without it cannot be loaded, so it makes no ids).
_DEFAULTS = {
    "model": {"BPE": {"dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False},
              "Unigram": {"byte_fallback": False}},
    "pre_tokenizer": {"ByteLevel": {"use_regex": True}, "Metaspace": {"split": True}},
}


def hf_canonical(definition: dict) -> dict:
    """The parts of a parsed ``tokenizer.json`` that decide its ids, in one form for every way of
    writing them (see above)."""
    if not isinstance(definition, dict):
        raise ValueError("not a Hugging Face tokenizer.json (not a JSON object)")
    out = {key: _with_defaults(key, definition.get(key)) for key in _HF_KEPT}
    model = out["model"]
    if isinstance(model, dict) and isinstance(model.get("merges"), list):
        out["model"] = {**model, "merges": [_merge_pair(m) for m in model["merges"]]}
    tokens = out["added_tokens"]
    if isinstance(tokens, list) and all(isinstance(t, dict) and isinstance(t.get("id"), int) for t in tokens):
        out["added_tokens"] = sorted(tokens, key=lambda t: t["id"])
    return out


def _merge_pair(merge):
    """``"a b"`` (the old format) -> ``["a", "b"]`` (the new); a string that is not two parts, which no
    library reads as a merge, is kept as it is."""
    if isinstance(merge, str):
        parts = merge.split(" ")
        return parts if len(parts) == 2 else merge
    return merge


def _with_defaults(section: str, value):
    """``value`` with the fields of _DEFAULTS[section] that it lacks filled in, through Sequences."""
    if isinstance(value, list):
        return [_with_defaults(section, v) for v in value]
    if not isinstance(value, dict):
        return value
    value = {k: _with_defaults(section, v) if k in ("pretokenizers", "normalizers") else v
             for k, v in value.items()}
    kind = value.get("type")
    if section == "pre_tokenizer" and kind == "Metaspace" and "prepend_scheme" not in value:
        # Older tokenizers: add_prefix_space (default true), which the library reads as prepend_scheme
        # "always" (true) or "never" (false).
        value = dict(value)
        value["prepend_scheme"] = "always" if value.pop("add_prefix_space", True) else "never"
    table = _DEFAULTS.get(section, {})
    filled = table.get(kind) if isinstance(kind, str) else table.get(None) if kind is None else None
    return {**filled, **value} if filled else value


# ---------------------------------------------------------------------------------------------------
# SentencePiece .model: the ModelProto with the training-only TrainerSpec fields cleared, then every
# singular field left at its default unset (a field written out with its default value and one left
# out are the same model), serialized deterministically. Kept in full: the pieces (piece, score,
# type: the vocabulary and its ids), normalizer_spec (precompiled charsmap, add_dummy_prefix,
# remove_extra_whitespaces, escape_whitespaces), denormalizer_spec (decoding only, but no re-run or
# re-save of one model changes it, so keeping it costs nothing), fields this module's protobuf does
# not know (a newer SentencePiece's), and the TrainerSpec fields the encoder reads or may read:
# model_type, byte_fallback, treat_whitespace_as_suffix, allow_whitespace_only_pieces, split_by_*,
# split_digits, pretokenization_delimiter, unk/bos/eos/pad ids and pieces, unk_surface, and the
# control/user-defined symbol lists (their pieces are in ``pieces`` too).
#
# Cleared: fields that only steer training, whose whole effect on encoding is already in the pieces
# and normalizer kept above (the encoder never reads them; a test re-checks this by changing each
# and encoding again):
SP_TRAINING_ONLY = (
    "input", "input_format", "model_prefix",  # where training read and wrote
    "num_threads", "train_extremely_large_corpus",  # resources
    "input_sentence_size", "shuffle_input_sentence", "mining_sentence_size", "training_sentence_size",
    "max_sentence_length", "seed_sentencepiece_size", "seed_sentencepieces_file",  # what it sampled
    "vocab_size", "hard_vocab_limit", "use_all_vocab", "character_coverage", "auto_character_coverage",
    "required_chars", "max_sentencepiece_length", "shrinking_factor", "num_sub_iterations",
    "enable_differential_privacy", "differential_privacy_noise_level",
    "differential_privacy_clipping_threshold",  # how it chose the pieces (the pieces are kept)
    "self_test_sample_size", "vocabulary_output_piece_score",  # the trainer's self-test, its .vocab file
    "accept_language",  # a note, read by nothing
)


def sp_canonical(data: bytes, name: str = "model") -> bytes:
    """The canonical serialization of a SentencePiece model's bytes (see above)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise ValueError(f"{name}: not a SentencePiece model or a tokenizer.json ({e})") from None
    if not proto.pieces:
        raise ValueError(f"{name}: not a SentencePiece model or a tokenizer.json (no pieces)")
    spec = proto.trainer_spec
    for field in SP_TRAINING_ONLY:
        if field in spec.DESCRIPTOR.fields_by_name:
            spec.ClearField(field)
    _unset_defaults(proto)
    return proto.SerializeToString(deterministic=True)


def _unset_defaults(message) -> None:
    for field, value in message.ListFields():
        if field.message_type is not None:
            for m in (value if _repeated(field) else [value]):
                _unset_defaults(m)
        elif not _repeated(field) and value == field.default_value:
            message.ClearField(field.name)


def _repeated(field) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.x; `label` is deprecated there
    return bool(is_repeated) if is_repeated is not None else field.label == field.LABEL_REPEATED


__all__ = ["tokenizer_fingerprint", "same_tokenizer", "tokenizer_file", "hf_canonical", "sp_canonical",
           "SP_TRAINING_ONLY"]
