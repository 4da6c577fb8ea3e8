"""timm / torchvision factories and user models by _target_: weights from local checkpoints the
tests write themselves (no hub is reachable here), and one-line errors for bad input."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from kdkit.checkpoints import load_weights
from kdkit.errors import KdkitError
from kdkit.models import hub


def _perturbed_state(model) -> dict:
    """The model's state with every float tensor changed, so loading is visible."""
    g = torch.Generator().manual_seed(0)
    return {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in model.state_dict().items()}


def assert_same_state(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fmt", ["pt", "lightning", "safetensors"])
def test_timm_model_loads_local_checkpoint_through_timm(tmp_path, fmt):
    state = _perturbed_state(hub.timm_model("test_resnet", num_classes=7))
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state} if fmt == "lightning" else state, path)
    model = hub.timm_model("test_resnet", num_classes=7, checkpoint_path=path)
    assert_same_state(model, state)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_timm_model_errors(tmp_path):
    with pytest.raises(KdkitError, match="checkpoint_path not found: .*nope.pt"):
        hub.timm_model("test_resnet", num_classes=3, checkpoint_path=tmp_path / "nope.pt")
    with pytest.raises(KdkitError, match="unknown timm model 'resnet_18'.*resnet18"):
        hub.timm_model("resnet_18", num_classes=3)


def test_timm_pretrained_offline_says_to_use_a_local_file(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(KdkitError, match="could not fetch pretrained timm weights.*checkpoint_path"):
        hub.timm_model("resnet18", num_classes=10, pretrained=True)


def test_torchvision_model_loads_local_checkpoint(tmp_path):
    state = _perturbed_state(hub.torchvision_model("resnet18", num_classes=5))
    path = tmp_path / "tv.safetensors"
    save_file(state, str(path))
    model = hub.torchvision_model("resnet18", num_classes=5, checkpoint_path=path)
    assert_same_state(model, state)


def test_torchvision_model_errors(tmp_path):
    with pytest.raises(KdkitError, match="unknown torchvision model 'resnet_18'.*resnet18"):
        hub.torchvision_model("resnet_18", num_classes=3)
    with pytest.raises(KdkitError, match="unknown weights 'IMAGENET9'.*IMAGENET1K_V1"):
        hub.torchvision_model("resnet18", num_classes=3, weights="IMAGENET9")
    with pytest.raises(KdkitError, match="checkpoint_path not found: .*x.pt"):
        hub.torchvision_model("resnet18", num_classes=3, checkpoint_path=tmp_path / "x.pt")


def test_torchvision_hub_weights_get_a_head_of_the_data_size(monkeypatch):
    """With hub weights (1000 classes) and num_classes=10, the last Linear is replaced; the rest
    of the weights stay. The download itself is replaced by a local build."""
    import torchvision

    built = {}

    def fake_get_model(name, weights=None, **kwargs):
        torch.manual_seed(0)
        built["model"] = torchvision.models.mobilenet_v3_small(num_classes=1000)
        built["weights"] = weights
        return built["model"]

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    model = hub.torchvision_model("mobilenet_v3_small", num_classes=10, weights="DEFAULT")
    assert built["weights"] == torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    assert model.classifier[3].out_features == 10
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small(num_classes=1000)
    torch.testing.assert_close(model.features[0][0].weight, reference.features[0][0].weight)


def test_user_module_by_target_on_pythonpath(tmp_path, monkeypatch):
    """Any nn.Module class importable from PYTHONPATH works as teacher/student `_target_`."""
    (tmp_path / "my_nets_for_kdkit_test.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self, num_classes, width=4):
                super().__init__()
                self.body = nn.Conv2d(3, width, 3, padding=1)
                self.head = nn.Linear(width, num_classes)

            def forward(self, x):
                return self.head(self.body(x).mean(dim=(2, 3)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_nets_for_kdkit_test", raising=False)
    model = instantiate({"_target_": "my_nets_for_kdkit_test.Tiny", "num_classes": 6, "width": 5})
    assert type(model).__name__ == "Tiny" and model.head.in_features == 5
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 6)
    # and its trained weights come back through the teacher.ckpt_path loader
    state = _perturbed_state(model)
    torch.save({"state_dict": {f"student.{k}": v for k, v in state.items()}}, tmp_path / "t.ckpt")
    assert_same_state(load_weights(model, tmp_path / "t.ckpt"), state)

