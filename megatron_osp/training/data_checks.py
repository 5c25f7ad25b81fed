"""The data section as training needs it, checked before any dataset, process group or model exists:
the data files and tokenizer are there, the tokenizer's vocabulary fits ``model.vocab_size`` and it
has an end-of-document id (the one the data's manifests record, and data.eod_id agrees with it), and the
preprocessing outputs were made with one tokenizer (this one), and no dataset is at two entries of
``data.paths`` (or of ``data.valid_paths``);
``data.valid_paths`` (a validation set of its own) is there, holds no training dataset (nor a byte copy
of one, nor one that a training dataset was merged from, or was merged from one: merge manifests'
``merged_from``) and was made like the training data. Problems come as validation.py's ``ConfigError``,
one line each, all at once."""

from __future__ import annotations

import os

from megatron_osp.data import shardset
from megatron_osp.data.content_identity import copies_of, dataset_id, retokenized_overlap, training_sample
from megatron_osp.data.replace import aside_hint
from megatron_osp.data.shardset import expand
from megatron_osp.data.tokenizer_identity import same_tokenizer, tokenizer_fingerprint
from megatron_osp.training.validation import ConfigError, _fail


def tokenizer_vocabulary(path: str, eod: int | None = None) -> tuple[int, int]:
    """(vocabulary size, end-of-sequence id) of a SentencePiece model; ConfigError naming the file (a
    Hugging Face tokenizer.json: what to set instead; ``eod``, the EOD id the data record, goes in it)."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer_model={path!r}: the file does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # noqa: BLE001 - SentencePiece raises OSError/RuntimeError variants
        hf = _hugging_face_tokenizer(path, eod)
        raise ConfigError(hf or f"data.tokenizer_model={path!r}: not a SentencePiece model ({e})") from None
    return sp.get_piece_size(), sp.eos_id()


def _hugging_face_tokenizer(path: str, eod: int | None) -> str | None:
    """The way out when ``path`` is a Hugging Face tokenizer.json (preprocessing takes one, training
    reads only SentencePiece): data.eod_id instead. ``eod``: the id the data's manifest records."""
    import json

    from megatron_osp.data.tokenizer import HFTokenizer

    try:
        with open(path, encoding="utf-8") as f:
            if not isinstance(json.load(f).get("model"), dict):
                return None
    except (OSError, ValueError, AttributeError):  # not JSON (UnicodeDecodeError is a ValueError), not a mapping
        return None
    try:
        tok = HFTokenizer(path, word_cache=False)
    except Exception:  # noqa: BLE001 - no EOD among the usual tokens, or the library refuses the file
        tok = None
    if eod is not None:
        which = f"data.eod_id={eod} (the id the data's manifest records)"
    elif tok is not None:
        which = f"data.eod_id={tok.eod} (its {tok.eod_token!r}, if that is the token preprocessing used)"
    else:
        which = "data.eod_id=<the end-of-document id preprocessing used>"
    size = f" and model.vocab_size >= {tok.vocab_size}" if tok is not None else ""
    return (f"data.tokenizer_model={path!r} is a Hugging Face tokenizer.json, but training reads only "
            f"SentencePiece .model files: leave data.tokenizer_model unset and set {which}{size}")


