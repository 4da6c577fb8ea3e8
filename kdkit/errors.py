"""User-facing errors: one line, no traceback, non-zero exit (see ``kdkit.train.main``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdkitError(Exception):
    """A mistake in the user's input (config, paths, names) that kdkit explains in one line."""

    def __str__(self) -> str:
        text = super().__str__()
        if "Original Traceback" in text:
            # Raised in a DataLoader worker: torch re-raises it in the main process with the
            # worker's traceback as the message; the user's line is the traceback's last one.
            last = text.strip().splitlines()[-1]
            return last.split("Error: ", 1)[1] if "Error: " in last else last
        return text


def close_names(name: str, candidates: Iterable[str], n: int = 8) -> str:
    """Comma-separated candidates closest to ``name`` (for 'did you mean' messages)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.3)
    if not close:  # fall back to substring matches, then to the first few names
        close = [c for c in candidates if name.split(".")[-1] in c][:n] or candidates[:n]
    return ", ".join(close)


def find_kdkit_error(exc: BaseException) -> KdkitError | None:
    """The KdkitError inside ``exc``'s cause chain (Hydra's instantiate wraps errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KdkitError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def unreadable(path, what: str, err: BaseException | str, hint: str = "") -> KdkitError:
    """A one-line KdkitError for a file that exists but cannot be read as ``what``.

    Args:
        path: the file (named in full in the message).
        what: what kdkit expected the file to be ("teacher checkpoint", "BEIR corpus", ...).
        err: the underlying exception (its type and first line are kept) or a reason.
        hint: what the user can do about it, e.g. "re-download it" (appended after a colon).
    """
    if isinstance(err, BaseException):
        first = (str(err).strip().splitlines() or [""])[0]
        reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
    else:
        reason = str(err)
    message = f"{what} {path} is unreadable ({reason})"
    return KdkitError(f"{message}; {hint}" if hint else message)


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def launched_as_rank_zero() -> bool:
    """Whether no launcher made this process anything but global rank 0, read from the
    environment alone (it holds before ``torch.distributed`` starts, and in processes Lightning's
    DDP relaunched): every rank variable a launcher sets (torchrun, Lightning, SLURM) is 0 or
    unset. All of them count: a rank Lightning relaunched inside a one-task SLURM job has
    ``SLURM_PROCID=0`` but ``LOCAL_RANK=1``."""
    import os

    return all(os.environ.get(key, "0").strip() in ("", "0") for key in RANK_VARIABLES)


def say(message: str, warning: bool = False) -> None:
    """One line for the user on stderr (rank 0 only): ``kdkit: <message>`` or a warning."""
    import sys

    if not launched_as_rank_zero():
        return
    print(f"kdkit: {'warning: ' if warning else ''}{message}", file=sys.stderr, flush=True)
