"""Tiny staged conv nets and the task's probe -> build -> forward path, for distiller tests."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from kdkit.distillers.base import DistillContext, Distiller
from kdkit.features import FeatureTap
from kdkit.outputs import Outputs
from kdkit.teachers import build_distiller
from kdkit.teacher import FrozenTeacher

CONF = Path(__file__).resolve().parents[2] / "conf" / "distiller"
EMBEDDING = "fc:input"


def staged_net(width: int, num_classes: int = 5) -> nn.Sequential:
    """conv1 -> layer1 (w, 8x8) -> layer2 (2w, 4x4) -> layer3 (4w, 2x2) -> pool -> flatten -> fc."""

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, width, 3, padding=1),
        layer1=block(width, width, 1),
        layer2=block(width, 2 * width, 2),
        layer3=block(2 * width, 4 * width, 2),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(4 * width, num_classes),
    ))


def image_batch(n: int = 6, num_classes: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 8, 8, generator=g),
            "label": torch.randint(0, num_classes, (n,), generator=g),
            "index": torch.randperm(3 * n, generator=g)[:n]}


class Pair:
    """A trainable student and a frozen teacher, tapped for what ``distiller`` asks."""

    def __init__(self, distiller: Distiller, s_width: int = 4, t_width: int = 6, seed: int = 0):
        torch.manual_seed(seed)
        self.student = staged_net(s_width).train()
        self.teacher = FrozenTeacher(staged_net(t_width))
        self.s_tap = FeatureTap(self.student, [*distiller.student_features, EMBEDDING], "student")
        self.t_tap = FeatureTap(self.teacher.model, [*distiller.teacher_features, EMBEDDING], "teacher")

    @staticmethod
    def _outputs(logits, tap: FeatureTap) -> Outputs:
        features = tap.pop()
        return Outputs(logits=logits, embedding=features.pop(EMBEDDING).flatten(1), features=features)

    def student_outputs(self, batch: dict) -> Outputs:
        return self._outputs(self.student(batch["image"]), self.s_tap)

    def teacher_outputs(self, batch: dict) -> Outputs:
        return self._outputs(self.teacher(batch["image"]), self.t_tap)  # no_grad inside


def build(distiller: Distiller, pair: Pair, batch: dict, num_samples: int = 18) -> None:
    """What ``DistillationTask.build`` does: probe both models in eval mode, then build."""
    pair.student.eval()
    with torch.no_grad():
        s, t = pair.student_outputs(batch), pair.teacher_outputs(batch)
    pair.student.train()
    distiller.build(s.float(), t.float(), DistillContext(num_samples=num_samples, num_classes=5))


def distill_backward(distiller: Distiller, pair: Pair, batch: dict) -> dict[str, torch.Tensor]:
    """One training forward of ``distiller`` on ``pair`` under bf16 autocast, as with
    ``precision: bf16-mixed``; checks every term is float32; backward of the weighted sum."""
    distiller.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = distiller(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), f"term {name}: {value}"
    torch.stack([distiller.weight * v for v in terms.values()]).sum().backward()
    return terms


def assert_gradients(pair: Pair, distiller: Distiller, learning: list[str]) -> None:
    """Student modules in ``learning`` and every distiller parameter get nonzero gradients;
    the other student modules get none; the teacher has no trainable parameter and no gradient."""
    for name, p in pair.student.named_parameters():
        if name.split(".")[0] in learning:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"student {name} got no gradient"
        else:
            assert p.grad is None, f"student {name} should not be reached by this distiller"
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"distiller {name} got no gradient"
    for name, p in pair.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, f"teacher {name} must not learn"


def from_yaml(name: str) -> Distiller:
    """``conf/distiller/<name>.yaml`` instantiated exactly as the runner does."""
    return build_distiller(OmegaConf.load(CONF / f"{name}.yaml")[name])


def run_once(distiller: Distiller, batch: dict | None = None) -> dict[str, torch.Tensor]:
    """The terms of one forward of ``distiller`` on a fresh ``Pair`` after ``build``: what a yaml's
    "instantiates and runs" test checks."""
    pair, batch = Pair(distiller), batch or image_batch()
    build(distiller, pair, batch)
    return distiller(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