def data_problems(config) -> list[str]:
    """The data section as training needs it: files present, tokenizer vocabulary within the model's."""
    d, m = config.data, config.model
    problems = []
    if not d.paths:
        problems.append("data.paths is empty: give at least one indexed dataset prefix")
    try:
        prefixes = dataset_prefixes(d.paths, d.weights)
    except (OSError, ValueError) as e:
        problems.append(f"data.paths: {e}")
        prefixes = []
    problems += _missing(prefixes, "data.paths") + listed_twice(d.paths or [], d.weights, "data.paths")
    tokenizer_eos = None  # the end-of-document id training takes from data.tokenizer_model, when readable
    if d.tokenizer_model:
        try:
            vocab, eos = tokenizer_vocabulary(d.tokenizer_model, _recorded_eod(prefixes))
        except ConfigError as e:
            problems += e.problems
        else:
            if vocab > m.vocab_size:
                problems.append(
                    f"model.vocab_size={m.vocab_size} is smaller than the vocabulary of data.tokenizer_model="
                    f"{d.tokenizer_model} ({vocab} pieces): set model.vocab_size={vocab} (or larger)"
                )
            tokenizer_eos = eos if eos >= 0 else None
            if eos < 0:
                problems.append(
                    f"data.tokenizer_model={d.tokenizer_model} has no end-of-sequence id to separate documents"
                )
    else:
        problems += _recorded_vocab_problems(prefixes, m.vocab_size)
        if d.eod_id is None:
            problems.append(_no_eod_problem(prefixes))
    mix = _tokenizer_mix_problems(d, prefixes)
    problems += mix or _eod_problems(d, prefixes, tokenizer_eos)
    return problems + (_valid_set_problems(d, prefixes, tokens=not mix, tokenizer_eos=tokenizer_eos)
                       if d.valid_paths else [])


def _missing(prefixes: list[str], field: str) -> list[str]:
    problems = []
    for prefix in prefixes:
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.exists(prefix + ext)]
        if missing and prefix.endswith((".bin", ".idx")):
            problems.append(f"{field}: {prefix} is a file name, not a dataset prefix: give the prefix "
                            f"without {prefix[-4:]}, {prefix[:-4]}")
        elif missing:
            problems.append(f"{field}: {' and '.join(missing)} does not exist{aside_hint(prefix)}")
    return problems


def listed_twice(paths, weights, field: str) -> list[str]:
    """One dataset at two entries of ``paths`` (the same prefix, another spelling or link of it, or a
    shard of a family also listed whole): most likely a mistake, which would draw its documents for both
    entries. Each such pair is named by its entries (0-based), with the way out: one entry,
    the two weights summed."""
    seen: dict = {}
    problems, pairs, entry_keys = [], set(), []
    weights_field = field.replace("paths", "weights")
    for i, entry in enumerate(paths):
        try:
            shards = expand(entry)
        except (OSError, ValueError):  # reported by dataset_prefixes
            shards = [entry]
        keys = [dataset_id(p) for p in shards]
        entry_keys.append(keys)
        for prefix, key in zip(shards, keys):
            if key not in seen:
                seen[key] = (i, prefix)
                continue
            j, first = seen[key]
            if (j, i) in pairs:  # a family listed twice: once, not once per shard
                continue
            pairs.add((j, i))
            what = "are the same dataset" if entry_keys[j] == keys else f"both hold {first}"
            if weights is not None and len(weights) == len(paths):
                way = (f"give it once, with the two weights summed ({weights_field} entries {j} and {i}: "
                       f"{weights[j]:g} + {weights[i]:g} = {weights[j] + weights[i]:g})")
            else:
                way = f"give it once (to draw more of it, set {weights_field}: a weight per entry)"
            problems.append(f"{field}: entries {j} ({paths[j]}) and {i} ({entry}) {what}, most likely by "
                            f"mistake (it would be drawn for both entries); {way}")
    return problems


