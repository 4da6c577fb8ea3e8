"""The stage runner behind ``kdkit-train``: teachers -> baseline -> distilled student(s).

Every stage is the same ``DistillationTask`` loop with different parts: each teacher's stage
trains (or only evaluates) that teacher as if it were a student; the baseline trains the student
with its task loss alone; the student stage adds the distillers, reading the teachers they name;
born-again generations (``stages.generations``) follow, each taught by the one before. Each stage
writes ``stages/<name>.json`` when it completes, so ``ckpt_path=last`` on the same output
directory skips finished stages and resumes the interrupted one from its newest checkpoint
(``kdkit.checkpointing``); ``kdkit.stage_fit`` runs one stage under Lightning.

Before any stage trains, the run is checked: impossible config values, a resumed run's settings
against the interrupted one's, and every stage's task built and run on one example batch (models,
feature taps, adapters, distillers). Everything is seeded from ``cfg.seed``, the teacher included;
``environment.json`` records what else the numbers depend on (``kdkit.run_environment``).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdkit.checkpoint_io import save_atomically
from kdkit.config_checks import check_config
from kdkit.console import start_run
from kdkit.data_facts import fill_data_facts
from kdkit.divergence import check_finite
from kdkit.errors import KdkitError, say
from kdkit.report import markdown_table
from kdkit.resume import check_resume_config
from kdkit.run_environment import describe, distinct_starts, read_starts, record_start, start_line
from kdkit.stage_views import baseline_epochs, is_transfer, use_view, view_facts
from kdkit.stage_fit import fit_and_test, load_stage, stage_done, write_on_rank_zero
from kdkit.student_init import make_student
from kdkit.teachers import SHORTHAND, make_distillers, results_key, stage_name, teacher_configs, weights_file

def run(cfg: DictConfig) -> dict[str, dict]:
    """Run every enabled stage of ``cfg``; return (and write) ``{stage: metrics}``."""
    if not cfg.paths.get("output_dir"):
        raise KdkitError("paths.output_dir is not set (kdkit-train and kdkit.compose set it)")
    check_config(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start_run(out)  # says where the run writes; Lightning's per-stage lines once per run
    resuming = cfg.get("ckpt_path") == "last"
    if resuming:
        check_resume_config(out, cfg)
    write_on_rank_zero(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    env = record_start(out, resuming)  # environment.json: what the numbers depend on beyond the config
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))

    L.seed_everything(cfg.seed, workers=True)  # data splits and the teacher's init depend on it
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    fill_data_facts(cfg, datamodule)  # class/feature counts the config leaves to the data
    results: dict[str, dict] = {}

    teacher_cfgs = teacher_configs(cfg)
    if cfg.stages.student and not teacher_cfgs:
        raise KdkitError("the student stage needs a teacher: set teacher=<one of conf/teacher> or "
                         "+teacher@teachers.<name>=<...>, or stages.student=false")
    teachers: dict[str, tuple] = {}  # name -> (model, has trained weights)
    # a baseline that inherits a teacher's weights (student.init) needs that teacher too
    inherits = bool(cfg.stages.baseline and (cfg.get("student") or {}).get("init"))
    if cfg.stages.teacher or cfg.stages.student or inherits:
        teachers = {name: load_teacher(cfg, tcfg, out, name) for name, tcfg in teacher_cfgs.items()}
    check_before_training(cfg, datamodule, teachers, teacher_cfgs)
    for name, (model, trained) in teachers.items():
        teacher_results = teacher_stage(cfg, teacher_cfgs[name], name, datamodule, out, model, trained)
        if teacher_results is not None:
            results[results_key(name)] = teacher_results
    models = {name: model for name, (model, _) in teachers.items()}
    if cfg.stages.baseline:
        results["baseline"], _ = train_stage(cfg, datamodule, out, "baseline", init_from=models)
        warn_weaker_teachers(results)
    if cfg.stages.student:
        results["student"], student = train_stage(cfg, datamodule, out, "student", models, teacher_cfgs)
        for k in range(2, generations(cfg) + 1):  # born-again: student k-1 teaches student k
            results[f"student/gen{k}"], student = train_stage(
                cfg, datamodule, out, f"student-gen{k}", {f"gen{k - 1}": student}, {f"gen{k - 1}": cfg.student},
                init_from=models)

    write_on_rank_zero(out / "results.json", json.dumps(results, indent=2))
    write_on_rank_zero(out / "results.md", markdown_table(results, cfg.get("name", "kdkit"))
                       + _environment_text(read_starts(out) or [env]))
    _write_html_report(out)
    _print_table(results, cfg.get("name", "kdkit"))
    say(f"run directory: {out} (results.json, results.md, report.html)")
    return results


# ---- stages -------------------------------------------------------------------------------
def load_teacher(cfg, tcfg, out: Path, name: str = SHORTHAND):
    """Teacher ``name``'s network and whether it already has trained weights.

    Weights come from its ``ckpt_path`` (loaded with ``weights_only=True`` unless its
    ``trust_checkpoint``; keys renamed from its ``ckpt_layout``, e.g. torchdistill), from the
    model factory (``pretrained``), or from this run
    directory's ``teacher[-<name>].pt`` when its stage finished before; otherwise it is trained.
    """
    from kdkit.checkpoints import load_weights

    model = instantiate(tcfg.model)
    trust = bool(tcfg.get("trust_checkpoint", False))
    layout = tcfg.get("ckpt_layout")  # a checkpoint from another toolkit (kdkit.peer_checkpoints)
    if layout and not tcfg.get("ckpt_path"):
        raise KdkitError(f"ckpt_layout={layout} needs ckpt_path: the file written in that layout")
    if tcfg.get("ckpt_path"):
        load_weights(model, tcfg.ckpt_path, trust=trust, layout=layout)
        return model, True
    if tcfg.get("pretrained"):
        return model, True  # the model factory already loaded trained weights (hub or local)
    saved = out / weights_file(name)
    if stage_done(out, stage_name(name)) and saved.exists():
        load_weights(model, saved, what=f"this run's {saved.name}")
        return model, True
    return model, False


def teacher_stage(cfg, tcfg, name: str, datamodule, out: Path, model, trained: bool) -> dict | None:
    """Train teacher ``name`` unless ``trained``, then test it; its results (None when
    ``stages.teacher`` is off)."""
    stage = stage_name(name)
    if getattr(model, "scores_pairs", False):  # a pair scorer (kdkit.models.scorers) cannot retrieve alone
        say(f"{stage}: a pair scorer, not evaluated on its own (it teaches from its score table)")
        return None
    use_view(datamodule, "teacher")
    if not trained:
        L.seed_everything(cfg.seed, workers=True)  # the teacher trains the same way every run
        task = make_task(cfg, student=model, role_of_student="teacher", student_cfg=tcfg)
        results = fit_and_test(cfg, task, datamodule, out, stage, train=True,
                               evaluate=cfg.stages.teacher, max_epochs=tcfg.get("max_epochs"),
                               facts=view_facts(datamodule))
        check_finite(model, f"the trained {stage}")
        if rank_zero_only.rank == 0:
            save_atomically(model.state_dict(), out / weights_file(name))
        return results
    if not cfg.stages.teacher:
        return None
    if stage_done(out, stage):
        return load_stage(out, stage)
    task = make_task(cfg, student=model, role_of_student="teacher", student_cfg=tcfg)
    return fit_and_test(cfg, task, datamodule, out, stage, train=False, validate=bool(cfg.stages.baseline))


def check_before_training(cfg, datamodule, teachers: dict, teacher_cfgs: dict) -> None:
    """Build every task the run's stages will train, and probe each on one example batch.

    Every teacher (its own pipeline and taps), the student, every distiller and adapter and,
    with born-again generations, a student taught by a student: a wrong feature name, a shape
    no adapter fits, a class-count mismatch, an unknown teacher name or a bad distiller setting
    fails here, in seconds, instead of after the teachers and the baseline have trained.
    """
    models = {name: model for name, (model, _) in teachers.items()}
    trainable = [(p, p.requires_grad) for m in models.values() for p in m.parameters()]
    modes = [(m, m.training) for model in models.values() for m in model.modules()]
    tasks = []
    for name, (model, trained) in teachers.items():
        if (cfg.stages.teacher or not trained) and not getattr(model, "scores_pairs", False):
            tasks.append(("teacher", make_task(cfg, student=model, role_of_student="teacher",
                                               student_cfg=teacher_cfgs[name], probe=True)))
    if cfg.stages.baseline or cfg.stages.student:
        distillers = make_distillers(cfg) if cfg.stages.student else {}
        tasks.append(("student" if distillers else "baseline",
                      make_task(cfg, student=make_student(cfg, models),
                                teachers=models if distillers else None, distillers=distillers,
                                teacher_cfgs=teacher_cfgs, probe=True,
                                selection=make_selection(cfg) if distillers else None)))
    if cfg.stages.baseline and cfg.stages.student and is_transfer(datamodule):
        tasks.append(("baseline", make_task(cfg, student=make_student(cfg, models), probe=True)))
    if cfg.stages.student and generations(cfg) > 1:
        tasks.append(("student", make_task(cfg, student=make_student(cfg, models),
                                           teachers={"gen1": make_student(cfg, models)},
                                           distillers=_unrouted(make_distillers(cfg)),
                                           teacher_cfgs={"gen1": cfg.student}, probe=True)))
    try:
        for role, task in tasks:
            use_view(datamodule, role)
            task.probe(datamodule)
        if cfg.stages.student:
            from kdkit.label_stage import check_label_files

            use_view(datamodule, "student")
            check_label_files(cfg, datamodule, teachers, teacher_cfgs)
    finally:  # the student stage's probe froze the teachers in place; their own stages may train them
        for param, flag in trainable:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def generations(cfg) -> int:
    """``stages.generations``: how many students are trained in sequence (born-again)."""
    value = cfg.stages.get("generations", 1)
    value = 1 if value is None else value
    if int(value) < 1:
        raise KdkitError(f"stages.generations={value} must be >= 1")
    return int(value)


def _unrouted(distillers: dict) -> dict:
    """The distillers reading whatever teacher there is (a born-again generation has one)."""
    for name, d in distillers.items():
        if getattr(d, "needs_several_teachers", False):
            raise KdkitError(f"distiller '{name}' ({type(d).__name__}) needs several teachers, but a "
                             "born-again generation has one (its parent): stages.generations=1 with it")
        if d.reads_several_teachers:
            d.teacher_names = None
        else:
            d.reading(None)
    return distillers


def train_stage(cfg, datamodule, out: Path, stage: str, teachers: dict | None = None,
                teacher_cfgs: dict | None = None, init_from: dict | None = None) -> tuple[dict, nn.Module]:
    """Train the student alone (``baseline``) or with distillers; its results and the student.

    ``init_from``: the run's teachers, for a student that inherits their weights
    (``student.init``); default ``teachers``.

    ``student-gen<k>`` stages are born-again generations: their one teacher is the student of
    generation k-1, and their distillers read it whatever teacher they name. Generation k's
    student is exported to ``export/gen<k>/`` (the first generation to ``export/``).
    """
    L.seed_everything(cfg.seed, workers=True)  # baseline and student start from the same init
    use_view(datamodule, "baseline" if stage == "baseline" else "student")
    generation = stage.startswith("student-gen")
    export = out / "export" / stage.removeprefix("student-") if generation else out / "export"
    if stage_done(out, stage):
        student = instantiate(cfg.student.model)
        if stage != "baseline" and (export / "student.pt").exists():
            from kdkit.checkpoints import load_weights

            load_weights(student, export / "student.pt", what=f"this run's exported {stage}")
        return load_stage(out, stage), student
    student = make_student(cfg, teachers if init_from is None else init_from, announce=True)
    distillers = {}
    if stage != "baseline":
        distillers = _unrouted(make_distillers(cfg)) if generation else make_distillers(cfg)
    if stage == "student" and distillers and cfg.stages.get("teacher_labels"):
        from kdkit.label_stage import write_stage_labels

        writer = make_task(cfg, student=student, teachers=teachers, distillers=distillers, datamodule=datamodule,
                           teacher_cfgs=teacher_cfgs, probe=True)
        teacher_cfgs = write_stage_labels(cfg, datamodule, out, writer, teachers, teacher_cfgs)
    task = make_task(cfg, student=student, teachers=teachers if distillers else None,
                     distillers=distillers, datamodule=datamodule, teacher_cfgs=teacher_cfgs,
                     selection=make_selection(cfg) if distillers and not generation else None)
    epochs = baseline_epochs(cfg, datamodule) if stage == "baseline" else None
    results = fit_and_test(cfg, task, datamodule, out, stage, train=True, max_epochs=epochs,
                           facts=view_facts(datamodule))
    if stage != "baseline":
        check_finite(task, f"the distilled {stage}")
        if rank_zero_only.rank == 0:
            task.export(export, with_adapters=cfg.export.adapters)
    return results, student


def warn_weaker_teachers(results: dict) -> None:
    """One warning line per teacher whose validation score is below the baseline's, and the
    fact (``weaker_than_baseline``) in its results: distilling such a teacher usually hurts."""
    base = _validation_score(results.get("baseline", {}))
    if base is None:
        return
    for key, stage_results in results.items():
        score = _validation_score(stage_results) if key.startswith("teacher") else None
        if score is None:
            continue
        stage_results["weaker_than_baseline"] = score[1] < base[1]
        if score[1] < base[1]:
            say(f"{key} scores {score[0]}={score[1]:.4f} on validation data, below the student "
                f"trained alone ({base[1]:.4f}); distilling it usually hurts the student", warning=True)


def _validation_score(stage_results: dict) -> tuple[str, float] | None:
    """(key, value) of the stage's primary validation metric: the kept weights' when the task
    selects weights (``val/<metric>_selected``), else the last validation."""
    metric = stage_results.get("primary_metric")
    for key in (f"val/{metric}_selected", f"val/{metric}") if metric else ():
        if isinstance(stage_results.get(key), (int, float)):
            return key, float(stage_results[key])
    return None


def make_task(cfg, student, teachers: dict | None = None, distillers=None,
              role_of_student: str = "student", datamodule=None, probe: bool = False,
              student_cfg=None, teacher_cfgs: dict | None = None, selection: dict | None = None):
    """Instantiate ``cfg.task`` (a partial) around the given models.

    ``student_cfg``: the config of the trained model (``cfg.student``, or a teacher's config in
    its own stage): its optimizer settings and input pipeline. ``teacher_cfgs``: name -> config
    of each teacher (input pipeline, precision, cache). ``probe``: a task only to be probed
    (``check_before_training``): no teacher cache is built and nothing is compiled.
    """
    student_cfg = cfg.student if student_cfg is None else student_cfg
    teachers = teachers or {}
    teacher_cfgs = teacher_cfgs or {}
    kwargs = dict(
        student=student,
        teachers=teachers,
        distillers=distillers or {},
        teacher_precision={name: teacher_cfgs[name].get("precision") for name in teachers},
        inputs={"student": inputs_from_config(student_cfg),
                **{name: inputs_from_config(teacher_cfgs[name]) for name in teachers}},
    )
    if selection:
        kwargs["selection"] = selection
    if probe:
        kwargs["compile"] = False
    caches = {name: teacher_cfgs[name] for name in teachers if teacher_cfgs[name].get("cache")}
    labelled = {name: teacher_cfgs[name] for name in teachers if teacher_cfgs[name].get("labels")}
    if caches and not probe:
        from kdkit.cache import build_teacher_cache

        kwargs["teacher_cache"] = {name: build_teacher_cache(cfg, teachers[name], datamodule, tcfg)
                                   for name, tcfg in caches.items()}
    if labelled and not probe:  # a teacher-labels file answers like a complete cache (never both: config_checks)
        from kdkit.label_stage import open_labels

        kwargs["teacher_cache"] = {**kwargs.get("teacher_cache", {}),
                                   **{name: open_labels(cfg, tcfg, teachers[name], datamodule, name)
                                      for name, tcfg in labelled.items()}}
    task_cfg = cfg.task
    own = student_cfg.get("optimizer")
    if own:  # <role>.optimizer: this model's own optimizer settings (e.g. a student's weight decay)
        if own.get("_target_") not in (None, cfg.task.optimizer.get("_target_")):
            task_cfg = cfg.task.copy()  # another optimizer: its settings replace the task's
            with open_dict(task_cfg):
                task_cfg.optimizer = {"_partial_": True, **OmegaConf.to_container(own)}
        else:
            task_cfg = OmegaConf.merge(cfg.task, {"optimizer": own})
    task = instantiate(task_cfg)(**kwargs)
    task.student_role = role_of_student
    task.export_programs = tuple(cfg.get("export", {}).get("programs", ("pt2", "onnx")))
    return task


def make_selection(cfg) -> dict:
    """``cfg.selection`` instantiated (``kdkit.selection``): name -> policy, in config order."""
    return {name: instantiate(node) for name, node in (cfg.get("selection") or {}).items()}


# keys of a model's config that make its own input pipeline (read by image tasks)
INPUT_KEYS = ("normalize", "image_size")


def inputs_from_config(model_cfg) -> dict:
    """A model's own input pipeline from its config, without the unset keys."""
    return {key: _container(model_cfg.get(key)) for key in INPUT_KEYS if model_cfg.get(key) is not None}


# ---- helpers ------------------------------------------------------------------------------
def _container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _environment_text(starts: list[dict]) -> str:
    """The ``results.md`` lines on what the numbers depend on beyond the config."""
    distinct = distinct_starts(starts)
    if len(distinct) == 1:
        return f"\nEnvironment (environment.json): {describe(distinct[0])}\n"
    return "\nEnvironment (environment.json); the arithmetic changed on resume:\n\n" + "".join(
        f"- {start_line(s)}\n" for s in distinct)


@rank_zero_only
def _write_html_report(out: Path) -> None:
    """``report.html``; a failure to draw it costs the report, never the run's results."""
    from kdkit.html_report import write_report

    try:
        write_report(out)
    except Exception as err:  # noqa: BLE001 - the numbers are written; the pictures are extra
        say(f"report.html not written ({type(err).__name__}: {err}); rebuild it with "
            f"kdkit-report {out}", warning=True)


@rank_zero_only
def _print_table(results: dict, title: str) -> None:
    from rich.console import Console

    from kdkit.report import format_table

    Console().print(format_table(results, title=title))
