"""A small English corpus that needs no download: documentation shipped with the Python interpreter.

The quickstart and the tests must run on a machine with no network. CPython ships its reference
manual's topics (``pydoc_data.topics``) and thousands of docstrings; together that is a few MB of
technical English prose, enough to train a tokenizer and a tiny model. The document order is fixed,
so every machine builds the same corpus.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
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


def _docstrings(module_name: str, min_chars: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module missing on some build is just skipped
            return
    seen = set()
    objects = [module] + [obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or inspect.isroutine(obj)]
    for obj in objects:
        members = [obj] + ([m for _, m in sorted(vars(obj).items())] if inspect.isclass(obj) else [])
        for member in members:
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str):
                doc = inspect.cleandoc(doc)
                if len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    yield doc


def iter_documents(min_chars: int = 200):
    """Reference-manual topics first (sorted by name), then stdlib docstrings (fixed module list)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= min_chars:
            yield text
    for module_name in STDLIB_MODULES:
        yield from _docstrings(module_name, min_chars)


def write_corpus(output: str | os.PathLike, max_documents: int | None = None) -> tuple[int, int]:
    """Write the corpus as JSONL ({"text": ...} per line), atomically. Returns (documents, characters)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    n_docs = n_chars = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for text in iter_documents():
                if max_documents is not None and n_docs >= max_documents:
                    break
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(text)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n_docs, n_chars
