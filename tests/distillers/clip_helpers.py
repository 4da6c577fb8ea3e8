"""A tiny linear 'CLIP student' and fixed teacher embeddings, for the CLIP distiller tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.distillers.base import DistillContext, Distiller
from kdkit.outputs import Outputs


def clip_outputs(image, text, scale) -> Outputs:
    return Outputs(embedding=image, features={"text_embedding": text, "logit_scale": scale})


class LinearClip(nn.Module):
    """Image and text 'towers' that are one linear layer each, plus CLIP's log logit scale.

    Args:
        in_dim: width of the raw inputs; dim: embedding width.
    """

    def __init__(self, in_dim: int = 5, dim: int = 3, scale: float = 10.0):
        super().__init__()
        self.image = nn.Linear(in_dim, dim)
        self.text = nn.Linear(in_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, x_image, x_text) -> Outputs:
        return clip_outputs(F.normalize(self.image(x_image), dim=-1),
                            F.normalize(self.text(x_text), dim=-1), self.logit_scale.exp())


def case(n: int = 6, in_dim: int = 5, s_dim: int = 3, t_dim: int = 4, seed: int = 0):
    """(student module, raw inputs, teacher Outputs) with fixed random values."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = LinearClip(in_dim, s_dim)
    x_image, x_text = torch.randn(n, in_dim, generator=g), torch.randn(n, in_dim, generator=g)
    t_image = F.normalize(torch.randn(n, t_dim, generator=g), dim=-1)
    t_text = F.normalize(torch.randn(n, t_dim, generator=g), dim=-1)
    teacher = clip_outputs(t_image, t_text, torch.tensor(20.0))
    return student, (x_image, x_text), teacher


def built(distiller: Distiller, student: LinearClip, inputs, teacher: Outputs) -> Distiller:
    """``distiller`` after the probe-forward build the task performs."""
    with torch.no_grad():
        distiller.build(student(*inputs), teacher, DistillContext())
    return distiller


def assert_only_student_learns(student: LinearClip, distiller: Distiller, teacher: Outputs,
                               scale_learns: bool) -> None:
    """Both towers and every distiller parameter got a gradient; the teacher's tensors none;
    the student's logit scale got one exactly when the loss uses it."""
    for name, p in student.named_parameters():
        if name == "logit_scale":
            assert (p.grad is not None and p.grad.abs() > 0) == scale_learns, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"student {name} got no gradient"
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"distiller {name} got no gradient"
    for t in (teacher.embedding, *teacher.features.values()):
        assert not t.requires_grad and t.grad is None
