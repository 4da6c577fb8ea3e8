"""Each selection policy composed by config runs a whole (smoke) kdkit run and reports its facts."""

import pytest

from kdkit.errors import KdkitError


def test_teacher_budget_on_transfer_data_reports_what_it_bought(compose_run):
    _, results = compose_run("data.labeled_fraction=0.2", "stages.baseline=false", "selection=[teacher_budget]",
                             "selection.teacher_budget.fraction=0.5", "selection.teacher_budget.rounds=1")
    student = results["student"]
    n = student["train_samples"]
    assert student["selection/teacher_budget/samples_bought"] == round(0.5 * n)
    assert 0 < student["selection/teacher_budget/teacher_forwards"] <= 2 * 64  # 2 smoke batches of 64


def test_batch_select_trains_on_the_kept_half_of_each_super_batch(compose_run):
    _, results = compose_run("stages.baseline=false", "selection=[batch_select]", "data.batch_size=32")
    student = results["student"]
    assert student["selection/batch_select/rows_scored"] == 2 * 32
    assert student["selection/batch_select/rows_kept"] == 2 * 16


def test_augment_select_composes_with_a_distiller_and_counts_its_teacher_forwards(compose_run):
    _, results = compose_run("stages.baseline=false", "selection=[augment_select]", "data.batch_size=16",
                             "selection.augment_select.candidates=3", "selection.augment_select.padding=1")
    assert results["student"]["selection/augment_select/teacher_forwards"] == 2 * 3 * 16


def test_augment_select_refuses_augmented_loaders_before_anything_trains(compose_run, tmp_path, monkeypatch):
    from kdkit.datamodules.digits import DigitsDataModule

    plain_init = DigitsDataModule.__init__

    def augmenting(self, *args, **kwargs):  # digits has no augmentation option to switch on
        plain_init(self, *args, **kwargs)
        self.augment = True

    monkeypatch.setattr(DigitsDataModule, "__init__", augmenting)
    with pytest.raises(KdkitError, match="data.augment=false"):
        compose_run("selection=[augment_select]")
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_batch_select_scores_image_text_pairs_on_the_clip_experiment(compose_run, data_dir):
    _, results = compose_run("experiment=cifar10_clip", "selection=[batch_select]", "teacher.max_epochs=1",
                             "stages.baseline=false")
    student = results["student"]
    assert student["selection/batch_select/rows_kept"] * 2 == student["selection/batch_select/rows_scored"] > 0
    assert 0.0 <= student["test/zeroshot_acc"] <= 1.0
