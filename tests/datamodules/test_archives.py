"""extract_once: extracts tar/zip once, re-extracts when the archives change, survives several
processes racing on the same destination, refuses unsafe members; iter_members; save_atomic."""

from __future__ import annotations

import errno
import gzip
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

from kdkit.datamodules import archives
from kdkit.datamodules.archives import MARKER, extract_once, fingerprint, iter_members, warn_cached
from kdkit.checkpoint_io import save_atomically
from kdkit.errors import KdkitError
from tests.datamodules.fault_helpers import (damage_header, flip_middle, header_offsets, needs_non_root,
                                             one_line, random_files, tar_bytes, truncate)

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
from kdkit.datamodules.archives import extract_once
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
    path = save_atomically(obj, tmp_path / "sub" / "t.pt")
    assert torch.equal(torch.load(path, weights_only=True)["x"], obj["x"])
    assert [p.name for p in path.parent.iterdir()] == ["t.pt"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


# ---- damaged archives: one line that names the archive and says what to do ---------------------
CORRUPT = "corrupt or truncated: re-download or replace it"


def read_all(archive) -> dict[str, bytes]:
    return dict(iter_members(archive))


def test_truncated_tar_gz(tmp_path):
    archive = make_tar(tmp_path / "t.tar.gz", random_files(8, 20_000))
    truncate(archive)
    with pytest.raises(KdkitError) as err:
        read_all(archive)
    assert "EOFError" in one_line(err, archive, CORRUPT)
    with pytest.raises(KdkitError) as err:
        extract_once([archive], tmp_path / "cache" / "out")
    one_line(err, archive, CORRUPT)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-done is published


def test_flipped_bytes_in_the_middle_of_a_tar_gz(tmp_path):
    files = random_files(8, 20_000)
    archive = flip_middle(make_tar(tmp_path / "t.tar.gz", files))
    with pytest.raises(KdkitError) as err:
        read_all(archive)
    one_line(err, archive, CORRUPT)
    with pytest.raises(KdkitError) as err:
        extract_once([archive], tmp_path / "out")
    one_line(err, archive, CORRUPT)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_damaged_header_is_not_taken_for_the_end(tmp_path, suffix):
    """tarfile stops at a bad header after the first member as if the archive ended there:
    without the end check, the members after it would be silently lost."""
    files = random_files(6, 3000)
    data = damage_header(tar_bytes(files), member=3)
    archive = tmp_path / f"t{suffix}"
    archive.write_bytes(gzip.compress(data) if suffix == ".tar.gz" else data)  # valid gzip CRC
    with tarfile.open(archive) as tf:
        assert len(tf.getmembers()) == 3  # the silent stop this guards against
    with pytest.raises(KdkitError) as err:
        read_all(archive)
    offset = header_offsets(tar_bytes(files))[3]
    assert f"no valid tar header or end-of-archive block at byte {offset}" in one_line(err, archive, CORRUPT)
    with pytest.raises(KdkitError) as err:
        extract_once([archive], tmp_path / "out")
    one_line(err, archive, CORRUPT)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_intact_archives_pass_the_end_check(tmp_path, suffix):
    files = random_files(5, 1500)
    archive = tmp_path / f"t{suffix}"
    data = tar_bytes(files)
    archive.write_bytes(gzip.compress(data) if suffix == ".tar.gz" else data)
    assert read_all(archive) == files
    assert tree(extract_once([archive], tmp_path / "out")) == {**files, MARKER: fingerprint([archive]).encode()}


def test_bad_crc_is_caught(tmp_path):
    """A gzip whose tar parses but whose data changed (a flipped bit in a member): the CRC-32
    check at the end of the stream catches it."""
    files = random_files(3, 2000)
    packed = bytearray(gzip.compress(tar_bytes(files), compresslevel=0))  # stored: bytes map 1:1
    packed[len(packed) // 2] ^= 0x01
    archive = tmp_path / "t.tar.gz"
    archive.write_bytes(bytes(packed))
    with pytest.raises(KdkitError) as err:
        read_all(archive)
    assert "CRC check failed" in one_line(err, archive, CORRUPT)


@pytest.mark.parametrize("name, content, reason", [
    ("empty.tar.gz", b"", "empty file"),
    ("garbage.tar.gz", b"not an archive at all " * 50, "not a tar archive"),
    ("garbage.zip", b"not a zip file " * 50, "BadZipFile"),
    ("empty.zip", b"", "empty file"),
])
def test_empty_and_garbage_archives(tmp_path, name, content, reason):
    archive = tmp_path / name
    archive.write_bytes(content)
    for read in (read_all, lambda a: extract_once([a], tmp_path / "out")):
        with pytest.raises(KdkitError) as err:
            read(archive)
        assert reason in one_line(err, archive, CORRUPT)
    assert not (tmp_path / "out").exists()


def test_truncated_zip(tmp_path):
    archive = truncate(make_zip(tmp_path / "t.zip", random_files(4, 5000)), 0.7)
    for read in (read_all, lambda a: extract_once([a], tmp_path / "out")):
        with pytest.raises(KdkitError) as err:
            read(archive)
        one_line(err, archive, CORRUPT)


def test_a_directory_where_the_archive_belongs(tmp_path):
    archive = tmp_path / "t.tar.gz"
    archive.mkdir()
    for read in (read_all, lambda a: extract_once([a], tmp_path / "out")):
        with pytest.raises(KdkitError) as err:
            read(archive)
        assert "IsADirectoryError" in one_line(err, archive, "it is a directory")


@needs_non_root
def test_unreadable_archive(tmp_path):
    archive = make_tar(tmp_path / "t.tar.gz", FILES_A)
    archive.chmod(0)
    with pytest.raises(KdkitError) as err:
        read_all(archive)
    one_line(err, archive, "PermissionError", "check its permissions")


def test_a_full_disk_is_not_blamed_on_the_archive(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / "t.tar.gz", FILES_A)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(KdkitError) as err:
        extract_once([archive], tmp_path / "out")
    message = one_line(err, archive, "free disk space")
    assert "corrupt" not in message


def test_warn_cached_says_it_once_in_one_line(tmp_path, capsys):
    warn_cached(tmp_path / "data", tmp_path / "cache" / "copy", "test data")
    warn_cached(tmp_path / "data", tmp_path / "cache" / "copy", "test data")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdkit: warning: test data not found at")
    assert str(tmp_path / "data") in err and str(tmp_path / "cache" / "copy") in err


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
@pytest.mark.parametrize("cut", [0, 100], ids=["at-a-member", "in-a-header"])
def test_a_tar_cut_off_without_its_end_blocks(tmp_path, suffix, cut):
    """Cut where tarfile sees no header (or half of one) and stops as if at the end; the gzip
    around it is intact, so only the missing end-of-archive blocks tell."""
    files = random_files(6, 3000)
    data = tar_bytes(files)
    data = data[: header_offsets(data)[4] + cut]
    archive = tmp_path / f"t{suffix}"
    archive.write_bytes(gzip.compress(data) if suffix == ".tar.gz" else data)
    with tarfile.open(archive) as tf:
        assert len(tf.getmembers()) == 4  # the silent stop this guards against
    with pytest.raises(KdkitError) as err:
        read_all(archive)
    offset = header_offsets(tar_bytes(files))[4]
    assert f"no valid tar header or end-of-archive block at byte {offset}" in one_line(err, archive, CORRUPT)
    with pytest.raises(KdkitError) as err:
        extract_once([archive], tmp_path / "out")
    one_line(err, archive, CORRUPT)
