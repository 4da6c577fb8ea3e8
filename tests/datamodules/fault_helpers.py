"""Damaged data files for the reader tests, and the check that an error is one actionable line."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from kdkit.errors import KdkitError

# chmod 000 does not stop root from reading a file: those cases use a directory where the file
# belongs instead (also unreadable as a file), and the chmod variant runs for other users only.
needs_non_root = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                    reason="root reads files whatever their permissions")


def one_line(exc: BaseException | pytest.ExceptionInfo, path, *todo: str) -> str:
    """The message of a KdkitError, checked: one line, naming ``path``, with each ``todo``."""
    exc = exc.value if isinstance(exc, pytest.ExceptionInfo) else exc
    assert isinstance(exc, KdkitError), repr(exc)
    message = str(exc)
    assert message and "\n" not in message, message
    assert str(path) in message, message
    for words in todo:
        assert words in message, message
    return message


def random_files(n: int, size: int, seed: int = 0, prefix: str = "d") -> dict[str, bytes]:
    """``n`` members of incompressible bytes, so that the compressed archive is big enough to
    damage in the middle."""
    rng = random.Random(seed)
    return {f"{prefix}/{i:03d}.bin": rng.randbytes(size) for i in range(n)}


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def header_offsets(data: bytes) -> list[int]:
    """Byte offsets of the member headers of an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.offset for m in tf.getmembers()]


def damage_header(data: bytes, member: int) -> bytes:
    """The tar with the header of its ``member``-th member overwritten (bad checksum)."""
    start = header_offsets(data)[member]
    return data[:start] + b"\xff" * 512 + data[start + 512:]


def flip_middle(path: Path, n: int = 4096) -> Path:
    """Invert ``n`` bytes in the middle of the file, in place."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - n // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
