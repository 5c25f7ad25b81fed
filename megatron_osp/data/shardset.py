"""A preprocessing run's output as one unit: staged in full, then published together with a manifest.

For an output family ``F = <prefix>_<key>_document`` the files are::

    F.bin / F.idx                       the unsharded output, or
    F_00000.bin / F_00000.idx, ...      its shards
    F.shards.json                       the manifest: the datasets the last run published, with sizes
    .<prefix name>.stage-<host>-<pid>/  a run in progress: its whole output, under the final names

A run writes only inside its stage directory. When every shard of every key is finished, ``publish``
(holding a lock on the directory) marks each manifest "publishing", removes the family's previous
files (unsharded and sharded alike, so no shard of an earlier run survives), renames the staged files
in and writes the manifest "complete". A run that fails or is killed before that point leaves the
earlier output as it was; the publish itself is only unlinks and renames inside one directory, and if
even that is cut short the manifest still says "publishing", which readers refuse by name.

Readers honour the manifest: ``IndexedDataset`` refuses a family member the manifest does not list, or
whose size differs from it, and ``merge_datasets --input-dir`` takes only the listed datasets.
``merge_datasets`` publishes its own output this way when every input has a manifest (data/merge.py). Stage
directories of dead runs (same host, pid gone) and the writer's ``.tmp-<host>-<pid>`` files of dead runs
are removed when the next run or merge on that prefix starts; ones from another host are named only
(data/run_owner.py). A dataset that ``replace_dataset`` (data/replace.py) was killed replacing has either
its new pair, and the old files set aside as ``.old-<host>-<pid>`` are removed then too, or no .idx: then
the earlier pair is put back from the aside files first (``restore_aside``), before the new run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from megatron_osp.data import special_text
from megatron_osp.data.replace import pid_alive, replace_dataset, restore_aside  # noqa: F401 (imported from here)
from megatron_osp.data.run_owner import DEAD, ELSEWHERE, TAG, host, owner, owner_state
from megatron_osp.data.tokenizer_identity import same_tokenizer
from megatron_osp.fileio import atomic_write_json

MANIFEST_SUFFIX = ".shards.json"
FORMAT = 1
_SHARD = re.compile(r"^(?P<family>.+)_(?P<number>\d{5,})$")  # _00000 ... _99999, _100000 ...


def manifest_path(family: str | os.PathLike) -> str:
    return f"{family}{MANIFEST_SUFFIX}"


def remove_stale_temporaries(directory: Path, name: str, suffix: str = "") -> None:
    """Remove the files ``<name>.tmp-<host>-<pid><suffix>`` (or ``.tmp<pid>``) in ``directory``
    (``suffix`` a regex) whose writing process, of this host, is gone: what a write killed midway left."""
    stale = re.compile(rf"^{re.escape(name)}\.tmp{TAG}{suffix}$")
    for p in Path(directory).iterdir():
        m = stale.match(p.name)
        if m and p.is_file() and owner_state(m) == DEAD:
            p.unlink(missing_ok=True)


def read_manifest(family: str) -> dict:
    """The manifest of ``family``, checked for form; errors name the file."""
    path = manifest_path(family)
    try:
        with open(path) as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable shard manifest ({e}); rerun preprocessing") from None
    ok = (isinstance(m, dict) and m.get("format") == FORMAT and m.get("state") in ("publishing", "complete")
          and isinstance(m.get("datasets"), list)
          and all(isinstance(d, dict) and isinstance(d.get("name"), str) for d in m["datasets"]))
    if not ok:
        raise ValueError(f"{path}: not a shard manifest of format {FORMAT}; rerun preprocessing")
    return m


def family_of(prefix: str | os.PathLike) -> str | None:
    """The family whose manifest covers the dataset ``prefix`` (itself or its shard name), or None."""
    prefix = str(prefix)
    if os.path.exists(manifest_path(prefix)):
        return prefix
    m = _SHARD.match(prefix)
    if m and os.path.exists(manifest_path(m.group("family"))):
        return m.group("family")
    return None


_CACHE: dict[tuple[str, str], tuple[tuple, object]] = {}  # (what, manifest path) -> (its stat, the value)


def _cached(what: str, family: str, make):
    """``make(family)``, kept while the family's manifest is unchanged (same inode, size and mtime;
    publishing replaces it): every shard of a family asks for its manifest, and reading it each time
    made opening N shards cost N^2."""
    path = os.path.abspath(manifest_path(family))
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    cached = _CACHE.get((what, path))
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    result = make(family)
    if key is not None:
        _CACHE[(what, path)] = (key, result)
    return result


def manifest(family: str) -> dict:
    """``read_manifest(family)``, read once while the file is unchanged (``_cached``): the same dict is
    returned to every caller, which must not change it."""
    return _cached("manifest", family, read_manifest)


def _listed(family: str) -> tuple[dict, dict[str, dict]]:
    """The complete manifest of ``family`` and its datasets by name (``_cached``)."""
    return _cached("listed", family, _read_listed)


def merged_sources(prefix: str | os.PathLike) -> list[str]:
    """The datasets ``prefix`` was merged from, as its family's manifest records them (``merged_from``,
    written by ``merge_datasets``), and theirs in turn (a merge of merges), each family read once;
    [] for a dataset no merge made. An unreadable manifest adds nothing here: reading the dataset
    refuses it, naming the file."""
    out, todo, visited = [], [str(prefix)], set()
    while todo:
        family = family_of(todo.pop())
        if family is None or os.path.realpath(family) in visited:
            continue
        visited.add(os.path.realpath(family))
        try:
            recorded = manifest(family).get("merged_from")
        except (OSError, ValueError):
            continue
        datasets = recorded.get("datasets") if isinstance(recorded, dict) else None
        for d in datasets if isinstance(datasets, list) else []:
            if isinstance(d, str):
                out.append(d)
                todo.append(d)
    return out


def _read_listed(family: str) -> tuple[dict, dict[str, dict]]:
    m = manifest(family)
    if m["state"] != "complete":
        raise ValueError(
            f"{manifest_path(family)}: the run that wrote {family} was interrupted while publishing "
            "(state 'publishing'); its files are a mix of two runs: rerun preprocessing")
    return m, {d["name"]: d for d in m["datasets"]}


def check_published(prefix: str | os.PathLike) -> None:
    """Refuse a dataset that its family's manifest does not list, or whose files changed size since."""
    prefix = str(prefix)
    family = family_of(prefix)
    if family is None:
        return
    _, listed = _listed(family)
    name = os.path.basename(prefix)
    if name not in listed:
        if name == os.path.basename(family) and listed:
            shards = list(listed)
            raise FileNotFoundError(
                f"{prefix}: this output is sharded; {manifest_path(family)} lists {len(shards)} datasets "
                f"({shards[0]} ... {shards[-1]}): give those, or merge them with tools/merge_datasets.py")
        raise ValueError(f"{prefix}: not among the datasets {manifest_path(family)} lists (left over from an "
                         "earlier run?); remove it or rerun preprocessing")
    for ext in (".bin", ".idx"):
        want = listed[name].get(ext[1:] + "_bytes")
        if want is not None and os.path.exists(prefix + ext) and os.path.getsize(prefix + ext) != want:
            raise ValueError(f"{prefix}{ext}: {os.path.getsize(prefix + ext)} bytes, but {manifest_path(family)} "
                             f"published it with {want}; it was changed or replaced since")


