import pytest
import torch

from kdkit.distillers.fitnet import FitNet
from kdkit.distillers.kd import KD, kd_loss
from kdkit.distillers.teacher_schedule import TeacherSchedule
from kdkit.errors import KdkitError

from .helpers import image_batch
from .multi import assert_only_student_and_distillers_learn, backward, multi_task


def test_current_teacher_by_epoch_and_by_step():
    d = TeacherSchedule(KD(), teachers=["a", "b", "c"], switch_at=[2, 5])
    seen = []
    for epoch in range(7):
        d.set_progress(epoch, 100 * epoch)
        seen.append(d.current())
    assert seen == ["a", "a", "b", "b", "b", "c", "c"]
    s = TeacherSchedule(KD(), teachers=["a", "b"], switch_at=[30], unit="step")
    s.set_progress(9, 29)
    assert s.current() == "a"
    s.set_progress(0, 30)
    assert s.current() == "b"


def test_only_the_current_teacher_runs_and_the_loss_is_kd_against_it():
    d = TeacherSchedule(KD(temperature=2.0), teachers=["t0", "t1"], switch_at=[1])
    task = multi_task({"prod": d})
    calls = {"t0": 0, "t1": 0}
    for name in calls:
        task.teachers[name].model.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    batch = image_batch(seed=5)
    for epoch, teacher in ((0, "t0"), (1, "t1")):
        d.set_progress(epoch, epoch)
        before = dict(calls)
        losses = backward(task, batch)
        assert calls[teacher] == before[teacher] + 1
        other = "t1" if teacher == "t0" else "t0"
        assert calls[other] == before[other]  # the other teacher never ran
        with torch.no_grad():
            expected = kd_loss(task.student_outputs(batch).logits, task.teacher_outputs(batch, teacher).logits, 2.0)
        assert losses["prod"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert_only_student_and_distillers_learn(task)


def test_training_step_sets_the_progress():
    d = TeacherSchedule(KD(), teachers=["t0", "t1"], switch_at=[3])
    task = multi_task({"prod": d})
    d.set_progress(5, 70)  # as if late in training: the step must reset it to the task's own
    assert d.current() == "t1"
    task.training_step(image_batch(), 0)  # no trainer: epoch 0, step 0
    assert d.progress == (0, 0) and d.current() == "t0"


def test_bad_schedules_are_refused():
    with pytest.raises(KdkitError, match="at least two"):
        TeacherSchedule(KD(), teachers=["a"], switch_at=[])
    with pytest.raises(KdkitError, match="increasing"):
        TeacherSchedule(KD(), teachers=["a", "b", "c"], switch_at=[5, 2])
    with pytest.raises(KdkitError, match="increasing"):
        TeacherSchedule(KD(), teachers=["a", "b"], switch_at=[1, 2])
    with pytest.raises(KdkitError, match="unit"):
        TeacherSchedule(KD(), teachers=["a", "b"], switch_at=[1], unit="hour")
    # FitNet on layer3: teachers of widths 6 and 8 give 24- and 32-channel maps
    fitnet = FitNet(student_feature="layer3", teacher_feature="layer3")
    with pytest.raises(KdkitError, match="adapters differ in shape"):
        multi_task({"prod": TeacherSchedule(fitnet, teachers=["t0", "t1"], switch_at=[1])})


def test_yaml_instantiates_with_its_inner_distiller():
    from omegaconf import OmegaConf

    from kdkit.teachers import build_distiller

    node = OmegaConf.load("conf/distiller/teacher_schedule.yaml").teacher_schedule
    node.teachers, node.switch_at = ["a", "b"], [4]
    d = build_distiller(node)
    assert isinstance(d, TeacherSchedule) and isinstance(d.inner, KD) and d.switch_at == [4]
