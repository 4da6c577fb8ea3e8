"""A tiny ViT student and a frozen teacher (ViT or CNN), tapped for a distiller, for the tests of
the distillers that read token features (deit, cskd, trg, mfd)."""

from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kdkit.distillers.base import DistillContext
from kdkit.features import FeatureTap
from kdkit.outputs import Outputs
from kdkit.teacher import FrozenTeacher


def tiny_vit(seed: int = 0, distilled: bool = False, **sizes) -> nn.Module:
    """A timm ViT on 16 x 16 images, patch 4 (4 x 4 patch tokens), width 16, 2 blocks, 5 classes;
    ``distilled``: with DeiT's distillation token (timm's ``VisionTransformerDistilled``)."""
    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls(**{"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2,
                  "num_classes": 5, **sizes})


class ViTPair:
    """A trainable ``student`` (default: ``tiny_vit(0)``) and a frozen ``teacher`` (default: a
    wider ViT), tapped for what ``distiller`` asks; ``build`` does what the task does: probe in
    eval mode, then build the distiller with the networks in its context."""

    def __init__(self, distiller, student: nn.Module | None = None, teacher: nn.Module | None = None):
        self.student = (student if student is not None else tiny_vit(0)).train()
        self.teacher = FrozenTeacher(teacher if teacher is not None else tiny_vit(1, embed_dim=24))
        self.s_tap = FeatureTap(self.student, distiller.student_features, "student")
        self.t_tap = FeatureTap(self.teacher.model, distiller.teacher_features, "teacher")

    def student_outputs(self, batch: dict) -> Outputs:
        return Outputs(logits=self.student(batch["image"]), features=self.s_tap.pop())

    def teacher_outputs(self, batch: dict) -> Outputs:
        return Outputs(logits=self.teacher(batch["image"]), features=self.t_tap.pop())

    def build(self, distiller, batch: dict, num_classes: int = 5) -> None:
        self.student.eval()
        with torch.no_grad():
            s, t = self.student_outputs(batch), self.teacher_outputs(batch)
        self.student.train()
        context = DistillContext(num_classes=num_classes, models={"student": self.student, "teacher": self.teacher.model})
        distiller.build(s.float(), t.float(), context)
