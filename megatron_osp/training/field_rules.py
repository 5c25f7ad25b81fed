"""The rules validation.py's ``RULES`` gives each config field: small builders of checks of one value.

A rule returns None for a good value or the reason a value is bad ("must be >= 1"); validation.py
prefixes it with the field and value (``train.global_batch_size=0: must be >= 1``).
"""

from __future__ import annotations

import math
from typing import Callable

Rule = Callable[[object], "str | None"]


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    def rule(v):
        if not isinstance(v, int) or isinstance(v, bool):
            return "must be an integer"
        if lo is not None and v < lo:
            return f"must be >= {lo}" if hi is None else f"must be in [{lo}, {hi})"
        if hi is not None and v >= hi:
            return f"must be < {hi}" if lo is None else f"must be in [{lo}, {hi})"
        return None

    return rule


def number(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False, what: str = "") -> Rule:
    """A finite float in the interval; ``what`` replaces the interval in the message."""
    left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    interval = what or (
        f"must be > {lo}" if lo_open and hi == math.inf
        else f"must be >= {lo}" if hi == math.inf
        else f"must be in {left}{lo}, {hi}{right}"
    )

    def rule(v):
        if not is_number(v):
            return "must be a number"
        if not math.isfinite(v):
            return "must be a finite number"
        if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
            return interval
        return None

    return rule


def choice(options) -> Rule:
    options = tuple(options)
    return lambda v: None if v in options else f"must be one of {', '.join(map(str, options))}"


def optional(rule: Rule) -> Rule:
    return lambda v: None if v is None else rule(v)


def boolean(v):
    return None if isinstance(v, bool) else "must be true or false"


def text(v):
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"


def unset_or_text(v):
    """Not set (null or empty: W&B off, or its default) or a non-empty string."""
    return None if v is None or v == "" else text(v)


def path_problem(v: str) -> str | None:
    """Why the path ``v`` would not name what it says: a leading ``~`` is not expanded (the shell does
    not expand it in ``train.run_dir=~/x``, YAML never does), so it named a directory '~' in the
    working directory (a run written into ./~/runs/x, data looked for there)."""
    if v.startswith("~"):
        return "starts with '~', which is not expanded here (it would be a directory named '~' in the " \
               "working directory): write the full path, e.g. $HOME/... on the command line"
    return None


def path(v):
    """A non-empty path string (``path_problem``)."""
    return text(v) or path_problem(v)