def _valid_set_problems(d, train_prefixes: list[str], tokens: bool = True,
                        tokenizer_eos: int | None = None) -> list[str]:
    """``data.valid_paths`` as validation needs it: its datasets there, none of them read by training
    too (the same .bin, under any symbolic or hard link of its path, or a family prefix whose shard is in
    ``data.paths``: its documents would be trained on; another shard of a family ``data.paths`` also
    reads is a held-out shard and fine), nor a byte copy of a training dataset under another name
    (data/content_identity.py: only datasets of equal .bin size are read), and made like the training
    data (tokenizer, special text, EOD: ``shardset.check_same_tokens``, and the tokenizer of
    ``data.tokenizer_model``; not when ``tokens`` is False: the training data's own mix is reported), and
    ending its documents with the EOD id training uses (``_eod_problems``; ``tokenizer_eos`` as there)."""
    try:
        prefixes = dataset_prefixes(d.valid_paths, d.valid_weights)
    except (OSError, ValueError) as e:
        e = str(e).replace("data.weights", "data.valid_weights").replace("data.paths", "data.valid_paths")
        return [f"data.valid_paths: {e}"]
    problems = _missing(prefixes, "data.valid_paths") + listed_twice(d.valid_paths, d.valid_weights, "data.valid_paths")
    if problems:
        return problems
    present = [p for p in train_prefixes if all(os.path.exists(p + ext) for ext in (".bin", ".idx"))]
    trained = {dataset_id(p): p for p in reversed(present)}  # the first named
    way_out = "hold out another dataset, or leave data.valid_paths unset to validate on data.split's share"
    pool = training_sample(present)
    lineage = _merge_lineage_problems(train_prefixes, prefixes)  # a merge's own words, not 'tokenized again'
    for entry in d.valid_paths:
        shards = dataset_prefixes([entry])
        also = {p: "" if p == entry else f" (a shard of {entry})" for p in shards}
        same = next(((p, trained[dataset_id(p)]) for p in shards if dataset_id(p) in trained), None)
        if same is not None:
            p, t = same
            problems.append(f"data.valid_paths: {p}{also[p]} is also read for training (data.paths: {t}): its "
                            f"documents would be trained on; {way_out}")
        elif copies := _copies(shards, present):
            p = next(p for p in shards if p in copies)
            problems.append(f"data.valid_paths: {p}{also[p]} has the same content as {copies[p]}, which data.paths "
                            "reads for training (the same .idx bytes, .bin size and first and last MiB of .bin): its "
                            f"documents would be trained on; {way_out}")
        elif not lineage and (note := retokenized_overlap(shards, pool)):  # content_identity.py: manifests only
            problems.append(f"data.valid_paths: {entry}: {note}; its documents would be trained on; {way_out}")
    problems += lineage
    if problems or not tokens:
        return problems
    both = train_prefixes + [p for p in prefixes if p not in train_prefixes]
    problems = [p.replace("data.paths: ", "data.valid_paths: ", 1) for p in _tokenizer_mix_problems(d, both)]
    if problems:
        return problems
    try:  # EOD settings too, where the training datasets agree on theirs (a blend of both kinds trains)
        recorded = {p: shardset.recorded_tokens(p) for p in both}
        shardset.check_same_tokens({p: recorded[p] for p in train_prefixes})
    except (OSError, ValueError):
        return []
    try:
        shardset.check_same_tokens(recorded)
    except ValueError as e:
        return [f"data.valid_paths: {e}"]
    return _eod_problems(d, prefixes, tokenizer_eos, where="data.valid_paths")


def _copies(valid: list[str], trained: list[str]) -> dict[str, str]:
    """The validation datasets that are byte copies of training ones under other names
    (data/content_identity.py); none found where a file cannot be read (opening the dataset names it)."""
    try:
        return copies_of(valid, trained)
    except OSError:
        return {}


def _merged_from_any(merged: list[str], candidates: list[str]) -> tuple[str, str] | None:
    """The first (dataset of ``merged``, dataset of ``candidates`` it was merged from), or None."""
    for m in merged:
        sources = {dataset_id(s) for s in shardset.merged_sources(m)}
        for c in candidates:
            if dataset_id(c) in sources:
                return m, c
    return None