def expand(prefix: str | os.PathLike) -> list[str]:
    """A family prefix -> the datasets its manifest lists (in order); any other prefix -> itself."""
    prefix = str(prefix)
    if not os.path.exists(manifest_path(prefix)):
        return [prefix]
    _, listed = _listed(prefix)
    return [os.path.join(os.path.dirname(prefix), name) for name in listed]


def sha256_file(path: str | os.PathLike) -> str:
    """A file's SHA-256 (hex): how a manifest names the tokenizer its ids came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded_tokens(prefix: str | os.PathLike) -> dict:
    """What the manifest of ``prefix``'s family records about how its ids were made: ``vocab_size``,
    ``tokenizer_sha256``, ``tokenizer_fingerprint`` (data/tokenizer_identity.py; manifests written
    before it lack it), ``eod``, ``append_eod`` (those it has; an array task's come from its run's
    options), ``special_tokens_in_text`` (data/special_text.py; "encode", what was done before the
    option, where the manifest lacks it); {} without a manifest."""
    family = family_of(prefix)
    if family is None:
        return {}
    m = _listed(family)[0]
    array = m.get("array")
    options = array.get("options", {}) if isinstance(array, dict) else {}
    out = {}
    for key, kind in (("vocab_size", int), ("tokenizer_sha256", str), ("tokenizer_fingerprint", str), ("eod", int),
                      ("append_eod", bool)):
        v = m.get(key, options.get(key))
        if isinstance(v, kind) and (kind is bool or not isinstance(v, bool)):
            out[key] = v
    mode = m.get(special_text.FIELD, options.get(special_text.FIELD, special_text.DEFAULT))
    out[special_text.FIELD] = mode if isinstance(mode, str) else repr(mode)
    return out


def check_same_tokens(recorded: dict[str, dict], eod: bool = True) -> None:
    """Refuse datasets whose manifests say their ids came from different tokenizers (sizes; then
    fingerprints where both record one, else files; every pair, ``_different_tokenizers``) or, with
    ``eod``, different EOD settings (one ends documents with EOD, another not, or with another id),
    naming two. ``recorded``: dataset prefix -> its ``recorded_tokens``. Two tokenizer files of one
    fingerprint make the same ids (data/tokenizer_identity.py), so their datasets mix. Datasets that
    encoded a special token written in text differently (``special_tokens_in_text``, encode and split;
    data/special_text.py) are refused with or without ``eod``."""
    def first_difference(key, applies=lambda r: True):
        seen = [(p, r[key]) for p, r in recorded.items() if key in r and applies(r)]
        return next(((seen[0], b) for b in seen[1:] if b[1] != seen[0][1]), None)

    if d := first_difference("vocab_size"):
        (a, va), (b, vb) = d
        raise ValueError(f"{b}: made with a tokenizer of {vb} ids, {a} with one of {va} (their manifests); "
                         "datasets of different tokenizers cannot be merged or trained on together")
    if d := _different_tokenizers(recorded):
        (a, ra), (b, rb) = d
        raise ValueError(f"{b}: made with another tokenizer than {a} (their manifests record tokenizer files of "
                         f"{_tokenizer_note(rb, ra)}); datasets of different tokenizers cannot be merged "
                         "or trained on together")
    if d := _different_special_text(recorded):
        (a, va), (b, vb) = d
        raise ValueError(f"{b}: made with --special-tokens-in-text {vb}, {a} with {va} (their manifests: "
                         f"{special_text.FIELD}); a special token written in a document's text (<|endoftext|> in a "
                         "web page) is its id in one and ordinary text in the other: preprocess them with one setting")
    if not eod:
        return
    if d := first_difference("append_eod"):
        (a, va), (b, vb) = d
        raise ValueError(f"{b}: its documents {'end' if vb else 'do not end'} with an EOD token, {a}'s "
                         f"{'do' if va else 'do not'} (their manifests: append_eod); merged, documents would "
                         "run together in part of the data")
    if d := first_difference("eod", applies=lambda r: r.get("append_eod") is True):
        (a, va), (b, vb) = d
        raise ValueError(f"{b}: its documents end with EOD id {vb}, {a}'s with {va} (their manifests); "
                         "datasets of different EOD tokens cannot be merged")


def _different_tokenizers(recorded: dict[str, dict]):
    """The first pair (earlier, later) of datasets whose tokenizers are not shown to be one, or None.

    Shown to be one: the same file (sha256) or the same fingerprint, directly or through other datasets
    of the mix (a manifest of file X without a fingerprint, one of X with fingerprint F and one of
    another file with F are one tokenizer, in any order). Refused: a pair ``same_tokenizer`` judges
    different that no such chain joins, and two fingerprints of one scheme that differ, chain or not.
    Every pair is judged (of the distinct records: a sharded output's datasets share one), not each
    against the first, which made the verdict depend on the order of the mix."""
    keys = ("tokenizer_sha256", "tokenizer_fingerprint")
    distinct: dict[tuple, tuple[str, dict]] = {}
    for p, r in recorded.items():
        ident = tuple(r.get(k) if isinstance(r.get(k), str) else None for k in keys)
        if any(ident):
            distinct.setdefault(ident, (p, r))
    idents = list(distinct)
    parent = list(range(len(idents)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}  # (field, value) -> the first record holding it
    for i, ident in enumerate(idents):
        for k, v in zip(keys, ident):
            if v is not None:
                parent[root(i)] = root(first.setdefault((k, v), i))
    for j in range(len(idents)):
        for i in range(j):
            (a, ra), (b, rb) = distinct[idents[i]], distinct[idents[j]]
            fa, fb = idents[i][1], idents[j][1]
            by_fingerprint = fa is not None and fb is not None and fa.split(":")[0] == fb.split(":")[0]
            if same_tokenizer(ra, rb) is False and (by_fingerprint or root(i) != root(j)):
                return (a, ra), (b, rb)
    return None


def _different_special_text(recorded: dict[str, dict]):
    """The first pair ((earlier, mode), (later, mode)) whose ``special_tokens_in_text`` may not mix
    (``special_text.compatible``: not transitive, refuse mixes with both, so every distinct pair)."""
    first: dict[tuple, str] = {}  # (mode, fingerprint scheme) -> the first dataset with it
    for p, r in recorded.items():
        if special_text.FIELD in r:
            scheme = r.get("tokenizer_fingerprint", "").split(":")[0] or None
            first.setdefault((r[special_text.FIELD], scheme), p)
    seen = list(first.items())
    for j, ((mb, kb), b) in enumerate(seen):
        for (ma, ka), a in seen[:j]:
            kinds = {ka, kb} - {None}  # the pair's tokenizer kind, where a manifest says (hf1, sp1)
            if not special_text.compatible(ma, mb, kinds.pop() if len(kinds) == 1 else None):
                return (a, ma), (b, mb)
    return None


def _tokenizer_note(b: dict, a: dict) -> str:
    """How two records' tokenizers differ, for a message: their files' sha256s (which say which files
    were used), and that they encode differently when their fingerprints said so."""
    sb, sa = b.get("tokenizer_sha256", "?"), a.get("tokenizer_sha256", "?")
    note = f"sha256 {sb[:12]} and {sa[:12]}"
    fb, fa = b.get("tokenizer_fingerprint"), a.get("tokenizer_fingerprint")
    if fb and fa and fb.split(":")[0] == fa.split(":")[0]:
        note += f", which encode differently: tokenizer_fingerprint {fb[:16]} and {fa[:16]}"
    return note


def _name_order(prefix: str):
    """Sort key: by name, a shard after its family's lower-numbered shards (``_99999`` before ``_100000``,
    which sort the other way as text)."""
    m = _SHARD.match(prefix)
    return (m.group("family"), int(m.group("number"))) if m else (prefix, -1)


def datasets_in_directory(directory: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Every dataset (``*.idx``) of a directory, sorted by name (``_name_order``), where a manifest decides for its
    family: listed datasets only. Returns (datasets, family files skipped as not listed)."""
    d = Path(directory)
    found = sorted((str(p)[:-4] for p in d.glob("*.idx")), key=_name_order)
    keep, skipped = [], []
    for prefix in found:
        family = family_of(prefix)
        if family is None:
            keep.append(prefix)
            continue
        _, listed = _listed(family)
        if os.path.basename(prefix) in listed:
            check_published(prefix)
            keep.append(prefix)
        else:
            skipped.append(prefix)
    for m in sorted(d.glob("*" + MANIFEST_SUFFIX)):  # a listed dataset that is missing is an error
        family = str(m)[: -len(MANIFEST_SUFFIX)]
        for name in _listed(family)[1]:
            if not os.path.exists(os.path.join(d, name + ".idx")):
                raise FileNotFoundError(f"{m}: lists {name}, but {name}.idx is missing")
    return keep, skipped


