"""Archive and cache helpers, safe when several processes (DDP ranks, sweep jobs) run at once.

``extract_once``: each caller extracts into its own temporary directory next to the destination,
writes a marker file into it last, and renames the whole directory into place. A rename is atomic,
so a reader
sees either no destination or a complete one; when two processes race, the loser finds a complete
destination and throws its copy away. The marker holds a fingerprint of the archives (names and
sizes), so adding an archive (e.g. a new ``train-part1.tar.gz``) triggers a fresh extraction.
``save_atomic`` gives single files the same guarantee; ``iter_members`` reads an archive without
extracting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from kdkit.errors import KdkitError

MARKER = ".kdkit-extracted"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """A short hash of the archives' names and sizes (cheap; contents are not read)."""
    digest = hashlib.sha1()
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def is_extracted(dest: str | os.PathLike, archives: Sequence[str | os.PathLike],
                 marker: str = MARKER) -> bool:
    path = Path(dest) / marker
    return path.is_file() and path.read_text().strip() == fingerprint(archives)


def _unsupported(archive: Path) -> KdkitError:
    return KdkitError(f"unsupported archive {archive}: use .zip, .tar, .tar.gz/.tgz, .tar.bz2 or .tar.xz")


def iter_members(archive: str | os.PathLike, suffix: str = "") -> Iterator[tuple[str, bytes]]:
    """``(path inside the archive, bytes)`` of every regular file whose name ends with ``suffix``.

    Reads straight from the archive, creating no files: for datasets of many tiny files (CIFAR's
    JPEGs) this is an order of magnitude faster than extracting, where file creation dominates.
    """
    archive = Path(archive)
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and info.filename.endswith(suffix):
                    yield info.filename, zf.read(info)
    elif name.endswith(TAR_SUFFIXES):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(suffix):
                    yield member.name, tf.extractfile(member).read()
    else:
        raise _unsupported(archive)


def _extract_one(archive: Path, into: Path) -> None:
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)  # zipfile drops absolute paths and ".." components itself
    elif name.endswith(TAR_SUFFIXES):
        with tarfile.open(archive) as tf:
            try:
                tf.extractall(into, filter="data")  # refuses links and paths leaving `into`
            except tarfile.FilterError as err:
                raise KdkitError(f"refusing unsafe archive {archive}: {err}") from None
    else:
        raise _unsupported(archive)


def extract_once(archives: Sequence[str | os.PathLike], dest: str | os.PathLike,
                 marker: str = MARKER) -> Path:
    """Extract every archive into ``dest`` unless an identical extraction is already there.

    Args:
        archives: archive files (.zip or tar variants), extracted in order into one tree.
        dest: destination directory (created; replaced when its fingerprint is stale).
        marker: name of the file, inside ``dest``, that marks a complete extraction.

    Returns:
        ``dest`` as a Path.
    """
    dest = Path(dest)
    archives = [Path(a) for a in archives]
    missing = [str(a) for a in archives if not a.is_file()]
    if missing:
        raise KdkitError(f"archive not found: {', '.join(missing)}")
    if is_extracted(dest, archives, marker):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by users
    try:
        for archive in archives:
            _extract_one(archive, tmp)
        (tmp / marker).write_text(fingerprint(archives))  # last: the tree is complete
        if dest.exists() and not is_extracted(dest, archives, marker):
            # Stale or partial tree: move it aside atomically, then delete it at leisure.
            stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.replace(dest, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process won the race (rename onto a non-empty directory fails).
            if not is_extracted(dest, archives, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file and a rename: readers (and concurrent
    writers of the same content) only ever see a complete file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared by users
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
