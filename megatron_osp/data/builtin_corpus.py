"""A small English corpus that needs no download: documentation shipped with the Python interpreter.

The quickstart and the tests must run on a machine with no network. CPython ships its reference
manual's topics (``pydoc_data.topics``) and thousands of docstrings; together that is a few MB of
technical English prose (about 1.8 MB on CPython 3.11; ``include_source`` adds the stdlib's source
code, ~11 MB more), enough to train a tokenizer and a tiny model. The document order is fixed, so
every machine with the same Python version builds the same corpus.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import sysconfig
import warnings
from pathlib import Path

STDLIB_MODULES = (
    "abc argparse array ast asyncio base64 bisect builtins bz2 calendar cmath codecs collections "
    "colorsys concurrent.futures configparser contextlib copy csv ctypes dataclasses datetime decimal "
    "difflib dis email enum fileinput fnmatch fractions ftplib functools gc getopt gettext glob gzip "
    "hashlib heapq hmac html html.parser http.client http.server imaplib importlib inspect io "
    "ipaddress itertools json keyword linecache locale logging lzma mailbox math mimetypes "
    "multiprocessing numbers operator optparse os pathlib pdb pickle pkgutil platform plistlib poplib "
    "pprint profile pstats queue quopri random re reprlib sched secrets select selectors shelve shlex "
    "shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess "
    "symtable sys sysconfig tarfile tempfile textwrap threading time timeit token tokenize tomllib "
    "trace traceback types typing unicodedata unittest urllib.parse urllib.request uuid warnings "
    "wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport zlib"
).split()


_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip", "site-packages",
              "dist-packages", "__pycache__"}


def _docstrings(module_name: str, min_chars: int):
    """Runtime docstrings: these include C modules (math, builtins, ...) that have no .py source."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module missing on some build is just skipped
            return
    objects = [module] + [obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or inspect.isroutine(obj)]
    for obj in objects:
        members = [obj] + ([m for _, m in sorted(vars(obj).items())] if inspect.isclass(obj) else [])
        for member in members:
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str):
                doc = inspect.cleandoc(doc)
                if len(doc) >= min_chars:
                    yield doc


def stdlib_source_files() -> list[Path]:
    """The standard library's .py files (no tests, GUI or vendored packages), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts):
            dirnames[:] = []
            continue
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _source_docstrings(path: Path, min_chars: int):
    """Docstrings parsed (not imported) from a source file: no import side effects, every module."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield doc


def iter_documents(min_chars: int = 200, include_source: bool = False):
    """Reference-manual topics (sorted by name), then docstrings of a fixed module list, then the
    docstrings of every stdlib source file; with ``include_source``, the source files themselves.

    Duplicates (a docstring seen at runtime and again in the source) are emitted once.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()  # the texts themselves, not hash(): str hashes vary per process

    def fresh(text: str) -> bool:
        if text in seen:
            return False
        seen.add(text)
        return True

    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= min_chars and fresh(text):
            yield text
    for module_name in STDLIB_MODULES:
        for doc in _docstrings(module_name, min_chars):
            if fresh(doc):
                yield doc
    files = stdlib_source_files()
    for path in files:
        for doc in _source_docstrings(path, min_chars):
            if fresh(doc):
                yield doc
    if include_source:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                continue
            if len(text) >= min_chars and fresh(text):
                yield text


def write_corpus(
    output: str | os.PathLike,
    max_documents: int | None = None,
    min_chars: int = 200,
    include_source: bool = False,
) -> tuple[int, int]:
    """Write the corpus as JSONL ({"text": ...} per line), atomically (through ``<output>.tmp-<host>-<pid>``; one
    a killed run left is removed by the next). Returns (documents, characters).
    Refuses, writing nothing, options that leave no document (preprocessing refuses an empty corpus) and
    an output named .gz, .zst or .parquet (the file would hold plain JSON lines)."""
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be >= 1, got {max_documents}")
    output = Path(output)
    from megatron_osp.data.readers import input_format

    kind = input_format(output)
    if kind != "jsonl":  # the readers would take the plain text in it for a corrupt file of that format
        raise ValueError(f"{output}: named as a {kind} file, but the corpus is written as plain JSON lines; "
                         "name it .jsonl")
    if output.is_dir():
        raise IsADirectoryError(21, "Is a directory (give the corpus file to write)", str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    from megatron_osp.data.run_owner import tag
    from megatron_osp.data.shardset import remove_stale_temporaries

    remove_stale_temporaries(output.parent, output.name)
    tmp = output.with_name(output.name + f".tmp{tag()}")
    n_docs = n_chars = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for text in iter_documents(min_chars, include_source):
                if max_documents is not None and n_docs >= max_documents:
                    break
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(text)
        if not n_docs:
            raise ValueError(f"no docstring of this Python has {min_chars} characters or more; lower min_chars")
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n_docs, n_chars
