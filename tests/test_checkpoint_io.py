import os
import stat
import time

import pytest
import torch

from kdkit.checkpoint_io import AtomicCheckpointIO, save_atomically
from kdkit.errors import KdkitError


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_written_files_get_the_umask_mode_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomically({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode) == 0o644


def test_temporaries_of_killed_writers_are_removed_on_the_next_save(tmp_path):
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".last.ckpt.def456.tmp"  # a writer busy right now: left alone
    fresh.write_bytes(b"being written")
    AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.def456.tmp", "last.ckpt"]


def test_unwritable_directory_is_one_line(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where a directory should be")
    with pytest.raises(KdkitError, match="checkpoints"):
        save_atomically({"step": 1}, tmp_path / "checkpoints" / "teacher" / "last.ckpt")


def test_resume_loads_refuse_pickled_objects(tmp_path):
    from omegaconf import OmegaConf

    torch.save({"global_step": 3, "hp": OmegaConf.create({"a": 1})}, tmp_path / "last.ckpt")
    with pytest.raises(KdkitError, match="refusing to load resume checkpoint .*last.ckpt"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
