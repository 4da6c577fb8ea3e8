"""DistillationTask: the one training loop every setting shares."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller
from kdkit.divergence import LossWatch, check_finite
from kdkit.distributed import broadcast_from_rank0
from kdkit.errors import KdkitError
from kdkit.features import FeatureTap
from kdkit.outputs import Outputs
from kdkit.selection.base import StepPlan
from kdkit.tasks.wiring import (callback_list, input_options, label, per_teacher, resolve_task_loss_weight, route,
                                teacher_models)
from kdkit.teacher import FrozenTeacher
from kdkit.teacher_source import CachedTeacher, LiveTeacher, TeacherSource


class DistillationTask(L.LightningModule):
    """Train a student with a task loss plus weighted distiller losses against frozen teachers.

    loss = task_loss_weight * L_task(student) + sum_d weight_d * sum_terms L_d(student, teacher(s) of d)

    Subclasses say how a batch feeds a model (``forward_outputs``), what the task loss is
    (``task_loss``) and how results are measured (``update_metrics`` / ``compute_metrics``).
    Public hooks they may override besides: ``eval_step`` (what one validation/test batch
    does), ``param_groups`` (optimizer parameter groups), ``make_teacher_source``,
    ``finish_outputs``, ``check_outputs`` / ``check_compatible``, ``extra_feature_names``,
    ``fit_summary``, ``inference_report``, ``export``. Setting-specific options live in the
    subclasses and their mixins (image pipelines and ``channels_last``:
    ``kdkit.tasks.image_inputs.ImageInputs``), never here.

    The task loss weight: with distillers, ``task_loss_weight`` (default: the class's
    ``default_task_loss_weight``, 1 here) mixes the task loss into the distilled objective.
    Without distillers (the teacher-training stage, the baseline) the model learns from its
    task loss alone, with weight 1 whatever ``task_loss_weight`` says. This rule lives here only.

    Teachers are held *outside* the module tree (``self.teachers`` is a plain dict): they are
    absent from ``state_dict`` and checkpoints, from the optimizer, and from DDP's gradient sync
    and buffer broadcast, yet ``.to(device)`` moves them (``_apply``). Each teacher is read
    through a ``kdkit.teacher_source.TeacherSource`` chosen here (live, cached, memoized).

    A distiller reads the teacher it names (``Distiller.teacher_name``), or the only teacher;
    a ``MultiTeacherDistiller`` reads the teachers it lists, or all of them. A wrong name fails
    when the task is built, with the list of names.

    Args:
        student: the network being trained.
        teacher: one frozen teacher network (named "teacher"), or None (baseline /
            teacher-training stages). Shorthand for ``teachers={"teacher": teacher}``.
        distillers: name -> Distiller; their adapters train and are saved with the student.
        task_loss_weight: weight of the task's own loss next to the distillers (0 for pure
            distillation); None: ``default_task_loss_weight``. Ignored without distillers (1).
        optimizer: ``functools.partial`` of a torch optimizer (Hydra ``_partial_: true``).
        scheduler: partial taking ``(optimizer, total_steps=...)``; stepped every step.
        teacher_precision: autocast precision of the teacher forwards ("bf16", "16" or None),
            or ``{name: precision}``.
        teacher_cache: teacher outputs by sample index for static data, or None: an object with
            ``lookup(index, device) -> Outputs | None`` and ``store(index, outputs)`` (see
            ``kdkit.cache``), or ``{name: cache}``.
        compile: wrap the student forward in ``torch.compile``.
        teachers: name -> frozen teacher network (several teachers).
        inputs: role -> that model's own input pipeline options, for roles "student" and each
            teacher name (e.g. ``{"normalize": {"mean", "std"}, "image_size": 224}`` for image
            tasks); the task subclass interprets the keys it knows.
        student_normalize, teacher_normalize: shorthands for ``inputs[role]["normalize"]``
            (``teacher_normalize`` applies to every teacher without its own).
        callbacks: Lightning callbacks this task brings to every Trainer that runs it
            (``configure_callbacks``), as a list or ``{name: callback}`` (None entries are
            skipped), e.g. ``kdkit.callbacks.KeepBestWeights``. Their ``fit_summary(task)``, when
            they have one, joins ``fit_summary``.
        selection: name -> ``kdkit.selection.base.SelectionPolicy``: what the student trains
            on each step and which rows get teacher outputs (``StepPlan``), in order.
    """

    # the validation metric (without "val/") that ranks models of this task, e.g. "acc"
    primary_metric: str | None = None
    # weight of the task loss next to distillers when task_loss_weight is not given
    default_task_loss_weight: float = 1.0

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        distillers: Mapping[str, Distiller] | None = None,
        task_loss_weight: float | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        teacher_precision=None,
        teacher_cache=None,
        compile: bool = False,
        teachers: Mapping[str, nn.Module] | None = None,
        inputs: Mapping[str, Mapping] | None = None,
        student_normalize: Mapping | None = None,
        teacher_normalize: Mapping | None = None,
        callbacks: Sequence[L.Callback] | Mapping[str, L.Callback | None] | None = None,
        selection: Mapping | None = None,
    ):
        super().__init__()
        models = teacher_models(teacher, teachers)
        self.inputs = input_options(inputs, models, student_normalize, teacher_normalize)
        self.student = student
        self.distillers = nn.ModuleDict(dict(distillers or {}))
        if self.distillers and not models:
            raise KdkitError(f"distillers {list(self.distillers)} need a teacher, but none given")
        precisions = per_teacher(teacher_precision, models, "teacher_precision")
        frozen = {name: m if isinstance(m, FrozenTeacher) else FrozenTeacher(m, precisions[name])
                  for name, m in models.items()}
        object.__setattr__(self, "_teachers", frozen)  # hidden from nn.Module registration
        self.routes = {name: route(name, d, list(frozen)) for name, d in self.distillers.items()}
        self.task_loss_weight = resolve_task_loss_weight(
            task_loss_weight, bool(self.distillers), self.default_task_loss_weight)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        caches = per_teacher(teacher_cache, frozen, "teacher_cache")
        self.teacher_caches = {name: c for name, c in caches.items() if c is not None}
        self.compile = compile
        self.task_callbacks = callback_list(callbacks)
        self.selection = dict(selection or {})  # name -> kdkit.selection.base.SelectionPolicy
        if self.selection and not models:
            raise KdkitError(f"selection policies {list(self.selection)} need a teacher, but none given")
        for name, policy in self.selection.items():
            if policy.teacher is not None and policy.teacher not in models:
                raise KdkitError(f"selection.{name}.teacher={policy.teacher!r} is not a teacher of this "
                                 f"run ({', '.join(models)})")
        self._built = False
        self._loss_watch = LossWatch()
        self.student_role = "student"  # "teacher" while the runner trains a teacher itself
        self._taps: dict[str, FeatureTap] = {}  # created on first use: subclasses set up first
        # Hidden like the teachers: the compiled wrapper would otherwise duplicate the student's
        # weights in state_dict under another prefix.
        object.__setattr__(self, "_student_forward", torch.compile(student) if compile else student)
        self.teacher_sources = {name: self.make_teacher_source(name, self.teacher_caches.get(name))
                                for name in frozen}

    # ---- teacher plumbing -------------------------------------------------------------------
    @property
    def teachers(self) -> dict[str, FrozenTeacher]:
        return self._teachers

    @property
    def teacher_names(self) -> list[str]:
        return list(self._teachers)

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The only teacher (None without one); with several, ask ``teachers[name]``."""
        if len(self._teachers) > 1:
            raise KdkitError(f"this task has several teachers ({', '.join(self._teachers)}): "
                             "use task.teachers[name]")
        return next(iter(self._teachers.values()), None)

    @property
    def teacher_cache(self):
        """The only teacher's cache (None without one)."""
        return next(iter(self.teacher_caches.values()), None) if len(self._teachers) == 1 else None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for t in self._teachers.values():
            t._apply(fn, *args, **kwargs)
        return self

    def make_teacher_source(self, name: str, cache) -> TeacherSource:
        """How teacher ``name`` is read: live, or through its cache. Subclasses may reuse
        outputs otherwise (``MemoizedTeacher``, ``PrecomputedTeacher``)."""
        live = LiveTeacher(name, functools.partial(self.run_teacher, name))  # picklable (ddp_spawn)
        return CachedTeacher(live, cache) if cache is not None else live

    def tap(self, role: str) -> FeatureTap:
        """The feature tap of ``role`` ("student" or a teacher's name), created on first use."""
        if role not in self._taps:
            model = self.student if role == "student" else self._teachers[role].model
            self._taps[role] = FeatureTap(model, self._feature_names(role), label(role, self._teachers))
        return self._taps[role]

    @property
    def student_tap(self) -> FeatureTap:
        return self.tap("student")

    @property
    def teacher_tap(self) -> FeatureTap | None:
        return self.tap(self._only_teacher()) if self._teachers else None

    def remove_taps(self) -> None:
        for tap in self._taps.values():
            tap.remove()
        self._taps.clear()

    def _feature_names(self, role: str) -> list[str]:
        names = list(self.extra_feature_names(role))
        for name, d in self.distillers.items():
            if role == "student":
                names += d.student_features
            elif role in self.routes[name]:
                names += d.teacher_features
        return list(dict.fromkeys(names))

    def _only_teacher(self) -> str:
        if len(self._teachers) != 1:
            raise KdkitError(f"this task has {len(self._teachers)} teachers "
                             f"({', '.join(self._teachers) or 'none'}): name the one you mean")
        return next(iter(self._teachers))

    # ---- what subclasses provide ------------------------------------------------------------
    def extra_feature_names(self, role: str) -> list[str]:
        """Module names this task itself taps on the student/teacher (e.g. the embedding)."""
        return []

    def forward_outputs(self, model: nn.Module, batch: dict, role: str) -> Outputs:
        raise NotImplementedError

    def task_loss(self, outputs: Outputs, batch: dict) -> Tensor | None:
        return None

    def update_metrics(self, stage: str, outputs: Outputs, batch: dict) -> None:
        pass

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        return {}

    def check_outputs(self, outputs: Outputs, role: str) -> None:
        """Raise KdkitError when one model's outputs do not fit the data (e.g. class count)."""

    def check_data(self, datamodule) -> None:
        """Raise KdkitError when this task's parts cannot train on ``datamodule``'s current
        training view (e.g. a distiller that reads labels, on transfer data without them)."""

    def _check_data(self, datamodule) -> None:
        self.check_data(datamodule)
        for policy in self.selection.values():
            policy.check_data(datamodule)

    def check_compatible(self, student: Outputs, teacher: Outputs) -> None:
        """Raise KdkitError when teacher and student cannot be paired (e.g. class counts)."""

    def fit_summary(self) -> dict:
        """Facts about the finished fit that belong in ``results.json`` (e.g. the validation
        score of the weights that were kept): what the task's callbacks, and any callback of the
        Trainer that ran it, report through ``fit_summary(task)``; empty unless one selects."""
        callbacks = list(self.task_callbacks)
        if self._trainer is not None:
            callbacks += [cb for cb in self._trainer.callbacks if all(cb is not c for c in callbacks)]
        summary: dict = {}
        for cb in callbacks:
            report = getattr(cb, "fit_summary", None)
            if callable(report):
                summary.update(report(self))
        for name, policy in self.selection.items():
            policy.sync_counters()  # every rank calls fit_summary, so the sum is safe here
            summary.update({f"selection/{name}/{k}": v for k, v in policy.summary().items()})
        return summary

    def configure_callbacks(self) -> list[L.Callback]:
        """The task's own callbacks (``callbacks``), each attached once per Trainer."""
        attached = self._trainer.callbacks if self._trainer is not None else []
        return [cb for cb in self.task_callbacks if all(cb is not c for c in attached)]

    def inference_report(self, batch: dict) -> dict:
        """Size and inference latency of the student on ``batch`` (one forward, no grad)."""
        from kdkit.report import count_parameters, latency_ms

        batch = self.transfer_batch_to_device(batch, self.device, 0)
        was_training = self.student.training
        self.student.eval()
        ms = latency_ms(self.forward_outputs, self.student, batch, "student")
        self.student_tap.pop()
        self.student.train(was_training)
        return {"params": count_parameters(self.student), "latency_ms": ms}

    def export(self, directory, with_adapters: bool = False) -> list:
        """Save the trained student alone, never the teacher: ``student.safetensors`` (loads
        without unpickling anything) and ``student.pt`` (the same bare ``state_dict`` for
        ``torch.load``); the distillers' adapters (``adapters.*``) only when asked. Setting tasks
        add their library-native formats (``kdkit.exports``)."""
        from pathlib import Path

        from kdkit.checkpoint_io import save_atomically

        directory = Path(directory)
        paths = []
        parts = {"student": self.student}
        if with_adapters and len(self.distillers):
            parts["adapters"] = self.distillers
        for name, module in parts.items():
            state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            paths += [save_atomically(state, directory / f"{name}.pt"),
                      _save_safetensors(state, directory / f"{name}.safetensors")]
        return paths

    # ---- outputs ----------------------------------------------------------------------------
    def student_outputs(self, batch: dict) -> Outputs:
        tap = self.tap("student")  # hooks in place before the forward
        out = self.forward_outputs(self._student_forward, batch, "student")
        out.features.update(tap.pop())
        return self.finish_outputs(out, "student")

    def teacher_outputs(self, batch: dict, name: str | None = None) -> Outputs:
        """Teacher ``name``'s outputs on ``batch`` (the only teacher when None), from its source."""
        return self.teacher_sources[name or self._only_teacher()].outputs(batch)

    def run_teacher(self, name: str, batch: dict, grad: bool = False) -> Outputs:
        """One live forward of teacher ``name``: its own precision, its taps; no grad unless
        ``grad`` (the frozen weights get none either way, but the inputs do: a learned
        augmentation differentiates through the teacher to its images)."""
        teacher, tap = self._teachers[name], self.tap(name)
        with torch.set_grad_enabled(grad), teacher.autocast(self.device.type):
            out = self.forward_outputs(teacher.model, batch, name)
            out.features.update(tap.pop())
        return self.finish_outputs(out, name)

    def finish_outputs(self, out: Outputs, role: str) -> Outputs:
        """Hook to post-process raw outputs (e.g. move the tapped embedding into place)."""
        return out

    # ---- build (adapters) -------------------------------------------------------------------
    def build(self, example_batch: dict, num_samples: int | None = None,
              num_classes: int | None = None) -> None:
        """Probe every model on a small batch, check they fit together, build adapters."""
        if self._built:
            return
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            s = self.student_outputs(example_batch)
            ts = {name: self.teacher_outputs(example_batch, name) for name in self._teachers}
        self.student.train(was_training)
        self.check_outputs(s, self.student_role)
        for name, t in ts.items():
            self.check_outputs(t, label(name, self._teachers))
            self.check_compatible(s, t)
        for name, distiller in self.distillers.items():
            teachers = {n: self._teachers[n].model for n in self.routes[name]}
            if not distiller.reads_several_teachers:
                teachers = {"teacher": next(iter(teachers.values()))}
            context = DistillContext(num_samples=num_samples, num_classes=num_classes,
                                     models={"student": self.student, **teachers})
            distiller.build(s.float(), self._routed(name, {n: t.float() for n, t in ts.items()}), context)
        self._built = True

    def _routed(self, distiller: str, outputs: dict[str, Outputs], names: list[str] | None = None):
        """What distiller ``distiller`` reads: one teacher's ``Outputs``, or ``{name: Outputs}``."""
        names = self.routes[distiller] if names is None else names
        if self.distillers[distiller].reads_several_teachers:
            return {n: outputs[n] for n in names}
        return outputs[names[0]]

    def probe(self, datamodule) -> None:
        """Build and check everything on the datamodule's example batch, without a Trainer.

        The pipeline probes every stage's task before any stage trains, so a wrong feature
        name, a shape no adapter fits or a class-count mismatch costs seconds, not a teacher's
        training. The probe's feature hooks are removed afterwards (its models live on).
        """
        try:
            self._check_data(datamodule)
            self.build(datamodule.example_batch(), datamodule.num_train_samples, datamodule.num_classes)
        finally:
            self.remove_taps()

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            raise KdkitError("the task needs a datamodule (kdkit.data_contract): trainer.fit(task, datamodule=...)")
        self._check_data(dm)
        self.build(dm.example_batch(), dm.num_train_samples, dm.num_classes)
        # Read by DDP when Lightning wraps the task, which happens after this hook.
        self._ddp_params_and_buffers_to_ignore = self.rank_synced_buffer_names()

    def rank_synced_buffer_names(self) -> list[str]:
        """Names (in this task) of the distillers' buffers that every rank keeps in sync itself
        (``Distiller.rank_synced_buffers``): DDP leaves them out of its per-step buffer broadcast."""
        synced = {id(getattr(d, b)) for d in self.distillers.values() for b in d.rank_synced_buffers}
        return [name for name, buf in self.named_buffers() if id(buf) in synced]

    def on_fit_start(self) -> None:
        # DDP no longer copies rank 0's values of these at wrap time either: do it once here, so
        # every rank starts from the same banks whatever its random state was when it built them.
        broadcast_from_rank0([getattr(d, b) for d in self.distillers.values() for b in d.rank_synced_buffers])

    # ---- loop -------------------------------------------------------------------------------
    def losses(self, batch: dict) -> tuple[dict[str, Tensor], Outputs]:
        """Weighted named loss terms for one batch, and the student's outputs."""
        # Teachers first: their no-grad activations are freed before the student's graph is
        # built. In the other order the student's saved activations are alive while a teacher
        # allocates, and on CPU the allocator returns and re-faults those pages every step
        # (73k vs 11k page faults per ResNet-56 -> ResNet-20 step; benchmarks/results/scale.md).
        # Only the teachers some distiller reads this step run (a schedule reads one at a time).
        step_routes = {name: d.teachers_for_step(self.routes[name]) for name, d in self.distillers.items()}
        plan = StepPlan(batch)
        for policy in self.selection.values():
            plan = policy.plan(self, plan)
        batch = plan.batch
        distill_batch = plan.distilled_batch()
        if plan.distill_rows is not None and not len(plan.distill_rows):  # no row is distilled
            step_routes = {name: [] for name in step_routes}
        needed = dict.fromkeys(n for names in step_routes.values() for n in names)
        ts = {name: plan.teacher[name] if name in plan.teacher else self.teacher_outputs(distill_batch, name)
              for name in needed}
        clean = batch
        for distiller in self.distillers.values():  # e.g. masked images for the student only
            batch = distiller.student_batch(batch)
        s = self.student_outputs(batch)
        losses: dict[str, Tensor] = {}
        if self.task_loss_weight:
            task_out, task_batch = s, batch
            if batch is not clean and any(d.task_on_full_view for d in self.distillers.values()):
                # After the changed view's forward, never before: a token-dropping hook is armed
                # for exactly the student's next forward (VisibleTokens).
                task_out, task_batch = self.student_outputs(clean), clean
            task = self.task_loss(task_out, task_batch)
            if task is not None:
                losses["task"] = self.task_loss_weight * task
        s_distill = s if plan.distill_rows is None else s.rows(plan.distill_rows)
        distill_batch = StepPlan(batch, distill_rows=plan.distill_rows).distilled_batch()  # as the student saw it
        for name, distiller in self.distillers.items():
            if not step_routes[name]:
                continue
            for term, value in distiller(s_distill, self._routed(name, ts, step_routes[name]), distill_batch).items():
                losses[name if term == "loss" else f"{name}/{term}"] = distiller.weight * value
        if not losses:
            if self.selection:  # e.g. a batch of unlabelled rows none of which a budget paid for
                losses["task"] = _zero_loss(s)
            else:
                raise KdkitError("nothing to optimise: task_loss_weight is 0 and no distillers")
        return losses, s

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        for distiller in self.distillers.values():
            distiller.set_progress(self.current_epoch, self.global_step)
        losses, _ = self.losses(batch)
        total = torch.stack([v.float() for v in losses.values()]).sum()
        logging_step = self._is_logging_step()
        self._loss_watch.check(self.global_step, losses, total, due=logging_step)
        if logging_step:
            # Detached tensors only: Lightning reduces them lazily, so no host sync in the step.
            self.log_dict({f"train/loss/{k}": v.detach() for k, v in losses.items()},
                          on_step=True, on_epoch=False)
            for name, policy in self.selection.items():
                self.log_dict({f"train/selection/{name}/{k}": v for k, v in policy.step_stats().items()},
                              on_step=True, on_epoch=False)
            self.log("train/loss", total.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return total

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes on-step values this step.

        Each ``self.log`` call costs milliseconds (Lightning moves its result collection to the
        device on every call) although on-step values are written only every
        ``log_every_n_steps``; skipping the other steps took the framework's overhead per
        ResNet-56 -> ResNet-20 step from 2.9% to 1.8% (benchmarks/results/scale.md).
        """
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer else None
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_epoch_start(self) -> None:
        for policy in self.selection.values():
            policy.on_epoch_start(self)

    def on_train_epoch_end(self) -> None:
        check_finite(self, f"the {self.student_role} after epoch {self.current_epoch}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite(self, f"the {self.student_role} at step {self.global_step}")
        if self.selection:
            if not _ranks_out_of_step(self._trainer):
                for policy in self.selection.values():
                    policy.sync_counters()
            checkpoint["kdkit_selection"] = {name: p.state_dict() for name, p in self.selection.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for name, state in checkpoint.get("kdkit_selection", {}).items():
            if name in self.selection:
                self.selection[name].load_state_dict(state)
                self.selection[name].counters_loaded()

    def eval_step(self, stage: str, batch: dict) -> None:
        """What one evaluation batch does, for ``stage`` "val" or "test" (``validation_step`` and
        ``test_step`` call it): by default the student's outputs go to ``update_metrics``.
        Override it when evaluation is not a plain forward, e.g. encoding a corpus."""
        self.update_metrics(stage, self.student_outputs(batch), batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step("test", batch)

    def _log_metrics(self, stage: str) -> None:
        metrics = self.compute_metrics(stage)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: dicts with ``"params"`` and any per-group option
        (e.g. ``"weight_decay": 0.0``) that overrides the optimizer's settings. Default: one
        group of every trainable parameter (student and distiller adapters). Empty groups are
        dropped before the optimizer sees them."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise KdkitError("task.optimizer is not set")
        groups = [g for g in self.param_groups() if len(g["params"])]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _zero_loss(outputs: Outputs) -> Tensor:
    """A zero that keeps the step's graph: Lightning skips nothing, no parameter moves."""
    for value in outputs.flat().values():
        if value.requires_grad:
            return value.float().sum() * 0.0
    raise KdkitError("nothing to optimise on this batch, and the student's outputs carry no gradient")


def _save_safetensors(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (tied weights): store each once, cloned
    save_file({k: v.clone() for k, v in state.items()}, str(path))
    return path


def _ranks_out_of_step(trainer) -> bool:
    """True while a Ctrl-C checkpoint is written: the ranks were stopped at different steps, so
    no collective may run (the selection counts keep each rank's own share). A SIGTERM stop saves
    at a step every rank has reached (``StageCheckpoint`` holds a barrier there)."""
    from lightning.pytorch.trainer.states import TrainerStatus

    if trainer is None:
        return False
    return trainer.state.status == TrainerStatus.INTERRUPTED and not trainer.received_sigterm