_WRITER_TMP = re.compile(rf"^(?P<name>.+)\.(bin|idx)\.(?P<kind>tmp|old){TAG}$")  # writer's; replace_dataset's


def clean_stale_temporaries(prefix: str | os.PathLike) -> list[str]:
    """Remove temporaries of dead runs on ``prefix`` (this prefix's stage directories, and writer
    ``.tmp-<host>-<pid>`` and ``replace_dataset`` ``.old-<host>-<pid>`` files of names starting with its
    name; this host's runs only, another host's are named in a note); returns what was restored, removed
    or left, as notes. Aside (``.old...``) files of a dataset without its
    .idx are the earlier pair a replace cut short left: ``restore_aside`` puts them back first, and they
    are never removed while that dataset has no .idx (where they could not be put back, the note says why)."""
    prefix = str(prefix)
    d, base = os.path.dirname(prefix) or ".", os.path.basename(prefix)
    if not os.path.isdir(d):
        return []

    def ours(m):
        return m is not None and (m.group("name") == base or m.group("name").startswith(base + "_"))

    notes = []
    aside = {m.group("name") for m in map(_WRITER_TMP.match, os.listdir(d)) if ours(m) and m.group("kind") == "old"}
    for name in sorted(aside):
        notes += restore_aside(os.path.join(d, name))
    stage = re.compile(rf"^\.{re.escape(base)}\.stage-(?P<host>.+)-(?P<pid>\d+)$")
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name)
        m = stage.match(name) or _WRITER_TMP.match(name)
        if m is None or (m.re is _WRITER_TMP and not ours(m)):
            continue
        if m.re is _WRITER_TMP and m.group("kind") == "old" and not os.path.lexists(os.path.join(d, m.group("name") + ".idx")):
            continue  # an earlier pair restore_aside could not put back: kept, its note says why
        state = owner_state(m)
        if state == ELSEWHERE:
            notes.append(f"left {path}: a run on host {m.group('host')} (remove it if that run is over)")
        elif state == DEAD:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            notes.append(f"removed {path}, left by a run that did not finish ({owner(m)})")
    return notes


