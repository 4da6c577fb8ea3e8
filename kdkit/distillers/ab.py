"""Activation-boundary distillation: the student's neurons should switch on and off where the
teacher's do."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.adapters import make_adapter
from kdkit.distillers.at import parse_pairs
from kdkit.distillers.base import DistillContext, check_same_shape
from kdkit.distillers.map_pairs import MapPairs, paired_maps
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

# Pre-activation stage outputs (the input of the last block's final ReLU) of kdkit's CIFAR
# ResNets, for the resnet8 student and the resnet20 teacher of cifar10_resnet20_resnet8.
DEFAULT_PAIRS = tuple((f"layer{k}.0.relu2:input", f"layer{k}.2.relu2:input") for k in (1, 2, 3))
_NO_ADAPTER_HINT = " (set adapter: true to learn a connector)"


def check_epochs(epochs, who: str) -> int | None:
    """``epochs`` as a whole number >= 1, or None; a clear error otherwise."""
    if epochs is None:
        return None
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1:
        raise KdkitError(f"{who}.epochs must be a whole number >= 1 or null, got {epochs!r}")
    return int(epochs)


def stage_scale(progress: tuple[int, int], epochs: int | None) -> float:
    """1 while the epoch in ``progress`` is below ``epochs`` (or always, for None), then 0.

    The loss is multiplied by it rather than skipped, so that the adapters still take part in
    the graph (DDP without ``find_unused_parameters`` requires every parameter to)."""
    return 1.0 if epochs is None or progress[0] < epochs else 0.0


def boundary_loss(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """``(1/B) sum rho(m - s)^2 [t > 0] + rho(m + s)^2 [t <= 0]`` over all elements, ``rho = relu``."""
    s = source.float()
    active = target.float() > 0
    per_neuron = torch.where(active, F.relu(margin - s), F.relu(margin + s)).pow(2)
    return per_neuron.sum() / s.shape[0]


class AB(MapPairs):
    """Activation Boundaries (Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of
    Activation Boundaries Formed by Hidden Neurons", AAAI 2019).

    With ``T`` the teacher's pre-ReLU map, ``S`` the student's and ``r`` a connector (1x1 conv
    + BN), the paper's alternative (differentiable) loss is

        L(I) = || rho(mu 1 - r(S)) * 1[T > 0] + rho(mu 1 + r(S)) * 1[T <= 0] ||_2^2,  rho = ReLU

    a hinge on the sign of every teacher neuron with margin ``mu``. Like the authors' code (and
    RepDistiller's ``ABLoss``), the squared norms are averaged over the batch and the ``n`` pairs
    are weighted ``2^(j - n + 1)`` for ``j = 0..n-1`` (1/4, 1/2, 1: the deepest weighs most);
    the authors' extra factor 3/1000 is the default ``weight: 0.003``.

    Pre-ReLU maps: kdkit taps module outputs and inputs, and every ReLU of its CIFAR ResNets is
    its own module, so ``layerK.<last block>.relu2:input`` is the pre-activation output of stage
    ``K`` (RepDistiller's ``preact=True`` features); the yaml names them for the resnet8
    student and resnet20 teacher (``layerK.0`` / ``layerK.2``; resnet56: ``layerK.8``). Other
    networks need their own names; post-ReLU maps would lose the negative side on which the
    hinge acts.

    The paper transfers in an initialisation stage (RepDistiller: 30 epochs on the AB loss
    alone, then classification only). kdkit trains in one stage: the loss is added to the task
    loss during the first ``epochs`` epochs and multiplied by 0 afterwards. Returns the single
    term ``"loss"``.

    Args:
        weight: multiplier of the loss (the authors' code and RepDistiller: 3/1000).
        pairs: ``[[student_module, teacher_module], ...]`` of pre-ReLU maps, shallow to deep.
        margin: ``mu`` (the paper and RepDistiller: 1).
        adapter: learn the connector ``r`` per pair (1x1 conv + BN, resizing the student map);
            false compares the maps as they are, which requires equal shapes.
        epochs: apply the loss during the first this many epochs (RepDistiller's
            ``init_epochs``: 30); null: throughout training.
    """

    def __init__(self, weight: float = 0.003, pairs: Sequence = DEFAULT_PAIRS, margin: float = 1.0,
                 adapter: bool = True, epochs: int | None = 30):
        super().__init__(weight)
        self.pairs = parse_pairs(pairs, "ab")
        if not margin >= 0:
            raise KdkitError(f"ab.margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.use_adapter = bool(adapter)
        self.epochs = check_epochs(epochs, "ab")
        self.adapters: nn.ModuleList | None = None

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        adapters = []
        for s, t in paired_maps(student, teacher, self.pairs, "ab"):
            if self.use_adapter:
                adapters.append(make_adapter(s.shape, t.shape, "ab").to(s.device))
            else:
                check_same_shape(s, t, "ab", _NO_ADAPTER_HINT)
        self.adapters = nn.ModuleList(adapters) if self.use_adapter else None

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self.use_adapter and self.adapters is None:
            raise RuntimeError("ab: build() must run (on a probe forward) before forward()")
        n = len(self.pairs)
        total = 0.0
        for j, (s, t) in enumerate(paired_maps(student, teacher, self.pairs, "ab")):
            if self.adapters is not None:
                s = self.adapters[j](s, t.shape[2:])
            check_same_shape(s, t, "ab", _NO_ADAPTER_HINT)
            total = total + 2.0 ** (j - n + 1) * boundary_loss(s, t, self.margin)
        return {"loss": stage_scale(self.progress, self.epochs) * total}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, pairs={self.pairs}, margin={self.margin}, "
                f"adapter={self.use_adapter}, epochs={self.epochs}")
