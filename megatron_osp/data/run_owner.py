"""Which run owns a temporary file, and whether it is over: the host and pid in the file's name.

A file a run writes beside its final output (the writer's ``PREFIX.bin.tmp-<host>-<pid>``, a replace's
``PREFIX.idx.old-<host>-<pid>``, a tokenizer's ``PREFIX.tmp-<host>-<pid>.model``, a preprocessing
stage directory ``.<name>.stage-<host>-<pid>``) carries the host and pid of the process writing it. The
next run on the prefix cleans up only what a run of its own host left, whose pid is gone: on a
filesystem shared by several nodes, a pid says nothing about a process on another node, and a file of
a run still writing there is left alone (its cleaner names it). Names from before the host was added
(``.tmp<pid>``, ``.old<pid>``) are taken as this host's, as they were then.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket

# "-<host>-<pid>", or "<pid>" alone (names made before the host was added). A host name here has no
# "-" (``host()`` replaces it), so the split is unambiguous.
TAG = r"(?:-(?P<host>[A-Za-z0-9._]+)-|(?P<legacy>))(?P<pid>\d+)"

LIVE, DEAD, ELSEWHERE = "live", "dead", "elsewhere"


def host() -> str:
    """This machine's name as it appears in file names: letters, digits and dots, others as "_"; a name
    over 40 characters (a long FQDN) as its first 31 and a digest of the whole, so that a temporary's
    name stays within a filesystem's 255 bytes."""
    name = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    if len(name) > 40:
        name = f"{name[:31]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def tag() -> str:
    """``-<host>-<pid>`` of this process, to append to ``.tmp`` / ``.old``."""
    return f"-{host()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_state(m: re.Match) -> str:
    """LIVE, DEAD or ELSEWHERE for a match of a pattern holding ``TAG``."""
    h = m.group("host")
    if h is not None and h != host():
        return ELSEWHERE
    return LIVE if pid_alive(int(m.group("pid"))) else DEAD


def owner(m: re.Match) -> str:
    """"pid P" or "pid P on host H", for notes."""
    h = m.group("host")
    return f"pid {m.group('pid')}" + (f" on host {h}" if h is not None and h != host() else "")
