"""Vision classification: images -> logits (+ pooled embedding and tapped features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.features import INPUT_SUFFIX, last_linear
from kdkit.labels import UNLABELED, labeled
from kdkit.outputs import Outputs
from kdkit.tasks.base import DistillationTask
from kdkit.tasks.image_inputs import ImageInputs


class ClassificationTask(ImageInputs, DistillationTask):
    """Image classification distillation (Hinton et al. 2015 setting): accuracy on the test set.

    Batches are dicts ``{"image": float [B, C, H, W] in [0, 1], "label": long [B],
    "index": long [B]}``. Each model gets its own image pipeline (``ImageInputs``): its own
    mean/std and input size (``inputs[role]["normalize"]`` / ``["image_size"]``), so a teacher
    trained with other statistics, or a CLIP zero-shot head reading 224 x 224 images, is fed
    what it expects.

    Args:
        num_classes: number of classes (checked against both models at start-up).
        mean, std: the data's normalisation (per channel), used by every model without its
            own ``normalize`` input option (see ``DistillationTask``'s ``inputs``).
        label_smoothing: for the task cross-entropy.
        embedding_module: module whose *input* is the pooled embedding ("auto": the last
            ``nn.Linear``; None: no embedding). ``teacher_embedding_module`` likewise.
        channels_last: see ``ImageInputs``.
        **kwargs: see ``DistillationTask``.
    """

    primary_metric = "acc"  # compared across stages on validation data (warn_weaker_teachers)

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
        super().__init__(student, teacher, **kwargs)
        self.embedding_modules = {"student": embedding_module, "teacher": teacher_embedding_module}
        self._embedding_names: dict[str, str | None] = {}
        self.num_classes = int(num_classes)
        self.label_smoothing = label_smoothing
        self.register_image_pipelines({
            role: {**(opts.get("normalize") or {"mean": mean, "std": std}), "size": opts.get("image_size")}
            for role, opts in self.inputs.items()})
        self.metrics = nn.ModuleDict({
            stage: torchmetrics.classification.MulticlassAccuracy(self.num_classes, average="micro")
            for stage in ("val", "test")
        })

    def embedding_name(self, role: str) -> str | None:
        """The tapped module whose input is ``role``'s pooled embedding (None: no embedding)."""
        if role not in self._embedding_names:
            model = self.student if role == "student" else self.teachers[role].model
            key = "student" if role == "student" else "teacher"
            self._embedding_names[role] = _embedding_name(model, self.embedding_modules[key])
        return self._embedding_names[role]

    def extra_feature_names(self, role: str) -> list[str]:
        name = self.embedding_name(role)
        return [name] if name else []

    def model_input(self, batch: dict, role: str) -> Tensor:
        return self.image_input(batch, role)

    def forward_outputs(self, model, batch: dict, role: str) -> Outputs:
        return Outputs(logits=model(self.model_input(batch, role)))

    def finish_outputs(self, out: Outputs, role: str) -> Outputs:
        name = self.embedding_name(role)
        if name and name in out.features:
            out.embedding = out.features.pop(name).flatten(1)
        return out

    def check_data(self, datamodule) -> None:
        if getattr(datamodule, "mixes_samples", False):  # a user's own datamodule may not have it
            hard = [name for name, d in self.distillers.items() if d.reads_labels and not d.handles_soft_labels]
            if hard:
                raise KdkitError(
                    f"distillers {hard} read each row's class, but data.mixup_alpha / cutmix_alpha make "
                    "every training row a mixture of two samples with a soft label: switch the mixing "
                    "off or use distillers that read teacher outputs alone (e.g. kd)")
            banked = [name for name, d in self.distillers.items() if d.reads_sample_index]
            if banked:
                raise KdkitError(
                    f"distillers {banked} keep a memory row per training sample, but data.mixup_alpha / "
                    "cutmix_alpha make every training row a mixture of two samples: switch the mixing off")
        if not getattr(datamodule, "has_unlabeled", False):  # a datamodule without transfer options
            return
        readers = [name for name, d in self.distillers.items() if d.reads_labels]
        if readers:
            raise KdkitError(
                f"distillers {readers} read each sample's label, but this training view has samples "
                "without one (data.labeled_fraction / labeled_count / unlabeled): use distillers that "
                "read teacher outputs alone (e.g. kd), or drop the transfer options")

    def check_outputs(self, outputs: Outputs, role: str) -> None:
        if outputs.logits.shape[-1] != self.num_classes:
            raise KdkitError(
                f"the {role} model predicts {outputs.logits.shape[-1]} classes but the data has "
                f"{self.num_classes}: set its num_classes to {self.num_classes}"
            )

    def task_loss(self, outputs: Outputs, batch: dict) -> Tensor:
        """Cross-entropy averaged over the labelled rows; transfer rows (``kdkit.labels``) carry
        no label and add nothing (0 when no row has one). No host sync: the count stays on the
        device."""
        labels = batch["label"]
        if labels.dim() != 1:  # soft labels [B, C] (mixup-style): every row has one
            return F.cross_entropy(outputs.logits.float(), labels, label_smoothing=self.label_smoothing)
        total = F.cross_entropy(outputs.logits.float(), labels, ignore_index=UNLABELED,
                                label_smoothing=self.label_smoothing, reduction="sum")
        return total / labeled(labels).sum().clamp(min=1)

    def update_metrics(self, stage: str, outputs: Outputs, batch: dict) -> None:
        self.metrics[stage].update(outputs.logits.float(), batch["label"])

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        acc = self.metrics[stage].compute()  # torchmetrics reduces over ranks
        self.metrics[stage].reset()
        return {"acc": acc}

    def export(self, directory, with_adapters: bool = False, datamodule=None) -> list:
        """``DistillationTask.export``, plus the student as self-contained programs
        (``student.pt2``, ``student.onnx``, ``inputs.json``) and, for a timm student, a timm
        folder (``timm/``): see ``kdkit.exports``. ``datamodule`` gives the example input
        (default: the Trainer's). A format that cannot be written costs a warning line only."""
        from kdkit.exports.optional import optional_format
        from kdkit.exports.settings import vision_exports

        paths = super().export(directory, with_adapters)
        return paths + optional_format("programs", lambda: vision_exports(self, directory, datamodule))


def _embedding_name(model: nn.Module | None, name: str | None) -> str | None:
    if model is None or name is None:
        return None
    if name == "auto":
        try:
            name = last_linear(model)
        except KdkitError:  # a model without a Linear head simply has no embedding
            return None
    return name if name.endswith(INPUT_SUFFIX) else name + INPUT_SUFFIX