def family_files(family: str | os.PathLike, names: list[str] | None = None) -> list[str]:
    """The names of the .bin/.idx files of ``family``'s datasets (its shards too) in its directory, sorted;
    ``names``: that directory's listing, where the caller has it already."""
    if names is None:
        directory = os.path.dirname(os.path.abspath(family))
        names = os.listdir(directory) if os.path.isdir(directory) else []
    member = re.compile(rf"^{re.escape(os.path.basename(family))}(_\d{{5,}})?\.(bin|idx)$")
    return sorted(n for n in names if member.match(n))


def check_output_prefix(output_prefix: str | os.PathLike) -> None:
    """Refuse a prefix that names a directory: ``out/`` (hidden files ``out/.bin``, ``out/_text_document``),
    and ``out/.`` or ``out/..``, whose .bin/.idx would go to the directory above (``Stage`` takes its
    absolute path) while the manifest, in ``out/``, named datasets that were not beside it."""
    if os.path.basename(str(output_prefix)) in ("", ".", ".."):
        raise ValueError(f"output prefix {str(output_prefix)!r} names a directory, not a file prefix")


class Stage:
    """The directory a run writes into; ``publish`` moves its datasets into place as one unit."""

    def __init__(self, output_prefix: str | os.PathLike):
        self.output_prefix = str(output_prefix)
        self.directory = os.path.dirname(os.path.abspath(self.output_prefix))
        self.base = os.path.basename(self.output_prefix)
        check_output_prefix(self.output_prefix)
        self._created = []  # directories made for this output, removed again if the run fails
        d = self.directory
        while not os.path.isdir(d):
            self._created.append(d)
            d = os.path.dirname(d)
        os.makedirs(self.directory, exist_ok=True)
        self.notes = clean_stale_temporaries(os.path.join(self.directory, self.base))
        self.path = os.path.join(self.directory, f".{self.base}.stage-{host()}-{os.getpid()}")
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.mkdir(self.path)
        except OSError as e:  # named by the output directory, not the hidden stage's name
            raise type(e)(e.errno, f"cannot create files in the output directory {self.directory} ({e.strerror}; "
                                   f"tried {os.path.basename(self.path)})") from None

    def staged(self, final_prefix: str) -> str:
        """Where the dataset ``final_prefix`` (in the output directory) is written during the run."""
        return os.path.join(self.path, os.path.basename(final_prefix))

    def final(self, staged_prefix: str) -> str:
        return os.path.join(os.path.dirname(self.output_prefix), os.path.basename(staged_prefix))

    def abort(self) -> None:
        """Drop the stage, and the directories made for the output if they stayed empty."""
        shutil.rmtree(self.path, ignore_errors=True)
        for d in self._created:
            try:
                os.rmdir(d)
            except OSError:
                break

    def publish(self, families: dict[str, list[dict]], info: dict) -> None:
        """``families``: final family prefix -> its datasets (dicts with ``name`` and counts), all
        finished in the stage. Replaces each family's earlier files and manifest as described above."""
        import fcntl

        fd = os.open(self.directory, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # two runs on one prefix publish one after the other
            except OSError:  # a filesystem without locks: publishing still works, unserialized
                pass
            for family, datasets in families.items():
                atomic_write_json(manifest_path(family), {"format": FORMAT, "state": "publishing", "datasets": [],
                                                          **info})  # says whose publish was cut short
            names = os.listdir(self.directory)
            for family in families:
                for name in family_files(family, names):
                    os.unlink(os.path.join(self.directory, name))
            for family, datasets in families.items():
                for ds in datasets:
                    src = os.path.join(self.path, ds["name"])
                    ds["bin_bytes"], ds["idx_bytes"] = os.path.getsize(src + ".bin"), os.path.getsize(src + ".idx")
                    replace_dataset(src + ".bin", src + ".idx", os.path.join(self.directory, ds["name"]))
            for family, datasets in families.items():
                atomic_write_json(manifest_path(family), {
                    "format": FORMAT, "state": "complete", "datasets": datasets,
                    "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info})
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.rmtree(self.path, ignore_errors=True)