def _merge_lineage_problems(train_prefixes: list[str], valid_prefixes: list[str]) -> list[str]:
    """A validation dataset that a training dataset was merged from, or one merged from a training
    dataset: its documents would be trained on under another name (the merges' manifests say so)."""
    hit = _merged_from_any(train_prefixes, valid_prefixes)
    if hit:
        t, v = hit
        return [f"data.valid_paths: {v} is among the datasets data.paths' {t} was merged from (its manifest's "
                "merged_from): its documents would be trained on"]
    hit = _merged_from_any(valid_prefixes, train_prefixes)
    if hit:
        v, t = hit
        return [f"data.valid_paths: {v} was merged from {t} (its manifest's merged_from), which data.paths "
                "trains on: its documents would be trained on"]
    return []


def _eod_problems(d, prefixes: list[str], tokenizer_eos: int | None, where: str = "data.paths") -> list[str]:
    """The end-of-document id training uses against the one the data were made with. Training takes
    data.tokenizer_model's end-of-sequence id when that is set (a data.eod_id beside it was ignored: now
    it must agree), else data.eod_id; a dataset whose manifest records that preprocessing ended its
    documents with another id (``append_eod`` and ``eod``) would have its documents run together, and an
    export would name that id as eos_token_id, silently. ``tokenizer_eos``: None when no tokenizer is set
    or it could not be read (that is reported already). ``where``: the field ``prefixes`` come from; the
    setting itself (data.eod_id against the tokenizer's) is judged for data.paths only."""
    setting = where == "data.paths"
    if setting and tokenizer_eos is not None and d.eod_id is not None and d.eod_id != tokenizer_eos:
        return [f"data.eod_id={d.eod_id} differs from the end-of-sequence id {tokenizer_eos} of data.tokenizer_model="
                f"{d.tokenizer_model}, which training uses: leave data.eod_id unset (or set it to {tokenizer_eos})"]
    used, field = (tokenizer_eos, f"the end-of-sequence id of data.tokenizer_model={d.tokenizer_model}") \
        if tokenizer_eos is not None else (d.eod_id, "data.eod_id")
    if used is None:
        return []
    for p in prefixes:
        try:
            r = shardset.recorded_tokens(p)
        except (OSError, ValueError):  # an unreadable manifest is named when the dataset opens
            continue
        if r.get("append_eod") is True and isinstance(r.get("eod"), int) and r["eod"] != used:
            if not setting:
                return [f"{where}: {p} ends its documents with EOD id {r['eod']} (its manifest records it), but "
                        f"{field} is {used}: its documents would run together in the validation loss; make it with "
                        "the training data's end-of-document token (preprocess_data.py --eod-token)"]
            how = f"set data.eod_id={r['eod']}" if field == "data.eod_id" else "preprocess it with this tokenizer"
            return [f"{where}: {p} ends its documents with EOD id {r['eod']} (its manifest records it), but "
                    f"{field} is {used}: documents would run together and an export would name the wrong "
                    f"eos_token_id; {how}"]
    return []


def _recorded_vocab_problems(prefixes: list[str], vocab_size: int) -> list[str]:
    """Without data.tokenizer_model (a tokenizer.json's output): a model.vocab_size below the vocabulary
    the data's manifests record, named with the size to set before any work (the scan of the .bin
    finds it only when the datasets are built, and names the largest id, not the tokenizer's size)."""
    for prefix in prefixes:
        try:
            recorded = shardset.recorded_tokens(prefix).get("vocab_size")
        except (OSError, ValueError):  # an unreadable manifest is named when the dataset opens
            continue
        if isinstance(recorded, int) and recorded > vocab_size:
            return [f"model.vocab_size={vocab_size} is smaller than the vocabulary of the tokenizer {prefix} was "
                    f"made with ({recorded} ids, its manifest records it): set model.vocab_size={recorded} "
                    "(or larger)"]
    return []


