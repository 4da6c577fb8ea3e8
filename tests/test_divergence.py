"""A diverging stage stops at once with one line, and saves nothing non-finite."""

import pytest
import torch
from torch import nn

from kdkit.divergence import DivergenceError, LossWatch, check_finite, nonfinite_parameters


def test_loss_watch_names_the_step_and_the_bad_term():
    losses = {"task": torch.tensor(0.7), "kd": torch.tensor(float("nan")), "fitnet": torch.tensor(1.0)}
    total = sum(losses.values())
    with pytest.raises(DivergenceError, match=r"diverged at step 12: loss term kd=nan is not finite"):
        LossWatch().check(12, losses, total, due=False)  # on the CPU every step is checked
    LossWatch().check(13, {"task": torch.tensor(0.7)}, torch.tensor(0.7), due=False)  # finite: silent


def test_nonfinite_weights_are_named_and_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    model[1].running_mean.fill_(float("nan"))
    assert nonfinite_parameters(model) == ["0.weight", "1.running_mean"]
    with pytest.raises(DivergenceError, match=r"the teacher has non-finite weights \(0.weight, 1.running_mean\)"):
        check_finite(model, "the teacher")


@pytest.mark.parametrize("lr", ["1e6", "1e30"])
def test_a_diverging_stage_stops_and_saves_nothing(compose_run, tmp_path, lr):
    with pytest.raises(DivergenceError) as err:
        compose_run("callbacks=default", "~callbacks.progress_bar", f"task.optimizer.lr={lr}",
                    "trainer.max_epochs=3", "trainer.limit_train_batches=6")
    message = str(err.value)
    assert message.startswith("stage 'teacher' diverged at step ") and "\n" not in message
    out = tmp_path / "run"
    assert not (out / "teacher.pt").exists() and not (out / "results.json").exists()
    for ckpt in out.rglob("*.ckpt"):  # any checkpoint written before the divergence is finite
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt
