"""Mixed precision for teacher and student, a teacher in lower precision than the student, and
the channels_last / torch.compile switches: each runs a few real training steps on the CPU."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch

from kdkit.distillers.fitnet import FitNet
from kdkit.distillers.kd import KD
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import TinyNet
from tests.test_cache import TinyImages


class DtypeSpy(ClassificationTask):
    """Records the dtypes of the outputs each model produced in the training steps."""

    seen: list

    def losses(self, batch):
        student = self.student_outputs(batch)
        teacher = self.teacher_outputs(batch)
        self.seen.append((student.logits.dtype, teacher.logits.dtype))
        return super().losses(batch)


def make_task(cls=ClassificationTask, **kwargs):
    torch.manual_seed(0)
    distillers = {"kd": KD(temperature=2.0),
                  "fitnet": FitNet(weight=1.0, student_feature="conv", teacher_feature="conv")}
    task = cls(TinyNet(width=4), TinyNet(width=8), distillers=distillers, num_classes=3, mean=(0.5,),
               std=(0.25,), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)
    task.seen = []
    return task


def fit(task, precision="32-true", steps=3):
    before = {k: v.clone() for k, v in task.student.state_dict().items()}
    L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0).fit(task, datamodule=TinyImages())
    after = task.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert all(p.dtype == torch.float32 for p in task.parameters())  # master weights stay fp32


def test_bf16_mixed_runs_teacher_and_student_in_bf16():
    task = make_task(DtypeSpy)
    fit(task, precision="bf16-mixed")
    assert task.seen and set(task.seen) == {(torch.bfloat16, torch.bfloat16)}


def test_teacher_in_bf16_with_an_fp32_student():
    task = make_task(DtypeSpy, teacher_precision="bf16")
    fit(task)
    assert set(task.seen) == {(torch.float32, torch.bfloat16)}
    batch = TinyImages().example_batch(n=8)
    with torch.no_grad():
        low = task.teacher_outputs(batch).logits.float()
        full = task.teacher.model(task.model_input(batch, "teacher"))
    assert not torch.equal(low, full)  # really computed in bf16 ...
    torch.testing.assert_close(low, full, rtol=3e-2, atol=3e-2)  # ... and close to fp32


def test_fp16_mixed_on_cpu_falls_back_to_bf16():
    """16-mixed needs a GPU (GradScaler); on the CPU Lightning warns and runs bf16-mixed. No GPU
    is lent to this project's tests: recorded in benchmarks/results/scale.md."""
    task = make_task(DtypeSpy)
    with pytest.warns(UserWarning, match="not supported on CPU"):
        fit(task, precision="16-mixed")
    assert set(task.seen) == {(torch.bfloat16, torch.bfloat16)}


def test_teacher_in_fp16_with_an_fp32_student():
    task = make_task(DtypeSpy, teacher_precision="16")
    fit(task)
    assert set(task.seen) == {(torch.float32, torch.float16)}


def test_channels_last_trains():
    task = make_task(channels_last=True)
    conv = task.student.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert task.teacher.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = task.model_input({"image": torch.rand(2, 3, 8, 8)}, "student")  # 3 channels: layouts differ
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fit(task)


def test_compile_plumbing_with_the_eager_backend(monkeypatch):
    """Dynamo traces the student (no C++ code generation: fast); the inductor run is slow."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
    task = make_task(compile=True)
    assert type(task._student_forward).__name__ == "OptimizedModule"
    assert not any(k.startswith("_student_forward") or "_orig_mod" in k for k in task.state_dict())
    fit(task, steps=2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compile_with_inductor_trains():
    task = make_task(compile=True)
    fit(task, steps=2)


def test_precision_switches_through_the_config(compose_run):
    _, results = compose_run("trainer.precision=bf16-mixed", "teacher.precision=bf16",
                             "task.channels_last=true", "stages.baseline=false")
    assert list(results) == ["teacher", "student"]
    assert all(0 <= r["test/acc"] <= 1 for r in results.values())
