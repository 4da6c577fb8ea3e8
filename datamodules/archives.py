"""Archive and cache helpers, safe when several processes (DDP ranks, sweep jobs) run at once.

``extract_once``: each caller extracts into its own temporary directory next to the destination,
writes a marker file into it last, and renames the whole directory into place. A rename is atomic,
so a reader
sees either no destination or a complete one; when two processes race, the loser finds a complete
destination and throws its copy away. The marker holds a fingerprint of the archives (names and
sizes), so adding an archive (e.g. a new ``train-part1.tar.gz``) triggers a fresh extraction.
``kdkit.checkpoint_io.save_atomically`` gives single files the same guarantee; ``iter_members`` reads an archive without
extracting it.

Damaged archives (missing, empty, truncated, corrupt, unreadable) raise a one-line ``KdkitError``
that names the file and says what to do. ``tarfile`` alone does not catch every such archive: it
takes the first header it cannot parse, after the first member, for the end of the archive and
stops without a word. So, once tarfile is done, the rest of the (decompressed) stream is read: it
must be the zero blocks that end a tar, and reading a compressed stream to its end checks its
checksum and length (gzip's CRC-32 and size, bzip2's and xz's checks).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from kdkit.errors import KdkitError, say, unreadable

try:
    from lzma import LZMAError
except ImportError:  # pragma: no cover - Python built without lzma
    LZMAError = OSError

MARKER = ".kdkit-extracted"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CORRUPT_HINT = "it is corrupt or truncated: re-download or replace it"
# What reading a damaged archive raises: OSError (missing, permissions, a directory, gzip's
# BadGzipFile, bzip2's invalid data), EOFError (a truncated stream), tarfile's ReadError,
# zipfile's BadZipFile (also its CRC check), zlib.error (bad deflate data), LZMAError.
ARCHIVE_ERRORS = (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error, LZMAError)


def file_error(path, what: str, err: BaseException | str, hint: str = CORRUPT_HINT) -> KdkitError:
    """``kdkit.errors.unreadable`` with the hint that fits ``err``: permissions, a directory
    where a file belongs, a file gone missing, else ``hint`` (a damaged file)."""
    if isinstance(err, PermissionError):
        hint = "make it readable for this user (check its permissions)"
    elif isinstance(err, IsADirectoryError):
        hint = "it is a directory: put the file itself there"
    elif isinstance(err, FileNotFoundError):
        hint = "it is missing: restore it or fix the path"
    elif isinstance(err, zlib.error):  # its class name is just "error"
        err = f"bad compressed data: {err}"
    return unreadable(path, what, err, hint)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """``message`` as one warning line on stderr (rank 0), once per process (``prepare_data``
    and ``setup`` both look for the data)."""
    if message not in _warned:
        _warned.add(message)
        say(message, warning=True)


def warn_cached(data: str | os.PathLike, cache: str | os.PathLike, what: str = "data") -> None:
    """Warn that the source data is gone and a cached copy stands in for it (a warm cache would
    otherwise hide an empty or wrong ``KDKIT_DATA_DIR``)."""
    warn_once(f"{what} not found at {data} (missing or empty; check KDKIT_DATA_DIR): "
              f"using the cached copy {cache}")


def _check_size(archive: Path, what: str) -> None:
    try:
        size = archive.stat().st_size
    except OSError as err:
        raise file_error(archive, what, err) from None
    if size == 0 and archive.is_file():
        raise file_error(archive, what, "empty file")


def _open_tar(archive: Path, what: str) -> tarfile.TarFile:
    try:
        return tarfile.open(archive)
    except tarfile.ReadError:  # its message lists every compression it tried, over many lines
        raise file_error(archive, what, "not a tar archive, or a damaged one") from None


def _check_tar_end(tf: tarfile.TarFile, archive: Path, what: str) -> None:
    """Refuse an archive that tarfile stopped reading early (see the module docstring): at
    ``tf.offset``, where it stopped, a tar has its end-of-archive zero blocks, and nothing but
    zeros after them.

    Cheap: for an intact archive only those zero blocks are left to read.
    """
    fileobj = tf.fileobj
    if isinstance(fileobj, (io.BufferedReader, io.FileIO)):
        # A plain tar: look again at the block tarfile stopped at (a seek in a file). In a
        # compressed stream that block may be read already, but the stream's checksum covers it.
        fileobj.seek(tf.offset)
    broken = file_error(archive, what, f"no valid tar header or end-of-archive block at byte "
                                       f"{tf.offset} of the unpacked tar: the rest is lost")
    while chunk := fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):  # a damaged header, with members after it
            raise broken
    if fileobj.tell() < tf.offset + tarfile.BLOCKSIZE:  # cut off at a member or in a header
        raise broken


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


def iter_members(archive: str | os.PathLike, suffix: str = "",
                 what: str = "archive") -> Iterator[tuple[str, bytes]]:
    """``(path inside the archive, bytes)`` of every regular file whose name ends with ``suffix``.

    Reads straight from the archive, creating no files: for datasets of many tiny files (CIFAR's
    JPEGs) this is an order of magnitude faster than extracting, where file creation dominates.
    A missing, empty, truncated or corrupt archive raises a one-line KdkitError naming it as
    ``what`` (a tar archive is checked to its end once its last member has been read).
    """
    archive = Path(archive)
    name = archive.name.lower()
    if not name.endswith((".zip", *TAR_SUFFIXES)):
        raise _unsupported(archive)
    _check_size(archive, what)
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and info.filename.endswith(suffix):
                        yield info.filename, zf.read(info)
        else:
            with _open_tar(archive, what) as tf:
                for member in tf:
                    if member.isfile() and member.name.endswith(suffix):
                        yield member.name, tf.extractfile(member).read()
                _check_tar_end(tf, archive, what)
    except ARCHIVE_ERRORS as err:
        raise file_error(archive, what, err) from None


def _writing_failed(err: BaseException, into: Path) -> bool:
    """Whether ``err`` comes from writing the extracted files, not from reading the archive."""
    if not isinstance(err, OSError):
        return False
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    return bool(err.filename) and Path(os.path.abspath(err.filename)).is_relative_to(into.absolute())


def _extract_one(archive: Path, into: Path, what: str = "archive") -> None:
    name = archive.name.lower()
    if not name.endswith((".zip", *TAR_SUFFIXES)):
        raise _unsupported(archive)
    _check_size(archive, what)
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(into)  # zipfile drops absolute paths and ".." components itself
        else:
            with _open_tar(archive, what) as tf:
                try:
                    tf.extractall(into, filter="data")  # refuses links and paths leaving `into`
                except tarfile.FilterError as err:
                    raise KdkitError(f"refusing unsafe archive {archive}: {err}") from None
                _check_tar_end(tf, archive, what)
    except ARCHIVE_ERRORS as err:
        if _writing_failed(err, into):
            raise KdkitError(f"cannot extract {archive} into {into.parent} ({type(err).__name__}: "
                             f"{err}): free disk space or make that folder writable") from None
        raise file_error(archive, what, err) from None


def extract_once(archives: Sequence[str | os.PathLike], dest: str | os.PathLike,
                 marker: str = MARKER, what: str = "archive") -> Path:
    """Extract every archive into ``dest`` unless an identical extraction is already there.

    Args:
        archives: archive files (.zip or tar variants), extracted in order into one tree.
        dest: destination directory (created; replaced when its fingerprint is stale).
        marker: name of the file, inside ``dest``, that marks a complete extraction.
        what: what the archives are, for error messages ("BEIR zip", ...). A damaged archive
            raises a one-line KdkitError and publishes nothing.

    Returns:
        ``dest`` as a Path.
    """
    dest = Path(dest)
    archives = [Path(a) for a in archives]
    missing = [str(a) for a in archives if not a.exists()]
    if missing:
        raise KdkitError(f"archive not found: {', '.join(missing)} (restore it or fix the path)")
    if is_extracted(dest, archives, marker):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by users
    try:
        for archive in archives:
            _extract_one(archive, tmp, what)
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
