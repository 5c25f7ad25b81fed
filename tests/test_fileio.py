"""Atomic writes: the old file or the new one, never a part, no temporary left, normal permissions."""

import os
import stat

import pytest

from megatron_osp.fileio import atomic_write_json, atomic_write_text


def test_writes_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "latest.txt"
    atomic_write_text(target, "iter_0000001\n")
    atomic_write_text(target, "iter_0000002\n")
    assert target.read_text() == "iter_0000002\n"
    atomic_write_json(tmp_path / "s.json", {"a": [1, 2]})
    assert (tmp_path / "s.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["latest.txt", "s.json", "sub"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "latest.txt"
    atomic_write_text(target, "old\n")
    with pytest.raises(TypeError):
        atomic_write_text(target, b"not text")  # fails inside the write
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["latest.txt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_permissions_follow_the_umask_like_open(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f", "x")
        with open(tmp_path / "g", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == mode == stat.S_IMODE(os.stat(tmp_path / "g").st_mode)
