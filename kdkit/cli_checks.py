"""Command-line pre-check for ``kdkit-train``: a bad group choice or key typo in one line.

Hydra answers ``distiller=[nope]`` without the valid names and ``distiller.kd.temprature=4``
with a bare "Key 'temprature' is not in struct". Before ``@hydra.main`` runs, ``check_argv``
composes the same config through Hydra's compose API (no torch import) and turns those two kinds
of composition error into one line that names the alternatives. Anything it does not recognise,
and any command that is not a run (``--help``, ``--cfg``, ``--info``, ...), is left to Hydra.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import warnings
from collections.abc import Sequence

from kdkit.errors import close_names

CONFIG_MODULE = "kdkit.conf"
CONFIG_NAME = "train"
_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def check_argv(argv: Sequence[str]) -> str | None:
    """The one-line error ``kdkit-train <argv>`` deserves before Hydra starts, or None.

    None means "let Hydra proceed": the overrides compose, the command is not a plain run or
    multirun with overrides, or the error is not one this check knows how to explain.
    """
    args = _run_args(argv)
    if args is None or not args.overrides:
        return None
    try:
        with warnings.catch_warnings():  # Hydra repeats its own warnings when it composes next
            warnings.simplefilter("ignore")
            return _composition_error(list(args.overrides), multirun=bool(args.multirun))
    except Exception:  # noqa: BLE001 - the check must never break a run Hydra would accept
        return None


def _run_args(argv: Sequence[str]):
    """Hydra's own parse of ``argv`` when it asks for a run or multirun of ``conf/train``."""
    from hydra._internal.utils import get_args_parser

    try:  # --version or a malformed flag print and exit: silently, Hydra gives its own answer
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return None
    # A different config (--config-dir adds groups this check cannot see) or a command that
    # only shows things: not ours to judge.
    if (args.help or args.hydra_help or args.cfg or args.info is not None
            or args.shell_completion or args.experimental_rerun
            or args.config_path or args.config_name or args.config_dir):
        return None
    return args


def _composition_error(overrides: list[str], multirun: bool) -> str | None:
    """Compose the first job's config; explain the error Hydra would raise for it, if any."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        job = _first_job(overrides, multirun, loader)
        if job is None:
            return None
        try:
            compose(config_name=CONFIG_NAME, overrides=job)
            return None
        except Exception as exc:  # noqa: BLE001 - explained below or left to Hydra
            message = explain(exc, loader)
            if message is None or not _first_job_is_what_hydra_runs(overrides, multirun):
                return None
            return message


def _first_job(overrides: list[str], multirun: bool, loader) -> list[str] | None:
    """The overrides of the job Hydra composes first: each sweep at its first value.

    None when that job cannot be known: a sweep in a plain run (Hydra says "ambiguous"), or a
    sweep that is shuffled or not enumerable (``interval``: another sweeper picks the values).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
    job = []
    for override, line in zip(parsed, overrides):
        if not override.is_sweep_override():
            job.append(line)
            continue
        shuffled = getattr(override.value(), "shuffle", False)
        if not multirun or not override.is_discrete_sweep() or shuffled:
            return None
        first = next(iter(override.sweep_string_iterator()), None)
        if first is None:
            return None
        job.append(f"{override.get_key_element()}={first}")
    return job


def _first_job_is_what_hydra_runs(overrides: list[str], multirun: bool) -> bool:
    """True unless the run sweeps in a way the first-values job does not reproduce.

    Hydra runs a multirun when ``-m`` is given or the config sets ``hydra.mode=MULTIRUN``; its
    basic sweeper then composes first the job with every sweep at its first value, which is
    what was checked, unless the config adds sweeps of its own (``hydra.sweeper.params``) or
    names another sweeper. Called only on the error path, so a run pays nothing for it.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    try:  # what Hydra's get_mode composes to choose between run and multirun
        cfg = GlobalHydra.instance().hydra.compose_config(
            config_name=CONFIG_NAME, overrides=overrides, run_mode=RunMode.MULTIRUN,
            with_log_configuration=False, validate_sweep_overrides=False)
    except Exception:  # noqa: BLE001 - Hydra fails on this too, whichever mode it picks
        return True
    if not multirun and cfg.hydra.mode != RunMode.MULTIRUN:
        return True
    sweeper = cfg.hydra.sweeper
    return sweeper.get("_target_") == _BASIC_SWEEPER and not sweeper.get("params")


def explain(exc: BaseException, loader) -> str | None:
    """One line for a Hydra composition error (unknown group choice or key), else None."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        return _unknown_choice(exc.missing_cfg_file, loader)
    cause = exc.__cause__
    if getattr(cause, "full_key", None) and hasattr(cause, "parent_node") and _is_missing_key(cause):
        return _unknown_key(cause.full_key, cause.parent_node, str(exc))
    return None


def _is_missing_key(cause: BaseException) -> bool:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    return isinstance(cause, (ConfigAttributeError, ConfigKeyError))


def _unknown_choice(missing: str, loader) -> str:
    """``no distiller 'nope'; available: ...`` for a missing ``<group>/<name>`` config."""
    from hydra.core.object_type import ObjectType

    group, _, name = missing.rpartition("/")
    if not group:
        return f"no config '{name}'"
    if group == "hydra/launcher" and name.startswith("submitit"):
        from kdkit.extras import EXTRAS

        if not _importable(EXTRAS["cluster"][1][0]):  # the launcher plugin brings these configs
            return (f"hydra/launcher={name} comes with the package 'hydra-submitit-launcher', which is "
                    "not installed: pip install 'kdkit[cluster]'")
    options = sorted(loader.get_group_options(group, results_filter=ObjectType.CONFIG))
    hint = _did_you_mean(name, options)
    return (f"no {group} '{name}'; {f'did you mean {hint}? ' if hint else ''}"
            f"available: {', '.join(options) or 'none'}")


def _unknown_key(full_key: str, parent, hydra_message: str) -> str:
    """``distiller.kd.temprature is not a key; did you mean distiller.kd.temperature?``"""
    prefix, _, leaf = full_key.rpartition(".")
    keys = [str(k) for k in (parent.keys() if hasattr(parent, "keys") else [])]
    keys = [k for k in keys if not k.startswith("_")]  # _target_ and such are not knobs
    message = f"{full_key} is not a key"
    best = _did_you_mean(leaf, keys)
    if best:
        return f"{message}; did you mean {f'{prefix}.' if prefix else ''}{best}?"
    if keys:
        where = f"under {prefix}" if prefix else "at the top level"
        message += f"; closest keys {where}: {close_names(leaf, keys)}"
    append = re.search(r"use (\+\S+)", hydra_message)  # Hydra's own hint for adding a new key
    return f"{message} (to add it: {append.group(1)})" if append else message


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _did_you_mean(name: str, candidates: Sequence[str]) -> str | None:
    """The candidate close enough to ``name`` to be the intended one, if any (a typo)."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None
