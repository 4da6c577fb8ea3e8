"""Config values that cannot be meant are refused before anything is built."""

import pytest

from kdkit.compose import compose
from kdkit.config_checks import config_problems
from kdkit.errors import KdkitError
from kdkit.pipeline import run


UNTRAINED = " (a stage that never trains would save and report an untrained model)"


@pytest.mark.parametrize("override, expected", [
    ("task.optimizer.lr=nan", "task.optimizer.lr=nan must be a finite number > 0"),
    ("task.optimizer.lr=-0.1", "task.optimizer.lr=-0.1 must be a finite number > 0"),
    ("task.optimizer.lr=inf", "task.optimizer.lr=inf must be a finite number > 0"),
    ("distiller.kd.weight=-1", "distiller.kd.weight=-1 must be a finite number > 0"),
    ("distiller.kd.weight=0", "distiller.kd.weight=0 must be a finite number > 0"),
    ("distiller.kd.temperature=0", "distiller.kd.temperature=0 must be a finite number > 0"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 must be >= 1" + UNTRAINED),
    ("teacher.max_epochs=0", "teacher.max_epochs=0 must be >= 1" + UNTRAINED),
    ("data.batch_size=0", "data.batch_size=0 must be a whole number >= 1"),
    ("data.eval_batch_size=-4", "data.eval_batch_size=-4 must be a whole number >= 1"),
    ("task.task_loss_weight=-0.5", "task.task_loss_weight=-0.5 must be a finite number >= 0"),
    ("+student.optimizer.lr=nan", "student.optimizer.lr=nan must be a finite number > 0"),
    ("teacher.labels_topk=0", "teacher.labels_topk=0 must be a whole number >= 1 or null"),
])
def test_each_impossible_value_is_named(tmp_path, override, expected):
    cfg = compose([override], output_dir=str(tmp_path))
    assert config_problems(cfg) == [expected]
    with pytest.raises(KdkitError) as err:
        run(cfg)
    assert str(err.value) == expected
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_several_problems_are_all_reported_in_one_line(tmp_path):
    cfg = compose(["trainer.max_epochs=0", "distiller.kd.weight=-1"], output_dir=str(tmp_path))
    with pytest.raises(KdkitError) as err:
        run(cfg)
    assert str(err.value) == ("trainer.max_epochs=0 must be >= 1" + UNTRAINED
                              + "; distiller.kd.weight=-1 must be a finite number > 0")


def test_defaults_and_every_experiment_pass(tmp_path):
    from pathlib import Path

    import kdkit.conf as conf

    experiments = sorted(p.stem for p in (Path(conf.__file__).parent / "experiment").glob("*.yaml"))
    assert experiments
    for name in [None, *experiments]:
        cfg = compose([f"experiment={name}"] if name else [], output_dir=str(tmp_path))
        assert config_problems(cfg) == [], name


def test_max_epochs_minus_one_is_fine_with_max_steps(tmp_path):
    cfg = compose(["trainer.max_epochs=-1", "+trainer.max_steps=20"], output_dir=str(tmp_path))
    assert config_problems(cfg) == []


@pytest.mark.parametrize("labels", ["teacher.labels=some.safetensors", "stages.teacher_labels=true"])
def test_a_teacher_cache_with_teacher_labels_is_refused(tmp_path, labels):
    cfg = compose(["teacher.cache=true", labels], output_dir=str(tmp_path))
    assert config_problems(cfg) == ["teacher.cache=True with teacher labels (teacher.labels or "
                                    "stages.teacher_labels): the labels file already holds every output; "
                                    "set teacher.cache=false"]
