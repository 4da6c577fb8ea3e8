"""Logger factories: one logger per stage, all of a run's stages grouped together."""

from __future__ import annotations

import os
from pathlib import Path


def csv_logger(save_dir: str, stage: str, name: str = "logs", resume_at: tuple[int, int] | None = None):
    """CSV metrics at ``<save_dir>/<name>/<stage>/metrics.csv``; a stage resumed from the
    checkpoint at ``resume_at = (epoch, global_step)`` continues its file (``kdkit.csv_logger``)."""
    from kdkit.csv_logger import ResumableCSVLogger

    return ResumableCSVLogger(save_dir=save_dir, name=name, version=stage, resume_at=resume_at)


def wandb_logger(stage: str, project: str = "kdkit", group: str | None = None,
                 save_dir: str = ".", mode: str | None = None, **kwargs):
    """A W&B run per stage (``<group>/<stage>``), grouped by experiment.

    Offline unless an API key is configured (``WANDB_API_KEY`` or ``wandb login``), so runs on
    air-gapped clusters still log and can be synced later with ``wandb sync``. An online run
    whose W&B host does not answer falls back to offline with one warning, unless
    ``WANDB_MODE=online`` insists on online.
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode is None:
        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
    if mode == "online" and os.environ.get("WANDB_MODE") != "online":
        mode = _online_or_offline(save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, group=group, name=f"{group}/{stage}" if group else stage,
                       save_dir=save_dir, mode=mode, job_type=stage, **kwargs)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


# W&B host -> reachable, so a run's stages (one logger each) probe and warn once per process
_REACHABLE: dict[str, bool] = {}


def _online_or_offline(save_dir: str) -> str:
    """"online" when the W&B host answers, else "offline" and one warning on how to sync later.

    Without a network, wandb.init retries for about two minutes and then raises; a short TCP
    probe first turns that into an offline run that loses nothing.
    """
    url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    if url not in _REACHABLE:
        reason = _unreachable_reason(url)
        _REACHABLE[url] = reason is None
        if reason is not None:
            from kdkit.errors import say

            offline_runs = Path(save_dir) / "wandb" / "offline-run-*"
            say(f"W&B host {url} unreachable ({reason}); logging offline instead, sync later "
                f"with: wandb sync {offline_runs}", warning=True)
    return "online" if _REACHABLE[url] else "offline"


def _unreachable_reason(url: str, timeout: float = 2.5) -> str | None:
    """Why a TCP connection to ``url``'s host fails within ``timeout`` seconds, None if it works.

    The connect runs in a daemon thread: name resolution ignores socket timeouts and can hang
    far longer than ``timeout`` where DNS is firewalled.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return f"no host in {url!r}"
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError as exc:
        return str(exc)
    outcome: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=probe, name="kdkit-wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer in {timeout:g} s"
