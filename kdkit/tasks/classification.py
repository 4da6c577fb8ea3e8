"""Vision classification: images -> logits (+ pooled embedding and tapped features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.features import INPUT_SUFFIX, last_linear
from kdkit.outputs import Outputs
from kdkit.tasks.base import DistillationTask


class ClassificationTask(DistillationTask):
    """Image classification distillation (Hinton et al. 2015 setting): accuracy on the test set.

    Batches are dicts ``{"image": float [B, C, H, W] in [0, 1], "label": long [B],
    "index": long [B]}``. Each model normalises with its own mean/std, so a teacher trained with
    another normalisation (e.g. ImageNet statistics for a timm model) is fed what it expects.

    Args:
        num_classes: number of classes (checked against both models at start-up).
        mean, std: the data's normalisation (per channel), used by every model whose
            ``student_normalize`` / ``teacher_normalize`` (see ``DistillationTask``) is unset.
        label_smoothing: for the task cross-entropy.
        embedding_module: module whose *input* is the pooled embedding ("auto": the last
            ``nn.Linear``; None: no embedding). ``teacher_embedding_module`` likewise.
        **kwargs: see ``DistillationTask``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        num_classes: int,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        label_smoothing: float = 0.0,
        embedding_module: str | None = "auto",
        teacher_embedding_module: str | None = "auto",
        **kwargs,
    ):
        emb = {
            "student": _embedding_name(student, embedding_module),
            "teacher": _embedding_name(teacher, teacher_embedding_module) if teacher is not None else None,
        }
        object.__setattr__(self, "_embedding_names", emb)
        super().__init__(student, teacher, **kwargs)
        self.num_classes = int(num_classes)
        self.label_smoothing = label_smoothing
        for role in ("student", "teacher"):
            norm = self.normalize_overrides[role] or {"mean": mean, "std": std}
            self.register_buffer(f"{role}_mean", _channel_stat(norm["mean"]), persistent=False)
            self.register_buffer(f"{role}_std", _channel_stat(norm["std"]), persistent=False)
        self.metrics = nn.ModuleDict({
            stage: torchmetrics.classification.MulticlassAccuracy(self.num_classes, average="micro")
            for stage in ("val", "test")
        })

    def extra_feature_names(self, role: str) -> list[str]:
        name = self._embedding_names[role]
        return [name] if name else []

    def model_input(self, batch: dict, role: str) -> Tensor:
        x = batch["image"]
        x = (x - getattr(self, f"{role}_mean")) / getattr(self, f"{role}_std")
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_outputs(self, model, batch: dict, role: str) -> Outputs:
        return Outputs(logits=model(self.model_input(batch, role)))

    def finish_outputs(self, out: Outputs, role: str) -> Outputs:
        name = self._embedding_names[role]
        if name and name in out.features:
            out.embedding = out.features.pop(name).flatten(1)
        return out

    def check_outputs(self, outputs: Outputs, role: str) -> None:
        if outputs.logits.shape[-1] != self.num_classes:
            raise KdkitError(
                f"the {role} model predicts {outputs.logits.shape[-1]} classes but the data has "
                f"{self.num_classes}: set its num_classes to {self.num_classes}"
            )

    def task_loss(self, outputs: Outputs, batch: dict) -> Tensor:
        return F.cross_entropy(outputs.logits.float(), batch["label"], label_smoothing=self.label_smoothing)

    def update_metrics(self, stage: str, outputs: Outputs, batch: dict) -> None:
        self.metrics[stage].update(outputs.logits.float(), batch["label"])

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        acc = self.metrics[stage].compute()  # torchmetrics reduces over ranks
        self.metrics[stage].reset()
        return {"acc": acc}


def _channel_stat(values: Sequence[float]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)


def _embedding_name(model: nn.Module | None, name: str | None) -> str | None:
    if model is None or name is None:
        return None
    if name == "auto":
        try:
            name = last_linear(model)
        except KdkitError:  # a model without a Linear head simply has no embedding
            return None
    return name if name.endswith(INPUT_SUFFIX) else name + INPUT_SUFFIX
