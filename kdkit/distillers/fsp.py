"""Flow of solution procedure: match the Gram matrices between consecutive layers' maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdkit.distillers.ab import check_epochs, stage_scale
from kdkit.distillers.base import DistillContext, Distiller, feature
from kdkit.distillers.map_pairs import pool_to_smaller
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

# The stem's output (= the input of layer1) and the three stage outputs of kdkit's CIFAR ResNets:
# RepDistiller's feat[:-1], so that the FSP matrices span each stage's input and output.
DEFAULT_LAYERS = ("layer1:input", "layer1", "layer2", "layer3")


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """``G[b, i, j] = (1 / (h w)) sum_{x, y} bottom[b, i, x, y] * top[b, j, x, y]``: ``[B, C1, C2]``.

    The map with the larger spatial size is first average-pooled to the other's."""
    bottom, top = pool_to_smaller(bottom, top)
    b1, b2 = bottom.float().flatten(2), top.float().flatten(2)
    with torch.autocast(b1.device.type, enabled=False):
        return b1 @ b2.transpose(1, 2) / b1.shape[-1]


def _names(layers, who: str) -> list[str]:
    if isinstance(layers, str) or len(layers) < 2:
        raise KdkitError(f"{who}: give a list of at least two modules (an FSP matrix spans two "
                         f"consecutive ones), got {layers!r}")
    return [str(name) for name in layers]


class FSP(Distiller):
    """Flow of Solution Procedure (Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast
    Optimization, Network Minimization and Transfer Learning", CVPR 2017).

        G_{i,j}(x; W) = sum_{s=1..h} sum_{t=1..w} F1_{s,t,i}(x; W) F2_{s,t,j}(x; W) / (h w)
        L_FSP = (1/N) sum_x sum_k lambda_k || G_k^T(x) - G_k^S(x) ||_2^2

    between the maps ``F1``, ``F2`` of consecutive ``layers`` (k = 1..len(layers)-1), with equal
    ``lambda_k = 1``. Like RepDistiller, each squared difference is averaged over the matrix
    entries as well as the batch (the paper sums over the entries), and a spatial mismatch
    between ``F1`` and ``F2`` is resolved by average-pooling the larger map.

    The student's and the teacher's FSP matrices are compared entry by entry, so each of their
    layers needs the same channel count (as in the paper and RepDistiller, which raises
    otherwise): no adapter is learned, since one would change the student's flow that FSP
    transfers. ``build`` checks this and fails with a clear error. kdkit's CIFAR ResNets of one
    family (resnet8/20/56: 16-16-32-64; resnet8x4/32x4) have equal widths.

    The paper transfers in a first stage (minimising L_FSP alone) and trains on the task in a
    second; RepDistiller does the same with 30 initial epochs. kdkit trains in one stage: the
    loss is added to the task loss during the first ``epochs`` epochs and multiplied by 0
    afterwards. Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller's initialisation stage: 1).
        layers: student modules whose outputs are the maps, in forward order.
        teacher_layers: the teacher's modules, one per entry of ``layers``; None: the same names.
        epochs: apply the loss during the first this many epochs (RepDistiller's
            ``init_epochs``: 30); null: throughout training.
    """

    def __init__(self, weight: float = 1.0, layers: Sequence[str] = DEFAULT_LAYERS,
                 teacher_layers: Sequence[str] | None = None, epochs: int | None = 30):
        super().__init__(weight)
        self.layers = _names(layers, "fsp.layers")
        self.teacher_layers = self.layers if teacher_layers is None else _names(teacher_layers, "fsp.teacher_layers")
        if len(self.teacher_layers) != len(self.layers):
            raise KdkitError(f"fsp.teacher_layers has {len(self.teacher_layers)} modules but "
                             f"fsp.layers has {len(self.layers)}: give one teacher module per student module")
        self.epochs = check_epochs(epochs, "fsp")

    @property
    def student_features(self) -> list[str]:
        return list(self.layers)

    @property
    def teacher_features(self) -> list[str]:
        return list(self.teacher_layers)

    def _matrices(self, outputs: Outputs, names: list[str], role: str) -> list[Tensor]:
        maps = [feature(outputs, name, "fsp") for name in names]
        for name, f in zip(names, maps):
            if f.dim() != 4:
                raise KdkitError(f"fsp: {role} feature {name!r} must be a map [B, C, H, W], "
                                 f"got shape {tuple(f.shape[1:])}")
        return [fsp_matrix(a, b) for a, b in zip(maps, maps[1:])]

    def _compare(self, student: Outputs, teacher: Outputs) -> list[tuple[Tensor, Tensor]]:
        pairs = list(zip(self._matrices(student, self.layers, "student"),
                         self._matrices(teacher, self.teacher_layers, "teacher")))
        for k, (g_s, g_t) in enumerate(pairs):
            if g_s.shape[1:] != g_t.shape[1:]:
                raise KdkitError(
                    f"fsp: the FSP matrix of [{self.layers[k]}, {self.layers[k + 1]}] is "
                    f"{g_s.shape[1]}x{g_s.shape[2]} for the student but {g_t.shape[1]}x{g_t.shape[2]} "
                    f"for the teacher; FSP needs equal channel counts per layer (choose layers "
                    f"of equal widths)")
        return pairs

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        self._compare(student, teacher)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        total = sum((g_s - g_t).pow(2).mean() for g_s, g_t in self._compare(student, teacher))
        return {"loss": stage_scale(self.progress, self.epochs) * total}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, layers={self.layers}, teacher_layers={self.teacher_layers}, "
                f"epochs={self.epochs}")
