"""Demo networks: shapes, module names, and the digits teacher/student accuracies they promise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdkit.features import FeatureTap
from kdkit.models.small import MLP, ConvNet


def test_mlp_layers_and_names():
    model = MLP(in_features=64, hidden=[32, 16], num_classes=10, dropout=0.0)
    names = {n for n, _ in model.named_modules()}
    assert {"flatten", "hidden.0", "hidden.1", "fc"} <= names
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [32, 16, 10]
    tap = FeatureTap(model, ["hidden.0", "hidden.1", "fc:input"])
    x = torch.rand(5, 1, 8, 8)
    logits = model(x)
    f = tap.pop()
    assert logits.shape == (5, 10)
    lin0 = model.hidden[0][0]
    torch.testing.assert_close(f["hidden.0"], torch.relu(x.flatten(1) @ lin0.weight.T + lin0.bias))
    torch.testing.assert_close(f["fc:input"], f["hidden.1"])


def test_mlp_without_hidden_layers_is_logistic_regression():
    model = MLP(in_features=12, hidden=[], num_classes=3)
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), x @ model.fc.weight.T + model.fc.bias)


def test_mlp_dropout_in_training_only():
    model = MLP(16, [64], 4, dropout=0.5)
    x = torch.randn(8, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_convnet_stages_halve_resolution_except_the_last():
    model = ConvNet(in_channels=1, channels=[8, 16, 32], num_classes=10).eval()
    tap = FeatureTap(model, ["layer1", "layer2", "layer3", "fc:input"])
    logits = model(torch.rand(3, 1, 8, 8))
    f = tap.pop()
    assert logits.shape == (3, 10)
    shapes = [tuple(f[k].shape) for k in ("layer1", "layer2", "layer3")]
    assert shapes == [(3, 8, 4, 4), (3, 16, 2, 2), (3, 32, 2, 2)]
    torch.testing.assert_close(f["fc:input"], f["layer3"].mean(dim=(2, 3)))


def test_convnet_needs_a_stage():
    with pytest.raises(ValueError):
        ConvNet(1, [], 10)


def _train_and_test(model, dm, epochs: int, lr: float) -> float:
    """AdamW + one-cycle schedule on the digits train split; test-split accuracy."""
    mean, std = dm.mean[0], dm.std[0]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    loader = dm.train_dataloader()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = F.cross_entropy(model((batch["image"] - mean) / std), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            correct += (model((batch["image"] - mean) / std).argmax(1) == batch["label"]).sum().item()
    return correct / len(dm.test_set)


@pytest.fixture(scope="module")
def digits():
    from kdkit.datamodules.digits import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, mean=[0.3055], std=[0.3761])
    dm.setup()
    return dm


@pytest.mark.slow  # ~10 s of CPU training
def test_digits_teacher_and_student_accuracy(digits):
    """The demo's promise: the CNN teacher of conf/teacher/digits_cnn.yaml reaches ~98% on the
    359 test digits, the MLP student of conf/student/digits_mlp.yaml clearly less on its own."""
    torch.manual_seed(0)
    teacher_acc = _train_and_test(ConvNet(1, [32, 64, 128], 10), digits, epochs=15, lr=1e-2)
    torch.manual_seed(0)
    student_acc = _train_and_test(MLP(64, [32], 10), digits, epochs=15, lr=1e-2)
    assert teacher_acc >= 0.975, teacher_acc
    assert 0.90 <= student_acc < teacher_acc, (student_acc, teacher_acc)
