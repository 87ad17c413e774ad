"""The shared reader and writer (deephemnma.io): atomic writes and input checks."""

import logging

import numpy as np

from deephemnma.io import StackWriter, atomic_path


def test_atomic_path_removes_temp_files_of_a_killed_write(tmp_path, caplog):
    stale = [tmp_path / ".checkpoint.pt.k1ll3d__.pt", tmp_path / ".checkpoint.pt.abc.pt"]
    others = [tmp_path / ".model.pt.k1ll3d__.pt", tmp_path / "checkpoint.pt.bak.pt"]
    for f in stale + others:
        f.write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="deephemnma.io"):
        with atomic_path(tmp_path / "checkpoint.pt") as tmp:
            tmp.write_bytes(b"new")
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.pt", *(p.name for p in others)]
    )
    assert "interrupted write of checkpoint.pt" in caplog.text
    assert all(str(p) in caplog.text for p in stale)


def test_stack_writer_removes_temp_stacks_of_a_killed_write(tmp_path):
    (tmp_path / ".stack_0000.mrcs.k1ll3d__.mrcs").write_bytes(b"partial")
    writer = StackWriter(tmp_path, 2, 8, 1.0, per_stack=2)
    writer.write(np.zeros((2, 8, 8), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["stack_0000.mrcs"]
