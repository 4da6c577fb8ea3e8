"""Mixup / CutMix batches in the tasks: the soft-label task loss against its formula, whole runs
on mixed batches, and the refusals of everything that needs one sample or one class per row."""

import functools
from types import SimpleNamespace

import pytest
import torch

from kdkit.datamodules.digits import DigitsDataModule
from kdkit.distillers.dkd import DKD
from kdkit.distillers.kd import KD
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import TinyNet

MIXED = SimpleNamespace(mixes_samples=True, has_unlabeled=False)


def test_soft_label_loss_is_the_cross_entropy_against_the_smoothed_mixture():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [1.0, 0.0, 0.0], [0.2, 0.0, 0.8]])
    eps = 0.1
    task = ClassificationTask(TinyNet(), num_classes=3, label_smoothing=eps,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    loss = task.task_loss(Outputs(logits=logits), {"label": soft})
    target = (1 - eps) * soft + eps / 3
    by_hand = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, by_hand)


def test_the_digits_loader_serves_soft_labels_and_a_plain_eval_split():
    dm = DigitsDataModule(mixup_alpha=0.8, cutmix_alpha=1.0, batch_size=32)
    dm.setup("fit")
    assert dm.mixes_samples and not dm.static_for_teacher
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].shape == (32, 10) and batch["label"].dtype == torch.float32
    torch.testing.assert_close(batch["label"].sum(1), torch.ones(32))
    assert batch["label"].max(1).values.min() < 1  # mixed, not one-hot
    val = next(iter(dm.val_dataloader()))
    assert val["label"].dtype == torch.long and val["label"].dim() == 1


def test_a_run_trains_every_stage_on_mixed_batches(compose_run):
    # digits' yaml has no mixing keys (its images are 8x8 digits), hence the "+"
    cfg, results = compose_run("experiment=digits_demo", "+data.mixup_alpha=0.8", "+data.cutmix_alpha=1.0",
                               "distiller=[kd]")
    assert set(results) >= {"teacher", "student"}
    for stage, metrics in results.items():
        assert all(v == v for v in metrics.values() if isinstance(v, float)), f"NaN in {stage}"


def test_deits_whole_recipe_runs_on_cifar(compose_run, data_dir):
    """DeiT's strong augmentation (RandAugment, erasing, Mixup and CutMix) on the DeiT experiment,
    hard distillation token included (its teacher argmax is of the mixed image)."""
    cfg, results = compose_run("experiment=cifar10_deit", "data.train_limit=256", "data.val_size=32",
                               "data.batch_size=32", "data.eval_batch_size=64", "teacher.max_epochs=1",
                               "data.randaugment_ops=2", "data.random_erasing=0.25", "data.mixup_alpha=0.8",
                               "data.cutmix_alpha=1.0")
    assert set(results) >= {"teacher", "student"}
    for stage, metrics in results.items():
        assert all(v == v for v in metrics.values() if isinstance(v, float)), f"NaN in {stage}"


def test_distillers_reading_the_class_are_refused_but_soft_label_readers_are_not():
    task = ClassificationTask(TinyNet(), TinyNet(), distillers={"kd": KD(), "dkd": DKD()}, num_classes=3)
    with pytest.raises(KdkitError, match=r"distillers \['dkd'\] read each row's class"):
        task.check_data(MIXED)
    from kdkit.distillers.crd import CRD

    with pytest.raises(KdkitError, match=r"distillers \['crd'\] keep a memory row per training sample"):
        ClassificationTask(TinyNet(), TinyNet(), distillers={"crd": CRD()}, num_classes=3).check_data(MIXED)
    soft_reader = DKD()
    soft_reader.handles_soft_labels = True
    ClassificationTask(TinyNet(), TinyNet(), distillers={"dkd": soft_reader}, num_classes=3).check_data(MIXED)


def test_transfer_options_and_mixing_are_refused_together():
    with pytest.raises(KdkitError, match="transfer options leave samples without one"):
        DigitsDataModule(labeled_fraction=0.2, mixup_alpha=0.8)


def test_per_sample_machinery_is_refused_on_mixed_rows():
    from kdkit.cache import build_teacher_cache
    from kdkit.compose import compose
    from kdkit.label_stage import check_label_files
    from kdkit.selection.augment_select import AugmentSelect
    from kdkit.selection.teacher_budget import TeacherBudget

    dm = DigitsDataModule(mixup_alpha=0.8)
    with pytest.raises(KdkitError, match="teacher_budget buys teacher outputs per sample"):
        TeacherBudget().check_data(dm)
    with pytest.raises(KdkitError, match="mixup_alpha or cutmix_alpha"):
        AugmentSelect().check_data(dm)
    cfg = compose(["experiment=digits_demo", "teacher.cache=true", "teacher.labels=x.safetensors"])
    with pytest.raises(KdkitError, match="random augmentation to the teacher's input"):
        build_teacher_cache(cfg, TinyNet(), dm)
    with pytest.raises(KdkitError, match="teacher labels hold one output per sample"):
        check_label_files(cfg, dm, {"teacher": (None, False)}, {"teacher": cfg.teacher})
