"""The corpus files an --input names, for preprocess_data.py, train_tokenizer.py and check_tokenization.py:
files in the order given, a glob's matches and a directory's corpus files, each sorted. Our own outputs
(``output_file``: .bin/.idx, .shards.json manifests, the writer's temporaries) are never read as corpus
text: a directory and a glob leave them out, a file named alone is refused."""

import glob
import os
from pathlib import Path

from megatron_osp.data.shardset import _WRITER_TMP, MANIFEST_SUFFIX

__all__ = ["SUFFIXES", "corpus_files", "expand_inputs", "output_file"]

# Corpus files inside a directory input, by name, any case: what the readers read (.zstd and NDJSON too).
SUFFIXES = (".jsonl", ".json", ".ndjson", ".gz", ".zst", ".zstd", ".parquet")


def output_file(name: str) -> bool:
    """Whether a file name is one of a preprocessing run's or a merge's own: a dataset's .bin/.idx (its
    shards too), a manifest (.shards.json), a writer's ``.tmp-<host>-<pid>`` or a replace's ``.old-...``."""
    name = os.path.basename(name)
    return name.endswith((".bin", ".idx", MANIFEST_SUFFIX)) or _WRITER_TMP.match(name) is not None


def expand_inputs(specs: list[str], skipped: list[str] | None = None) -> list[str]:
    """Files in the order given; a glob or a directory contributes its corpus files, sorted. A name that
    exists is taken as it is, even with glob characters in it: ``part[1].jsonl`` as a pattern matches
    ``part1.jsonl``, another file, which was read in its place without a word. A glob's matches that are
    our own outputs (``output_file``: an earlier run's in the same directory) are left out, and appended
    to ``skipped`` if given, as a directory leaves them out; such a file named alone is refused: it was
    read as corpus text, its bytes bad records under --skip-bad-records."""
    out = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = corpus_files(p)
        elif any(c in spec for c in "*?[") and not p.exists():
            matches = sorted(glob.glob(spec, recursive=True))
            found = [f for f in matches if not output_file(f)]
            if skipped is not None:
                skipped += [f for f in matches if output_file(f)]
            if matches and not found:
                raise FileNotFoundError(f"--input {spec}: no corpus files match, only outputs of earlier runs "
                                        f"(never read as corpus): {', '.join(matches[:3])}"
                                        f"{', ...' if len(matches) > 3 else ''}")
        elif output_file(spec):
            raise ValueError(f"--input {spec}: a dataset file that preprocessing or merging writes (.bin, .idx, "
                             ".shards.json or a temporary of one), not corpus text; leave it out of --input")
        else:
            found = [spec]
        if not found:
            raise FileNotFoundError(f"--input {spec}: no corpus files match")
        out += found
    return out


def corpus_files(directory: Path) -> list[str]:
    """The corpus files under ``directory``, sorted, not the manifests of outputs written there
    (PREFIX_<key>_document.shards.json). A linked subdirectory is followed (Path.rglob left its files
    out without a word), each directory once (a link back up is no loop); a broken link or a FIFO named
    like a corpus file is refused: its documents would be missing from the output."""
    found, visited = [], set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        if os.path.realpath(root) in visited:
            dirs[:] = []
            continue
        visited.add(os.path.realpath(root))
        for name in files:
            if not name.lower().endswith(SUFFIXES) or output_file(name):
                continue
            f = os.path.join(root, name)
            if os.path.isfile(f):
                found.append(f)
            elif not os.path.exists(f):
                raise FileNotFoundError(f"{f}: a broken symbolic link (to {os.readlink(f)}) in the input directory "
                                        f"{directory}; its documents would be missing from the output")
            else:  # was left out without a word
                raise ValueError(f"{f}: not a regular file (a FIFO, socket or device) in the input directory "
                                 f"{directory}; give it as an --input of its own to read it, or move it out")
    return sorted(found)
