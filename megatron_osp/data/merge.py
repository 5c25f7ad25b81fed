"""Merge indexed datasets into one: .bin files streamed back to back, indices joined.

Document boundaries are kept (a Megatron dataset with several sequences per document stays so), the
result is byte-identical to Megatron-Core's ``IndexedDatasetBuilder.add_index`` merge (tested), and it
is written under temporary names and renamed at the end, so a failed merge leaves nothing and leaves an
earlier output of that prefix as it was (replace.replace_dataset: killed while renaming, it leaves the
earlier pair, the new one or no .idx, never the new .bin beside the old .idx; the next merge or
preprocessing run on the prefix first puts an earlier pair left without its .idx back, replace.restore_aside).

When every input has a manifest (a preprocessing output, or a merge of such), the output is published
like a preprocessing run (shardset.Stage: staged, then moved in with ``OUTPUT.shards.json``) and its
manifest records what the inputs agree on: the tokenizer identity (``vocab_size``,
``tokenizer_sha256``, ``tokenizer_fingerprint``, ``tokenizer``), ``eod``, ``append_eod``,
``special_tokens_in_text`` (``special_text.merged_mode``), the output's ``dtype`` and, in its dataset
entry as preprocessing does, ``max_token_id`` (the largest the inputs record; an input that does not
record it, a merge written before, is scanned); a field the inputs do not all record with one value is
left out (two files of one fingerprint: no sha256), never guessed, and run options that may differ
(``inputs``, ``max_shard_tokens``, ``skip_bad_records``) are not carried. ``merged_from`` names the
datasets merged and their manifests. So training and later merges refuse to mix the result with data of
another tokenizer, as they refuse its inputs. If any input lacks a manifest the output has none (its
tokenizer is unknown for that part) and the result says why; an earlier merge's manifest on that prefix
is then removed with the files it described. Only a prefix that an earlier ``merge_datasets`` published
may be written over; a preprocessing output may not.

A preprocessing output with a manifest (megatron_osp/data/shardset.py) is merged as its manifest
lists it: an input that names the family (``corpus_text_document`` of a sharded run) stands for its
shards, and a directory gives only the listed datasets of such a family, never a leftover.

``merge_tasks`` joins the outputs of preprocessing array tasks (megatron_osp/data/array_tasks.py)
into the output one single run would have published.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from megatron_osp.data import shardset, special_text, tokenizer_identity
from megatron_osp.data.content_identity import SAMPLE_FIELD, dataset_id, merged_sample, recorded_samples
from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter, check_dtype_holds
from megatron_osp.data.replace import aside_hint
from megatron_osp.data.token_range import scan_token_range
from megatron_osp.fileio import atomic_write_json


def merge_datasets(input_prefixes: list[str], output_prefix: str, vocab_size: int | None = None,
                   tokenizer_sha256: str | None = None, tokenizer_fingerprint: str | None = None) -> dict:
    """Write ``output_prefix``.{bin,idx} = the inputs in order. All inputs must share a dtype, and the
    preprocessing outputs among them (those with a manifest) a tokenizer and EOD setting.

    ``vocab_size``: also refuse a dtype that cannot hold that vocabulary's ids, and any input holding
    an id outside it (one pass over the tokens), naming the dataset. ``tokenizer_sha256`` and
    ``tokenizer_fingerprint`` (data/tokenizer_identity.py) of a tokenizer file: refuse an input whose
    manifest records another tokenizer (by fingerprint where both have one, else by file sha256).

    Returns counts, ``manifest`` (the output's manifest path, None without one), ``no_manifest``
    (why there is none, or None) and ``notes`` (what a merge cut short on this prefix left, restored,
    removed or replaced); see the module docstring for what the manifest records.
    """
    if not input_prefixes:
        raise ValueError("no input datasets to merge")
    shardset.check_output_prefix(output_prefix)  # before the cleaning below: also for a plain (unstaged) merge
    for given, what in [(str(output_prefix), "output prefix")] + [(str(p), "input") for p in input_prefixes]:
        if given.endswith((".bin", ".idx")) and (what == "output prefix" or not os.path.exists(given + ".idx")):
            raise ValueError(f"{what} {given}: a file name, not a dataset prefix: give the prefix without "
                             f"{given[-4:]}, {given[:-4]} (the dataset is PREFIX.bin and PREFIX.idx)")
        if what == "input" and os.path.isdir(given) and not os.path.exists(given + ".idx"):  # "DIR.idx does not exist"
            raise ValueError(f"input {given}: a directory, not a dataset prefix (PREFIX.bin and PREFIX.idx); "
                             f"--input-dir {given} merges every dataset in it")
    # what a merge killed on this prefix left, first: an earlier pair a replace cut short set aside is put
    # back (shardset.restore_aside) even if this merge is then refused
    notes = shardset.clean_stale_temporaries(output_prefix)
    if os.path.exists(f"{output_prefix}.bin") and not os.path.exists(f"{output_prefix}.idx"):
        notes.append(f"replaced {output_prefix}.bin, left without its .idx by a write that was cut short")
    try:
        return _merge(input_prefixes, output_prefix, vocab_size, tokenizer_sha256, tokenizer_fingerprint, notes)
    except Exception as e:  # a refused merge: what the cleaning did (an earlier pair put back) still said
        e.cleanup_notes = notes
        raise


def _merge(input_prefixes: list[str], output_prefix: str, vocab_size: int | None, tokenizer_sha256: str | None,
           tokenizer_fingerprint: str | None, notes: list[str]) -> dict:
    """``merge_datasets`` after the cleaning of ``output_prefix`` (``notes``: what it did)."""
    expanded = [(p, given) for given in input_prefixes for p in shardset.expand(given)]
    input_prefixes = [p for p, _ in expanded]
    out = os.path.realpath(output_prefix)
    seen: dict[str, str] = {}
    for prefix, given in expanded:
        if os.path.realpath(prefix) == out:
            raise ValueError(f"{prefix}: the output prefix is also an input")
        real = dataset_id(prefix)
        if real in seen:
            how = "" if seen[real] == given else f" (as {seen[real]} and as {given})"
            raise ValueError(f"{prefix}: given twice as input{how}; its documents would be in the output twice")
        seen[real] = given
    _check_no_source_twice(input_prefixes, seen)
    family = shardset.family_of(output_prefix)
    earlier = family == str(output_prefix) and _merge_output(family)  # an earlier merge's: replaced
    if family is not None and not earlier:
        raise ValueError(f"{output_prefix}: belongs to the preprocessing output {shardset.manifest_path(family)} "
                         "describes; merge into another prefix")
    datasets = [IndexedDataset(p) for p in input_prefixes]  # each validated on open, by name
    dtype = datasets[0].dtype
    for ds in datasets[1:]:
        if ds.dtype != dtype:
            raise ValueError(
                f"{ds.prefix}: token dtype {ds.dtype} differs from {datasets[0].prefix}'s {dtype}; "
                "datasets from tokenizers of different sizes cannot be merged"
            )
    check_dtype_holds(dtype, 1, f"{datasets[0].prefix}.idx")  # an integer type at all
    recorded = {p: shardset.recorded_tokens(p) for p in input_prefixes}
    shardset.check_same_tokens(recorded)
    vocabs = {p: r["vocab_size"] for p, r in recorded.items() if "vocab_size" in r}
    if vocab_size is not None and vocabs and vocab_size != next(iter(vocabs.values())):
        p, v = next(iter(vocabs.items()))
        raise ValueError(f"{p}: made with a tokenizer of {v} ids (its manifest), not {vocab_size}")
    given = {k: v for k, v in (("tokenizer_sha256", tokenizer_sha256),
                               ("tokenizer_fingerprint", tokenizer_fingerprint)) if v is not None}
    for p, r in recorded.items():
        if given and tokenizer_identity.same_tokenizer(r, given) is False:
            how = (", which encodes differently" if "tokenizer_fingerprint" in r and tokenizer_fingerprint else "")
            raise ValueError(f"{p}: made with another tokenizer (its manifest records sha256 "
                             f"{r.get('tokenizer_sha256', '?')[:12]}, the given one has "
                             f"{(tokenizer_sha256 or '?')[:12]}{how})")
    vocab = vocab_size if vocab_size is not None else next(iter(vocabs.values()), None)
    if vocab is not None:
        check_dtype_holds(dtype, vocab, f"{datasets[0].prefix}.idx")
    tops: dict[str, int] = {}  # the largest id of each input scanned
    if vocab_size is not None:  # asked for: one pass over the tokens
        for ds in datasets:
            _, top = scan_token_range(ds)  # chunked; (0, -1) for an empty .bin
            tops[ds.prefix] = top
            if top >= vocab_size:
                raise ValueError(f"{ds.prefix}.bin: holds token id {top}, outside the vocabulary of {vocab_size}")
    families = {p: shardset.family_of(p) for p in input_prefixes}
    merged_from = {"datasets": [os.path.abspath(p) for p in input_prefixes],
                   "manifests": [shardset.manifest_path(os.path.abspath(f)) for f in dict.fromkeys(families.values())
                                 if f is not None]}
    lacking = [p for p, f in families.items() if f is None]
    if lacking:
        _write_plain(datasets, str(output_prefix), dtype, merged_from if earlier else None)
        why = ("no input has one" if len(lacking) == len(input_prefixes) else
               f"{lacking[0]} has none ({len(lacking)} of {len(input_prefixes)} inputs lack one), so its tokenizer "
               "is unknown")
        merged = IndexedDataset(output_prefix)
        counts = {"sequences": len(merged), "tokens": merged.num_tokens}
    else:
        counts = _publish(datasets, str(output_prefix), dtype, max(_max_token_id(ds, tops) for ds in datasets), {
            **_agreed(recorded, families), "dtype": dtype.name, "merged_from": merged_from})
    return {"datasets": len(datasets), "sequences": counts["sequences"], "tokens": counts["tokens"],
            "manifest": None if lacking else shardset.manifest_path(output_prefix),
            "no_manifest": f"{output_prefix}: written without a manifest: {why}" if lacking else None, "notes": notes}


def _check_no_source_twice(input_prefixes: list[str], seen: dict[str, str]) -> None:
    """Refuse an input that an earlier merge made from another input (``--input-dir data/`` holding
    ``data/all`` beside the ``data/a`` it was merged from), or two inputs merged from one dataset: the
    documents would be in the output twice. ``seen``: the inputs' ``dataset_id``s -> how each was given."""
    sources: dict[str, str] = {}  # a dataset an input was merged from -> that input
    for prefix in input_prefixes:
        for source in shardset.merged_sources(prefix):
            real = dataset_id(source)
            if real in seen:
                raise ValueError(f"{prefix}: was merged from {source} (its manifest's merged_from), which is also an "
                                 f"input ({seen[real]}); its documents would be in the output twice. Merge the "
                                 "datasets it was merged from instead, or leave one of the two out")
            other = sources.setdefault(real, prefix)
            if other != prefix:
                raise ValueError(f"{prefix} and {other}: both were merged from {source} (their manifests' "
                                 "merged_from); its documents would be in the output twice")


def _merge_output(family: str) -> bool:
    """Whether the manifest of ``family`` is one ``merge_datasets`` wrote (complete or cut short)."""
    merged_from = shardset.read_manifest(family).get("merged_from")
    return isinstance(merged_from, dict) and isinstance(merged_from.get("datasets"), list)


def _agreed(recorded: dict[str, dict], families: dict[str, str]) -> dict:
    """What the inputs' manifests (already checked to agree) all record alike: the merged manifest's
    tokenizer and EOD fields. A field one input lacks, or that differs between inputs (the sha256s of
    two files of one fingerprint, the EOD ids of datasets without EOD), is left out."""
    out = {}
    paths = {shardset._listed(f)[0].get("tokenizer") for f in set(families.values())}  # read once, kept
    if len(paths) == 1 and isinstance(next(iter(paths)), str):
        out["tokenizer"] = paths.pop()
    for key in ("vocab_size", "tokenizer_sha256", "tokenizer_fingerprint", "eod", "append_eod"):
        values = [r.get(key) for r in recorded.values()]
        if values[0] is not None and all(type(v) is type(values[0]) and v == values[0] for v in values):
            out[key] = values[0]
    out[special_text.FIELD] = special_text.merged_mode(r[special_text.FIELD] for r in recorded.values())
    return out


def _max_token_id(ds: IndexedDataset, scanned: dict[str, int]) -> int:
    """The largest id in an input with a manifest (-1: none): as its manifest entry records it (a
    preprocessing output's does; its size is checked on open), else from one pass over its .bin."""
    entry = shardset._listed(shardset.family_of(ds.prefix))[1][os.path.basename(ds.prefix)]
    top = entry.get("max_token_id")
    if isinstance(top, int) and not isinstance(top, bool) and top >= -1:
        return top
    if ds.prefix not in scanned:
        scanned[ds.prefix] = scan_token_range(ds)[1]
    return scanned[ds.prefix]


def _publish(datasets: list[IndexedDataset], output_prefix: str, dtype, max_token_id: int, info: dict) -> dict:
    """Write the merge in a stage directory and publish it with a manifest (shardset.Stage); returns
    its entry in the manifest (name, counts and ``max_token_id``, as preprocessing records it)."""
    directory, base = os.path.split(os.path.abspath(output_prefix))
    shard = re.compile(rf"^{re.escape(base)}_\d{{5,}}\.(bin|idx)$")  # publishing removes them; readers would refuse
    clash = sorted(n for n in os.listdir(directory) if shard.match(n)) if os.path.isdir(directory) else []
    if clash:
        raise ValueError(f"{os.path.join(os.path.dirname(output_prefix), clash[0])}: named like a shard of "
                         f"{output_prefix}, which is published with a manifest (every input has one) and would "
                         "replace it; merge into another prefix")
    stage = shardset.Stage(output_prefix)
    try:
        staged = stage.staged(output_prefix)
        with IndexedDatasetWriter(staged, dtype) as writer:
            for ds in datasets:
                writer.add_dataset(ds)
        written = IndexedDataset(staged)
        entry = {"name": os.path.basename(output_prefix), "documents": len(written.document_indices) - 1,
                 "sequences": len(written), "tokens": int(written.num_tokens), "max_token_id": int(max_token_id)}
        sample = merged_sample([ds.prefix for ds in datasets])  # the union of the inputs' (content_identity)
        if sample is not None:
            entry[SAMPLE_FIELD] = sample
        del written
        stage.publish({output_prefix: [entry]}, info)
    except BaseException:
        stage.abort()
        raise
    return entry


def _write_plain(datasets: list[IndexedDataset], output_prefix: str, dtype, earlier: dict | None) -> None:
    """Write the merge without a manifest. ``earlier``: the output is an earlier merge's, whose
    manifest goes: marked "publishing" once the new files are written (readers refuse the output
    while it is replaced), removed once they are in place."""
    writer = IndexedDatasetWriter(output_prefix, dtype)
    try:
        for ds in datasets:
            writer.add_dataset(ds)
    except BaseException:
        writer.abort()
        raise
    if earlier is not None:
        atomic_write_json(shardset.manifest_path(output_prefix),
                          {"format": shardset.FORMAT, "state": "publishing", "datasets": [], "merged_from": earlier})
    writer.finalize()
    if earlier is not None:
        os.unlink(shardset.manifest_path(output_prefix))


def prefixes_in(directory: str | os.PathLike, skipped: list[str] | None = None, output: str | None = None) -> list[str]:
    """Every dataset (``*.idx`` with its ``.bin``) in a directory, sorted by name; of a preprocessing
    output with a manifest, only the datasets it lists (the others are appended to ``skipped``). A .bin
    without its .idx (a write cut short) is refused, not left out, unless it is ``output``'s (replaced)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory")
    found, left_out = shardset.datasets_in_directory(d)
    out = os.path.realpath(output) if output is not None else None
    for b in sorted(d.glob("*.bin")):
        prefix = str(b)[:-4]
        if (not os.path.exists(prefix + ".idx") and os.path.realpath(prefix) != out
                and shardset.family_of(prefix) is None):
            raise FileNotFoundError(f"{b}: has no .idx beside it (its writing was cut short?), so the merge would "
                                    f"leave it out; rerun what wrote it, or remove it{aside_hint(prefix)}")
    tasks = [p for p in found if re.search(r"_task\d{5}of\d{5}_.+_document(_\d{5,})?$", os.path.basename(p))]
    if tasks:
        prefix = re.sub(r"_task\d{5}of\d{5}_.+$", "", tasks[0])
        raise ValueError(f"{d}: holds preprocessing array task outputs ({os.path.basename(tasks[0])}, ...): merge them "
                         f"with --tasks {prefix}, which checks the set is complete and one run (--input-dir would also "
                         "take their merged result, if it is there)")
    if skipped is not None:
        skipped += left_out
    if not found:
        raise FileNotFoundError(f"{d}: no .idx files" + (" outside what the manifests leave out" if left_out else ""))
    return found


def merge_tasks(prefix: str, output_prefix: str | None = None, num_tasks: int | None = None,
                tokenizer_model: str | None = None, max_shard_tokens: int | None = None,
                overwrite: bool = False) -> dict:
    """Merge the array tasks of ``prefix`` (the ``--output-prefix`` they were given) in task order and
    publish ``<output_prefix or prefix>_<key>_document`` as one preprocessing output (manifest and all).

    The documents go through the same writer as a single run (``sharded_output.ShardedOutput``), so the
    result is byte-identical to a single run over the same inputs with the same ``max_shard_tokens``
    (None: one unsharded dataset), whatever shard size the tasks used. Refuses, before writing, a set
    with a missing or incomplete task or with tasks of different runs (array_tasks.find_task_set);
    ``tokenizer_model``, if given, must be the file the tasks used or one of its fingerprint (the same
    ids, data/tokenizer_identity.py). The tasks' outputs are kept. An earlier output of the prefix that
    is not of the run's inputs (a plain merge's, another run's) is refused unless ``overwrite``, as a
    preprocessing run refuses it (``sharded_output.check_earlier_output``).
    """
    from megatron_osp.data import array_tasks
    from megatron_osp.data.indexed import token_dtype_for
    from megatron_osp.data.sharded_output import ShardedOutput, check_earlier_output, output_prefix_for

    if max_shard_tokens is not None and max_shard_tokens < 1:
        raise ValueError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
    output_prefix = str(output_prefix or prefix)
    found = array_tasks.find_task_set(str(prefix), num_tasks)
    run, keys = found["run"], found["keys"]
    # The tasks are one run, so of one tokenizer file (its sha256 is in the run's identity), whose
    # fingerprint their manifests record. If none does (written before fingerprints were) or they
    # disagree (two versions of this code), the merged manifest has none: the sha256 decides, as for
    # any old manifest.
    recorded = {shardset.recorded_tokens(f).get("tokenizer_fingerprint") for f in found["families"]} - {None}
    fingerprint = {"tokenizer_fingerprint": recorded.pop()} if len(recorded) == 1 else {}
    if tokenizer_model is not None:
        path = str(tokenizer_model)
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        mine = {"tokenizer_sha256": shardset.sha256_file(path),
                "tokenizer_fingerprint": tokenizer_identity.tokenizer_fingerprint(path)}
        theirs = {"tokenizer_sha256": run["options"]["tokenizer_sha256"], **fingerprint}
        if not tokenizer_identity.same_tokenizer(mine, theirs):
            raise ValueError(f"--tokenizer-model {tokenizer_model}: not the tokenizer the tasks used "
                             f"({run['tokenizer']}, sha256 {run['options']['tokenizer_sha256'][:12]})")
    families = {os.path.realpath(f) for f in found["families"]}
    for key in keys:
        if os.path.realpath(output_prefix_for(output_prefix, key)) in families:
            raise ValueError(f"{output_prefix}: the merged output {output_prefix_for(output_prefix, key)} would "
                             "replace one of the tasks' outputs")
    check_earlier_output(output_prefix, keys, found["inputs"], overwrite)
    datasets = [[IndexedDataset(p) for p in found["datasets"][key]] for key in keys]  # each checked on open
    dtype = np.dtype(token_dtype_for(run["options"]["vocab_size"]))
    for group in zip(*datasets):
        for ds in group:
            if ds.dtype != dtype:
                raise ValueError(f"{ds.prefix}: token dtype {ds.dtype}, but the run's tokenizer needs {dtype}")
            if len(ds) != len(group[0]):
                raise ValueError(f"{ds.prefix}: {len(ds)} documents, but {group[0].prefix} has {len(group[0])}; "
                                 "the keys of a task must hold the same documents")
    if len({len(d) for d in datasets}) > 1:
        raise ValueError(f"{prefix}: the tasks' keys {keys} do not have the same number of datasets")
    documents = sum(len(ds) for ds in datasets[0])
    if not documents:
        raise ValueError(f"{prefix}: no task has any non-empty document (a single run over these inputs fails too)")
    # An output of one dataset per key has as its content sample the tasks' samples together (each is
    # its documents' sampled hashes, duplicates kept, as a single run keeps them): taken from their
    # manifests instead of hashing every document again. Sharded output, or a task without a sample,
    # hashes (the sample is per output shard).
    known = None
    if max_shard_tokens is None:
        known = [recorded_samples([ds.prefix for ds in per_key]) for per_key in datasets]
        if any(s is None for s in known):
            known = None
    output = ShardedOutput(output_prefix, keys, dtype, max_shard_tokens)
    try:
        for group in zip(*datasets):
            for lengths, tokens in _chunks(group):
                output.add_documents(lengths, tokens, samples=[[] for _ in keys] if known else None)
        for key, sample in zip(keys, known or ()):
            output.add_known_sample(key, sample.tolist())
        outputs = output.finalize({
            "tokenizer": run["tokenizer"], "vocab_size": run["options"]["vocab_size"],
            "tokenizer_sha256": run["options"]["tokenizer_sha256"], **fingerprint, "eod": run["options"]["eod"],
            "dtype": dtype.name,
            "inputs": found["inputs"], "append_eod": run["options"]["append_eod"],
            "special_tokens_in_text": run["options"].get("special_tokens_in_text", "encode"),
            "max_shard_tokens": max_shard_tokens, "skip_bad_records": found["skip_bad_records"],
            "merged_from": {"tasks": found["num_tasks"], "prefix": str(prefix), "run": run["run"]}})
    except BaseException:
        output.abort()
        raise
    return {"tasks": found["num_tasks"], "outputs": outputs, "sequences": documents,
            "tokens": sum(ds.num_tokens for ds in datasets[0])}


CHUNK_DOCUMENTS, CHUNK_BYTES = 1 << 20, 256 << 20


def _chunks(group):
    """Documents of aligned datasets (one per key) as (lengths per key, tokens per key), in pieces of
    at most ``CHUNK_DOCUMENTS`` documents starting within ``CHUNK_BYTES`` of the piece's first (memory
    bounded, whatever the corpus size); the tokens are views of the memory-mapped .bin files."""
    n = len(group[0])
    pointers = group[0].sequence_pointers
    start = 0
    while start < n:
        stop = int(np.searchsorted(pointers, int(pointers[start]) + CHUNK_BYTES, side="left"))
        stop = min(n, start + CHUNK_DOCUMENTS, max(stop, start + 1))
        lengths, tokens = [], []
        for ds in group:
            part = np.asarray(ds.sequence_lengths[start:stop], dtype=np.int64)
            first = int(ds.sequence_pointers[start])
            lengths.append(part)
            tokens.append(ds._bin[first:first + int(part.sum()) * ds.dtype.itemsize].view(ds.dtype))
        yield lengths, tokens
        start = stop


__all__ = ["merge_datasets", "merge_tasks", "prefixes_in"]
