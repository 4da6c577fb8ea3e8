"""The contract every distiller follows."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


@dataclass
class DistillContext:
    """What a distiller may need to know when it builds itself (after a probe forward).

    Args:
        num_samples: size of the training set (memory banks over dataset indices, e.g. CRD).
        num_classes: number of classes, when the task has them.
    """

    num_samples: int | None = None
    num_classes: int | None = None


class Distiller(nn.Module):
    """Base class: named, weighted loss terms between student and teacher ``Outputs``.

    A subclass declares what it reads (``student_features`` / ``teacher_features`` module
    names; ``logits`` and ``embedding`` are always there when the task produces them), may build
    adapters in ``build`` from the shapes of a probe forward, and returns a dict of *unweighted*
    loss terms from ``forward``. The task multiplies every term by ``weight``, sums and logs
    each as ``train/loss/<distiller>/<term>``.

    Args:
        weight: multiplier for every loss term of this distiller.
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    @property
    def student_features(self) -> list[str]:
        return []

    @property
    def teacher_features(self) -> list[str]:
        return []

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        """Create adapters now that the output shapes are known. Default: nothing to build."""

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def require(outputs: Outputs, field: str, who: str) -> Tensor:
    """``outputs.<field>`` or a clear error naming the distiller that needed it."""
    value = getattr(outputs, field)
    if value is None:
        raise KdkitError(f"{who} needs '{field}' but this task does not produce it")
    return value


def feature(outputs: Outputs, name: str, who: str) -> Tensor:
    try:
        return outputs.features[name]
    except KeyError:
        raise KdkitError(f"{who} needs feature {name!r}, which was not captured") from None


def check_same_shape(student: Tensor, teacher: Tensor, who: str, hint: str = "") -> None:
    if student.shape[1:] != teacher.shape[1:]:
        raise KdkitError(
            f"{who}: student shape {tuple(student.shape[1:])} does not match teacher shape "
            f"{tuple(teacher.shape[1:])}{hint}"
        )
