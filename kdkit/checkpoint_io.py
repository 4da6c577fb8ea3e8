"""Checkpoint files that a crash cannot corrupt and a stranger cannot turn into code.

Writing: a temporary file in the same directory, fsynced, then ``os.replace``d into place, so a
kill at any moment leaves either the old or the new file; temporaries of killed writers are
removed on the next save. Files get the usual ``0666 & ~umask`` mode (``mkstemp`` would leave
them private to the writer).

Reading: ``torch.load(weights_only=True)`` always. A pickle that needs arbitrary classes (which
can execute code while it loads) is refused with one line; ``trust=True`` is the explicit opt-in
for a file the user knows.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kdkit.errors import KdkitError, unreadable

STALE_TMP_SECONDS = 60  # a temporary older than this belongs to a writer that died


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomically(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through an fsynced temporary file and an atomic rename."""
    return _write_atomically(path, lambda f: torch.save(obj, f))


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Text or bytes to ``path`` the same way (results, reports, summaries): a reader never sees
    half a file, and a failed write leaves the previous one intact."""
    payload = data.encode() if isinstance(data, str) else data
    return _write_atomically(path, lambda f: f.write(payload))


def _write_atomically(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # read-only, full, or a file where a directory should be
        raise KdkitError(f"cannot write {path}: {err.strerror or err} (make {path.parent} a "
                         "writable directory or choose another hydra.run.dir)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):  # e.g. the disk filled up: the previous file is intact
            raise KdkitError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    return path


def remove_stale_temporaries(path: str | os.PathLike, older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files next to ``path`` left by writers that were killed.

    ``older_than`` (seconds) spares a temporary another process may be writing right now; a
    resuming run, which knows nobody else writes its directory, passes 0.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime >= older_than:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another process removed it first
            pass
    return removed


def safe_load(path: str | os.PathLike, what: str = "checkpoint", trust: bool = False,
              trust_flag: str = "teacher.trust_checkpoint=true", map_location="cpu", mmap: bool = False):
    """``torch.load`` a file with ``weights_only=True`` (unless ``trust``), errors in one line.

    Args:
        path: the file.
        what: how messages name it ("teacher checkpoint", "resume checkpoint", ...).
        trust: allow arbitrary unpickling (only for files the user vouches for).
        trust_flag: the setting that gives ``trust``, named in the refusal.
        map_location, mmap: as in ``torch.load`` (``mmap``: tensors are not read into memory).
    """
    path = Path(path)
    if not path.is_file():
        raise KdkitError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise unreadable(path, what, "empty file", "the run that wrote it was probably killed; "
                         "replace it or delete it")
    _check_crcs(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as err:
        if _is_restricted_unpickle(err):
            raise KdkitError(
                f"refusing to load {what} {path}: it needs arbitrary unpickling, which can run code "
                f"({_first_line(err)}). If you trust the file, set {trust_flag}, or convert it once: "
                "python -c \"import torch; torch.save(torch.load('IN', weights_only=False)"
                "['state_dict'], 'OUT.pt')\"") from None
        detail = [line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line]
        reason = "not a PyTorch checkpoint" + (f": {detail[0]}" if detail else "")
        raise unreadable(path, what, reason, "the file is corrupt; replace it") from None
    except (EOFError, RuntimeError, OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise unreadable(path, what, err, "the file is truncated or corrupt; replace it") from None


def _check_crcs(path: Path, what: str) -> None:
    """Refuse a checkpoint whose bytes changed after it was written.

    ``torch.save`` writes a zip archive with a CRC-32 per tensor file, but ``torch.load`` never
    checks them: flipped bytes in a tensor load silently as wrong weights. Reading the file once
    more (about 1 s per GB) checks every CRC. Legacy (non-zip) files have no checksums to check.
    """
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as err:
        raise unreadable(path, what, err, "the file is truncated or corrupt; replace it") from None
    if bad is not None:
        raise unreadable(path, what, f"{bad} fails its CRC check: the bytes changed after it was "
                         "written", "the file is corrupt; replace it")


def _is_restricted_unpickle(err: Exception) -> bool:
    """A pickle that names classes or functions the safe loader does not allow (as opposed to
    bytes that are no pickle at all)."""
    text = str(err)
    return "Unsupported global" in text or "unsupported GLOBAL" in text


def _first_line(err: Exception) -> str:
    """``"needs <module.Class>"`` from torch's long weights-only message."""
    for line in str(err).splitlines():
        if "GLOBAL " in line:  # "Unsupported global: GLOBAL x.Y ..." or "... unsupported GLOBAL x.y ..."
            return "needs " + line.split("GLOBAL ", 1)[1].split(" ", 1)[0]
    return (str(err).strip().splitlines() or [""])[0][:160]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic writes (see the module docstring) and safe loading."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return safe_load(path, "resume checkpoint", map_location=map_location or "cpu")
