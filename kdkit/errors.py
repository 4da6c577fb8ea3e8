"""User-facing errors: one line, no traceback, non-zero exit (see ``kdkit.train.main``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdkitError(Exception):
    """A mistake in the user's input (config, paths, names) that kdkit explains in one line."""


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
