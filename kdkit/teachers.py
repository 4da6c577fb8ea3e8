"""A run's teachers from its config: ``teachers`` (name -> teacher config) and the shorthand
``teacher`` (one teacher, named "teacher"); where each one's stage, weights and results go.

    kdkit-train +teacher@teachers.big=resnet56                       # add a teacher
    kdkit-train ~teacher +teacher@teachers.a=gcn +teacher@teachers.b=sage   # only named ones
    kdkit-train ... distiller.kd.teacher=b                           # which one a distiller reads

Names are Python identifiers other than "student". The shorthand teacher keeps the one-teacher
file names (``teacher.pt``, ``stages/teacher.json``, results key ``teacher``); a named teacher
``gcn`` trains in stage ``teacher-gcn`` (``teacher-gcn.pt``) and reports as ``teacher/gcn``.
"""

from __future__ import annotations

from collections.abc import Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kdkit.errors import KdkitError, say
from kdkit.tasks.wiring import check_teacher_name

SHORTHAND = "teacher"
_IGNORED: set[str] = set()  # distiller settings already reported as unused


def teacher_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """name -> teacher config of every teacher ``cfg`` names, the shorthand first."""
    named = cfg.get("teachers") or {}
    if not isinstance(named, Mapping):
        raise KdkitError(f"teachers must map names to teacher configs, got {OmegaConf.to_yaml(named)!r}")
    out: dict[str, DictConfig] = {}
    if cfg.get("teacher"):
        if SHORTHAND in named:
            raise KdkitError("'teachers.teacher' collides with the shorthand `teacher`: rename it "
                             "or drop the shorthand with ~teacher")
        out[SHORTHAND] = cfg.teacher
    for name, node in named.items():
        check_teacher_name(str(name))
        if not isinstance(node, Mapping) or "model" not in node:
            raise KdkitError(f"teachers.{name} has no model: give a teacher config, e.g. "
                             f"+teacher@teachers.{name}=<one of conf/teacher>")
        out[str(name)] = node
    return out


def stage_name(name: str) -> str:
    """The stage that trains or evaluates teacher ``name`` (also its checkpoint folder)."""
    return "teacher" if name == SHORTHAND else f"teacher-{name}"


def results_key(name: str) -> str:
    return "teacher" if name == SHORTHAND else f"teacher/{name}"


def weights_file(name: str) -> str:
    """The run-directory file holding teacher ``name``'s trained weights."""
    return f"{stage_name(name)}.pt"


def make_distillers(cfg: DictConfig) -> dict:
    """``cfg.distiller`` instantiated; each node's ``teacher`` key routes its distiller (the
    task checks the names against its teachers when it is built).

    A node without ``_target_`` holds settings an experiment gives a distiller that the command
    line then left out (``experiment=cora_multi_teacher distiller=[ca_mkd]`` keeps the
    experiment's ``distiller.ensemble_kd.temperature``): it is skipped, with one line.
    """
    distillers = {}
    for name, node in (cfg.get("distiller") or {}).items():
        if isinstance(node, Mapping) and "_target_" not in node:
            if name not in _IGNORED:
                _IGNORED.add(name)
                say(f"distiller.{name}: settings for a distiller this run does not use (not in "
                    "distiller=[...]); ignored", warning=True)
            continue
        distillers[name] = build_distiller(node)
    if not distillers:
        raise KdkitError("the student stage has no distillers: pick some with distiller=[kd,...]")
    return distillers


def build_distiller(node: DictConfig):
    """One distiller from its config node; ``teacher`` (a name or null) is routing, not a
    constructor argument."""
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True)) if isinstance(node, DictConfig) else node
    teacher = None
    if isinstance(node, DictConfig) and "teacher" in node:
        with open_dict(node):
            teacher = node.pop("teacher")
    distiller = instantiate(node)
    if teacher is not None:
        if distiller.reads_several_teachers:
            raise KdkitError(f"{type(distiller).__name__} reads several teachers: list them in "
                             "`teachers`, not `teacher`")
        distiller.reading(str(teacher))
    return distiller
