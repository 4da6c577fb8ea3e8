"""DistillationTask: the one training loop every setting shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller
from kdkit.divergence import LossWatch, check_finite
from kdkit.errors import KdkitError
from kdkit.features import FeatureTap
from kdkit.outputs import Outputs
from kdkit.teacher import FrozenTeacher


class DistillationTask(L.LightningModule):
    """Train a student with a task loss plus weighted distiller losses against a frozen teacher.

    loss = task_loss_weight * L_task(student) + sum_d weight_d * sum_terms L_d(student, teacher)

    Subclasses say how a batch feeds a model (``forward_outputs``), what the task loss is
    (``task_loss``) and how results are measured (``update_metrics`` / ``compute_metrics``).

    The teacher is held *outside* the module tree (``self.teacher`` is a property over a plain
    attribute): it is absent from ``state_dict`` and checkpoints, from the optimizer, and from
    DDP's gradient sync and buffer broadcast, yet ``.to(device)`` moves it (``_apply``).

    Args:
        student: the network being trained.
        teacher: frozen teacher network, or None (baseline / teacher-training stages).
        distillers: name -> Distiller; their adapters train and are saved with the student.
        task_loss_weight: weight of the task's own loss (0 for pure distillation).
        optimizer: ``functools.partial`` of a torch optimizer (Hydra ``_partial_: true``).
        scheduler: partial taking ``(optimizer, total_steps=...)``; stepped every step.
        teacher_precision: autocast precision for the teacher only ("bf16", "16" or None).
        teacher_cache: teacher outputs by sample index for static data, or None: an object with
            ``lookup(index, device) -> Outputs | None`` (None unless every index is cached) and
            ``store(index, outputs)`` (see ``kdkit.cache``).
        channels_last: convert models (and 4-D inputs) to channels_last memory format.
        compile: wrap the student forward in ``torch.compile``.
        student_normalize, teacher_normalize: ``{"mean": [...], "std": [...]}`` a model expects
            on its input when it differs from the data's default (e.g. ImageNet statistics for
            pretrained hub weights); tasks with image inputs apply them.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        distillers: Mapping[str, Distiller] | None = None,
        task_loss_weight: float = 1.0,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        teacher_precision: str | None = None,
        teacher_cache=None,
        channels_last: bool = False,
        compile: bool = False,
        student_normalize: Mapping | None = None,
        teacher_normalize: Mapping | None = None,
    ):
        super().__init__()
        self.normalize_overrides = {"student": student_normalize, "teacher": teacher_normalize}
        self.student = student
        self.distillers = nn.ModuleDict(dict(distillers or {}))
        if self.distillers and teacher is None:
            raise KdkitError(f"distillers {list(self.distillers)} need a teacher, but none given")
        frozen = None
        if teacher is not None:
            frozen = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher, teacher_precision)
        object.__setattr__(self, "_teacher", frozen)  # hidden from nn.Module registration
        self.task_loss_weight = float(task_loss_weight)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.teacher_cache = teacher_cache
        self.channels_last = channels_last
        self.compile = compile
        self._built = False
        self._loss_watch = LossWatch()
        self.student_role = "student"  # "teacher" while the runner trains the teacher itself
        self.student_tap = FeatureTap(student, self._feature_names("student"), "student")
        self.teacher_tap = (
            FeatureTap(frozen.model, self._feature_names("teacher"), "teacher") if frozen else None
        )
        if channels_last:
            self.student.to(memory_format=torch.channels_last)
            if frozen is not None:
                frozen.to(memory_format=torch.channels_last)
        # Hidden like the teacher: the compiled wrapper would otherwise duplicate the student's
        # weights in state_dict under another prefix.
        object.__setattr__(self, "_student_forward", torch.compile(student) if compile else student)

    # ---- teacher plumbing -------------------------------------------------------------------
    @property
    def teacher(self) -> FrozenTeacher | None:
        return self._teacher

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def _feature_names(self, role: str) -> list[str]:
        names = list(self.extra_feature_names(role))
        for d in self.distillers.values():
            names += d.student_features if role == "student" else d.teacher_features
        return names

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

    def check_compatible(self, student: Outputs, teacher: Outputs) -> None:
        """Raise KdkitError when teacher and student cannot be paired (e.g. class counts)."""

    def fit_summary(self) -> dict:
        """Facts about the finished fit that belong in ``results.json`` (e.g. the validation
        score of the weights that were kept); empty unless a task selects weights."""
        return {}

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
        ``torch.load``); the distillers' adapters (``adapters.*``) only when asked."""
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
        out = self.forward_outputs(self._student_forward, batch, "student")
        out.features.update(self.student_tap.pop())
        return self.finish_outputs(out, "student")

    def teacher_outputs(self, batch: dict) -> Outputs:
        cache = self.teacher_cache
        if cache is not None:
            cached = cache.lookup(batch["index"], device=self.device)
            if cached is not None:
                return cached
        with torch.no_grad(), self.teacher.autocast(self.device.type):
            out = self.forward_outputs(self.teacher.model, batch, "teacher")
            out.features.update(self.teacher_tap.pop())
        out = self.finish_outputs(out, "teacher")
        if cache is not None:
            cache.store(batch["index"], out)
        return out

    def finish_outputs(self, out: Outputs, role: str) -> Outputs:
        """Hook to post-process raw outputs (e.g. move the tapped embedding into place)."""
        return out

    # ---- build (adapters) -------------------------------------------------------------------
    def build(self, example_batch: dict, num_samples: int | None = None,
              num_classes: int | None = None) -> None:
        """Probe both models on a small batch, check they fit together, build adapters."""
        if self._built:
            return
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            s = self.student_outputs(example_batch)
            t = self.teacher_outputs(example_batch) if self.teacher is not None else None
        self.student.train(was_training)
        self.check_outputs(s, self.student_role)
        if t is not None:
            self.check_outputs(t, "teacher")
            self.check_compatible(s, t)
            context = DistillContext(num_samples=num_samples, num_classes=num_classes)
            for distiller in self.distillers.values():
                distiller.build(s.float(), t.float(), context)
        self._built = True

    def probe(self, datamodule) -> None:
        """Build and check everything on the datamodule's example batch, without a Trainer.

        The pipeline probes every stage's task before any stage trains, so a wrong feature
        name, a shape no adapter fits or a class-count mismatch costs seconds, not a teacher's
        training. The probe's feature hooks are removed afterwards (its models live on).
        """
        try:
            self.build(datamodule.example_batch(), getattr(datamodule, "num_train_samples", None),
                       getattr(datamodule, "num_classes", None))
        finally:
            self.student_tap.remove()
            if self.teacher_tap is not None:
                self.teacher_tap.remove()

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "example_batch"):
            raise KdkitError("the datamodule must provide example_batch() for the probe forward")
        self.build(dm.example_batch(), getattr(dm, "num_train_samples", None),
                   getattr(dm, "num_classes", None))

    # ---- loop -------------------------------------------------------------------------------
    def losses(self, batch: dict) -> tuple[dict[str, Tensor], Outputs]:
        """Weighted named loss terms for one batch, and the student's outputs."""
        # Teacher first: its no-grad activations are freed before the student's graph is built.
        # In the other order the student's saved activations are alive while the teacher
        # allocates, and on CPU the allocator returns and re-faults those pages every step
        # (73k vs 11k page faults per ResNet-56 -> ResNet-20 step; benchmarks/results/scale.md).
        t = self.teacher_outputs(batch) if len(self.distillers) else None
        s = self.student_outputs(batch)
        losses: dict[str, Tensor] = {}
        if self.task_loss_weight:
            task = self.task_loss(s, batch)
            if task is not None:
                losses["task"] = self.task_loss_weight * task
        if t is not None:
            for name, distiller in self.distillers.items():
                for term, value in distiller(s, t, batch).items():
                    losses[name if term == "loss" else f"{name}/{term}"] = distiller.weight * value
        if not losses:
            raise KdkitError("nothing to optimise: task_loss_weight is 0 and no distillers")
        return losses, s

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses, _ = self.losses(batch)
        total = torch.stack([v.float() for v in losses.values()]).sum()
        logging_step = self._is_logging_step()
        self._loss_watch.check(self.global_step, losses, total, due=logging_step)
        if logging_step:
            # Detached tensors only: Lightning reduces them lazily, so no host sync in the step.
            self.log_dict({f"train/loss/{k}": v.detach() for k, v in losses.items()},
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

    def on_train_epoch_end(self) -> None:
        check_finite(self, f"the {self.student_role} after epoch {self.current_epoch}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite(self, f"the {self.student_role} at step {self.global_step}")

    def _eval_step(self, stage: str, batch: dict) -> None:
        self.update_metrics(stage, self.student_outputs(batch), batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_metrics(self, stage: str) -> None:
        metrics = self.compute_metrics(stage)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise KdkitError("task.optimizer is not set")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _save_safetensors(state: dict, path) -> "Path":
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (tied weights): store each once, cloned
    save_file({k: v.clone() for k, v in state.items()}, str(path))
    return path
