"""Resuming is refused when the command's settings differ from the interrupted run's.

``ckpt_path=last`` without the original ``trainer.max_epochs=40`` used to continue with the
default 10 and overwrite ``config.yaml``, leaving a results table of 40- and 10-epoch stages.
The run directory's ``config.yaml`` is the interrupted run's resolved config; a resumed run must
resolve to the same values, except keys that cannot change results (where files go, progress
bars, loggers) and those the user lets through with ``resume.allow_changes``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdkit.errors import KdkitError, unreadable

# Keys (and key prefixes) that may differ on resume: they change where and how a run reports,
# never what it computes.
FREE_TO_CHANGE = ("ckpt_path", "paths", "resume", "logger", "trainer.enable_progress_bar",
                  "callbacks.progress_bar", "data.num_workers", "data.pin_memory")


def flatten(node, prefix: str = "") -> dict[str, object]:
    """``{"a.b.c": value}`` for every leaf of nested dicts (lists are leaves)."""
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, current: dict, allowed=()) -> list[str]:
    """``"key: old -> new"`` for every leaf that differs and is not free or allowed."""
    before, after = flatten(saved), flatten(current)
    prefixes = (*FREE_TO_CHANGE, *allowed)
    changes = []
    for key in sorted(set(before) | set(after)):
        if _covered(key, prefixes):
            continue
        old, new = before.get(key, "<absent>"), after.get(key, "<absent>")
        if old != new:
            changes.append(f"{key}: {old} -> {new}")
    return changes


def check_resume_config(out: Path, cfg: DictConfig) -> None:
    """Raise KdkitError when ``cfg`` differs from ``out/config.yaml`` in a way not allowed."""
    saved_path = Path(out) / "config.yaml"
    if not saved_path.is_file():
        return  # nothing ran here yet: there is nothing to contradict
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    except Exception as err:  # noqa: BLE001 - any YAML error: name the file
        raise unreadable(saved_path, "the interrupted run's config", err,
                         "restore it, or start in a new hydra.run.dir") from None
    if not isinstance(saved, dict):
        raise unreadable(saved_path, "the interrupted run's config", "not a YAML mapping",
                         "restore it, or start in a new hydra.run.dir")
    allowed = list((cfg.get("resume") or {}).get("allow_changes") or [])
    changes = config_changes(saved, OmegaConf.to_container(cfg, resolve=True), allowed)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        keys = [c.split(":")[0] for c in changes]
        new = [k for k, c in zip(keys, changes) if ": <absent> -> " in c]
        added = (f" {len(new)} of them are absent from config.yaml: settings kdkit added after this run "
                 "started, unless a '+' override added them; at their defaults they keep what the run "
                 "computed." if new else "")
        raise KdkitError(
            f"resuming {out} with settings that differ from its config.yaml: {shown}.{added} Repeat "
            f"the original overrides, or let them through with resume.allow_changes=[{','.join(keys)}]")
