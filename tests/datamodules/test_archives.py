"""extract_once: extracts tar/zip once, re-extracts when the archives change, survives several
processes racing on the same destination, refuses unsafe members; iter_members; save_atomic."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from datamodules import archives
from datamodules.archives import MARKER, extract_once, fingerprint, iter_members, save_atomic
from kdkit.errors import KdkitError

ROOT = Path(__file__).resolve().parents[2]


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


FILES_A = {f"split/c{i % 3}/{i:04d}.txt": f"a{i}".encode() for i in range(12)}
FILES_B = {"extra/readme.md": b"# b\n", "split/c0/zip.bin": bytes(range(256))}


def test_extracts_tar_and_zip_into_one_tree(tmp_path):
    a = make_tar(tmp_path / "a.tar.gz", FILES_A)
    b = make_zip(tmp_path / "b.zip", FILES_B)
    dest = extract_once([a, b], tmp_path / "cache" / "data")
    assert tree(dest) == {**FILES_A, **FILES_B, MARKER: fingerprint([a, b]).encode()}
    assert [p.name for p in dest.parent.iterdir()] == ["data"]  # no temporary leftovers


def test_second_call_does_nothing(tmp_path, monkeypatch):
    a = make_tar(tmp_path / "a.tar.gz", FILES_A)
    dest = extract_once([a], tmp_path / "out")
    monkeypatch.setattr(archives, "_extract_one", lambda *_: pytest.fail("extracted twice"))
    assert extract_once([a], tmp_path / "out") == dest


def test_changed_archives_replace_the_tree(tmp_path):
    a = make_tar(tmp_path / "a.tar.gz", FILES_A)
    dest = extract_once([a], tmp_path / "out")
    (dest / "stray.txt").write_text("left by a user")
    b = make_zip(tmp_path / "b.zip", FILES_B)  # e.g. a new train part appears
    extract_once([a, b], dest)
    assert tree(dest) == {**FILES_A, **FILES_B, MARKER: fingerprint([a, b]).encode()}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.tar.gz", "b.zip", "out"]


def test_partial_tree_without_marker_is_redone(tmp_path):
    a = make_tar(tmp_path / "a.tar.gz", FILES_A)
    (tmp_path / "out" / "split").mkdir(parents=True)
    (tmp_path / "out" / "split" / "half.txt").write_text("crashed mid-way")
    assert tree(extract_once([a], tmp_path / "out")) == {**FILES_A, MARKER: fingerprint([a]).encode()}


# A child interpreter that imports only the helper (fast to start), waits for the go signal so
# that all start together, and extracts; it reports whether its final rename won or lost.
CHILD = """
import os, pathlib, sys, time
from datamodules.archives import extract_once
real_rename = os.rename
def rename(src, dst):
    try:
        real_rename(src, dst)
        print("won", file=sys.stderr)
    except OSError:
        print("lost", file=sys.stderr)
        raise
os.rename = rename
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.002)
print(extract_once(sys.argv[3:], sys.argv[2]))
"""


def test_processes_racing_on_one_destination(tmp_path):
    big = {f"train/c{i % 10}/{i:05d}.bin": os.urandom(64) for i in range(600)}
    a = make_tar(tmp_path / "part0.tar.gz", big)
    b = make_zip(tmp_path / "part1.zip", FILES_B)
    dest, go = tmp_path / "cache" / "tree", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(go), str(dest), str(a), str(b)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    time.sleep(0.5)  # let every child reach its wait loop
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(dest)] * 3
    verdicts = [err.strip() for _, err in outputs]
    assert verdicts.count("won") == 1 and verdicts.count("lost") >= 1, verdicts  # a real race
    assert tree(dest) == {**big, **FILES_B, MARKER: fingerprint([a, b]).encode()}
    assert [p.name for p in dest.parent.iterdir()] == ["tree"]  # the losers cleaned up


def test_unsafe_members_are_refused(tmp_path):
    evil = make_tar(tmp_path / "evil.tar.gz", {"../escape.txt": b"x", "ok.txt": b"y"})
    with pytest.raises(KdkitError, match="refusing unsafe archive"):
        extract_once([evil], tmp_path / "cache" / "out")
    assert not (tmp_path / "cache" / "escape.txt").exists()
    assert not (tmp_path / "cache" / "out").exists()  # nothing half-done is published
    assert list((tmp_path / "cache").iterdir()) == []


def test_bad_inputs(tmp_path):
    with pytest.raises(KdkitError, match="archive not found: .*missing.tar.gz"):
        extract_once([tmp_path / "missing.tar.gz"], tmp_path / "out")
    (tmp_path / "data.rar").write_bytes(b"rar")
    with pytest.raises(KdkitError, match="unsupported archive"):
        extract_once([tmp_path / "data.rar"], tmp_path / "out")


def test_iter_members_reads_without_extracting(tmp_path):
    a = make_tar(tmp_path / "a.tar.gz", FILES_A)
    b = make_zip(tmp_path / "b.zip", FILES_B)
    assert dict(iter_members(a)) == FILES_A
    assert dict(iter_members(b, suffix=".bin")) == {"split/c0/zip.bin": FILES_B["split/c0/zip.bin"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "b.zip"]


def test_save_atomic(tmp_path):
    obj = {"x": torch.arange(5)}
    path = save_atomic(obj, tmp_path / "sub" / "t.pt")
    assert torch.equal(torch.load(path, weights_only=True)["x"], obj["x"])
    assert [p.name for p in path.parent.iterdir()] == ["t.pt"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"
