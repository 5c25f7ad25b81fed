"""The corpus files an --input names, for preprocess_data.py, train_tokenizer.py and check_tokenization.py:
files in the order given, a glob's matches and a directory's corpus files, each sorted."""

import glob
import os
from pathlib import Path

__all__ = ["SUFFIXES", "corpus_files", "expand_inputs"]

# Corpus files inside a directory input, by name, any case: what the readers read (.zstd and NDJSON too).
SUFFIXES = (".jsonl", ".json", ".ndjson", ".gz", ".zst", ".zstd", ".parquet")


def expand_inputs(specs: list[str]) -> list[str]:
    """Files in the order given; a glob or a directory contributes its corpus files, sorted. A name that
    exists is taken as it is, even with glob characters in it: ``part[1].jsonl`` as a pattern matches
    ``part1.jsonl``, another file, which was read in its place without a word."""
    out = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = corpus_files(p)
        elif any(c in spec for c in "*?[") and not p.exists():
            found = sorted(glob.glob(spec, recursive=True))
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
            if not name.lower().endswith(SUFFIXES) or name.endswith(".shards.json"):
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
