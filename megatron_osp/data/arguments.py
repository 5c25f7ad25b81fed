"""Numeric options of the data tools, checked by argparse: a value out of range is refused before
any work, in one line naming the flag (``argument --workers: must be at least 1, got 0``), where it
failed later with a message about something else (``--num-tasks 0 needs --task-index``), was taken for
the default (``--plan --num-tasks 0``) or silently did something odd (``--show -1``)."""

from __future__ import annotations

import argparse


def at_least(minimum: int, why: str = ""):
    """An argparse ``type``: a whole number >= ``minimum`` (``why``: said after it when refused)."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{f' ({why})' if why else ''}, got {n}")
        return n

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def fraction(value: str) -> float:
    """An argparse ``type``: a number in (0, 1]."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {value}")
    return x
