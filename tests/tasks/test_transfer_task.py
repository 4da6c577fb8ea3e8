"""Transfer data in the classification task: the task loss never sees a dropped label, and
distillers that read labels are refused before anything trains."""

import functools

import pytest
import torch
import torch.nn.functional as F

from kdkit.datamodules.digits import DigitsDataModule
from kdkit.distillers.dkd import DKD
from kdkit.distillers.kd import KD
from kdkit.errors import KdkitError
from kdkit.labels import UNLABELED
from kdkit.outputs import Outputs
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import TinyNet


def _task(**kwargs):
    return ClassificationTask(TinyNet(), num_classes=3, optimizer=functools.partial(torch.optim.SGD, lr=0.1), **kwargs)


def test_task_loss_averages_over_labelled_rows_and_ignores_the_others():
    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([2, UNLABELED, 0, UNLABELED, 1])
    loss = _task().task_loss(Outputs(logits=logits), {"label": labels})
    by_hand = -sum(torch.log_softmax(logits[i], 0)[labels[i]] for i in (0, 2, 4)) / 3
    assert torch.allclose(loss, by_hand)
    loss.backward()
    assert torch.count_nonzero(logits.grad[[1, 3]]) == 0  # an unlabelled row gets no task gradient
    assert torch.count_nonzero(logits.grad[[0, 2, 4]]) == 9


def test_task_loss_is_zero_without_labels_and_unchanged_with_all_of_them():
    logits = torch.randn(4, 3, requires_grad=True)
    none = _task().task_loss(Outputs(logits=logits), {"label": torch.full((4,), UNLABELED)})
    assert none.item() == 0.0 and none.requires_grad
    labels = torch.tensor([0, 1, 2, 1])
    task = _task(label_smoothing=0.1)
    assert torch.allclose(task.task_loss(Outputs(logits=logits), {"label": labels}),
                          F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_a_distiller_reading_labels_is_refused_on_transfer_data():
    dm = DigitsDataModule(labeled_fraction=0.2)
    dm.setup("fit")
    dm.use_train_view("transfer")
    task = ClassificationTask(TinyNet(in_channels=1, num_classes=10), TinyNet(in_channels=1, num_classes=10),
                              distillers={"kd": KD(), "dkd": DKD()}, num_classes=10)
    with pytest.raises(KdkitError, match=r"distillers \['dkd'\] read each sample's label"):
        task.probe(dm)
    dm.use_train_view("labeled")  # every row labelled: allowed
    task.probe(dm)
