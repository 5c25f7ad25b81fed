"""Stand-in commands for the tests of the shell scripts (srun, scontrol, python, torchrun, ...)."""

from __future__ import annotations

import stat
from pathlib import Path


def stub_command(bin_dir: Path, name: str, body: str) -> Path:
    """An executable bash script ``bin_dir/name`` running ``body``; put ``bin_dir`` first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path