def _no_eod_problem(prefixes: list[str]) -> str:
    """Neither data.tokenizer_model nor data.eod_id is set; where the data's manifests record the EOD
    preprocessing appended (a tokenizer.json's output, which training takes with data.eod_id), the id."""
    try:
        recorded = [shardset.recorded_tokens(p) for p in prefixes]
    except (OSError, ValueError):
        recorded = []
    eods = {r.get("eod") for r in recorded if r.get("append_eod") is True} - {None}
    if len(eods) == 1:
        return (f"set data.eod_id={next(iter(eods))} (the end-of-document id the data's manifest records) or "
                "data.tokenizer_model (the SentencePiece .model the data were made with) so documents can be "
                "separated")
    return "set data.tokenizer_model (or data.eod_id) so documents can be separated"


def _recorded_eod(prefixes: list[str]) -> int | None:
    """The EOD id the datasets' manifests record, when they record one."""
    try:
        eods = {shardset.recorded_tokens(p).get("eod") for p in prefixes} - {None}
    except (OSError, ValueError):
        return None
    return eods.pop() if len(eods) == 1 else None


def _tokenizer_mix_problems(d, prefixes: list[str]) -> list[str]:
    """Preprocessing outputs in ``data.paths`` made with different tokenizers (their manifests say so;
    two tokenizers of one size pass every size and dtype check), or with another tokenizer than
    ``data.tokenizer_model``. Tokenizer files of one fingerprint (the same ids, whatever their bytes,
    data/tokenizer_identity.py) count as one; manifests without fingerprints go by the file's sha256."""
    try:
        recorded = {p: shardset.recorded_tokens(p) for p in prefixes}
    except (OSError, ValueError):  # an unreadable or interrupted manifest is named when the dataset opens
        return []
    try:
        shardset.check_same_tokens(recorded, eod=False)
    except ValueError as e:
        return [f"data.paths: {e}"]
    made = {p: r for p, r in recorded.items() if "tokenizer_sha256" in r or "tokenizer_fingerprint" in r}
    if not d.tokenizer_model or not os.path.isfile(d.tokenizer_model) or not made:
        return []
    mine = {"tokenizer_sha256": shardset.sha256_file(d.tokenizer_model)}
    try:
        mine["tokenizer_fingerprint"] = tokenizer_fingerprint(d.tokenizer_model)
    except (OSError, ValueError):  # not readable as a tokenizer: loading it says so; the sha256 decides here
        pass
    for p, r in made.items():
        if same_tokenizer(r, mine) is False:
            how = ", which encodes differently" if "tokenizer_fingerprint" in r and len(mine) == 2 else ""
            return [f"data.paths: {p} was made with another tokenizer than data.tokenizer_model={d.tokenizer_model} "
                    f"(its manifest records a tokenizer file of sha256 {r.get('tokenizer_sha256', '?')[:12]}{how})"]
    return []


def dataset_prefixes(paths, weights=None) -> list[str]:
    """``data.paths`` with each sharded preprocessing output (a prefix whose ``.shards.json`` manifest
    lists its shards, see megatron_osp/data/shardset.py) replaced by its shards in order, as if they had
    been listed. Without ``data.weights`` the shards are then blended by size like any list of paths;
    with weights, a sharded prefix is refused (one weight cannot say how to split among its shards)."""
    out = []
    for prefix in paths:
        shards = expand(prefix)
        if shards != [prefix] and weights is not None:
            raise ValueError(
                f"{prefix} is a sharded output ({len(shards)} datasets) and data.weights is set: list its "
                "shards in data.paths with a weight each, or merge them with tools/merge_datasets.py")
        out += shards
    return out


def check_data_settings(config) -> None:
    _fail(data_problems(config))


def reference_vocabulary(config) -> tuple[int, str]:
    """The vocabulary the data's ids must come from, and what it is called in messages: the
    tokenizer's when ``data.tokenizer_model`` is set (checked to fit the model), else the model's."""
    if config.data.tokenizer_model:
        vocab, _ = tokenizer_vocabulary(config.data.tokenizer_model)
        return vocab, f"the tokenizer {config.data.tokenizer_model} ({vocab} pieces)"
    return config.model.vocab_size, f"model.vocab_size={config.model.vocab_size}"
