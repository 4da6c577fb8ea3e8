"""Stop a diverging stage at once, and never save what it produced.

A NaN or infinite loss (``lr=1e6``, ``lr=nan``, a broken distiller) used to train on silently:
NaN weights were checkpointed, saved as ``teacher.pt``/``student.pt`` and reported at chance
accuracy with exit code 0. ``LossWatch`` checks the step's loss terms and raises
``DivergenceError`` naming the step and the term; ``check_finite`` refuses to save a model with
non-finite parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError


class DivergenceError(KdkitError):
    """A stage produced a non-finite loss or non-finite weights."""


class LossWatch:
    """Checks each step's loss terms for NaN / inf.

    On the CPU a check costs nothing and runs every step. On an accelerator it needs a host
    sync, so it runs on the steps Lightning logs (``log_every_n_steps``) and at every epoch end
    through ``check_finite``: a divergence is caught within that many steps, before any
    checkpoint is written.
    """

    def check(self, step: int, losses: Mapping[str, Tensor], total: Tensor, due: bool) -> None:
        if total.device.type != "cpu" and not due:
            return
        if bool(torch.isfinite(total.detach())):
            return
        bad = [f"{name}={float(value.detach()):g}" for name, value in losses.items()
               if not bool(torch.isfinite(value.detach()))]
        raise DivergenceError(
            f"diverged at step {step}: loss term {', '.join(bad) or f'total={float(total):g}'} is "
            "not finite (lower the learning rate or the distiller weights; nothing was saved)")


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that hold a NaN or an inf, and of its buffers that
    hold a NaN (buffers may hold -inf by design, e.g. causal attention masks)."""
    bad = [name for name, t in module.named_parameters() if not bool(torch.isfinite(t).all())]
    return bad + [name for name, t in module.named_buffers()
                  if t.is_floating_point() and bool(torch.isnan(t).any())]


def check_finite(module: nn.Module, what: str) -> None:
    """Raise DivergenceError when ``module`` has non-finite weights (before saving it)."""
    bad = nonfinite_parameters(module)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DivergenceError(f"{what} has non-finite weights ({', '.join(bad[:3])}{more}); "
                              "refusing to save it (lower the learning rate)")
