"""kdkit.checkpoints.load_weights: every checkpoint format it promises, and its errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from kdkit.checkpoints import load_weights, read_state_dict
from kdkit.errors import KdkitError


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).eval()


@pytest.fixture
def trained():
    model = net(1)
    model(torch.rand(1, 3, 5, 5))  # materialise the lazy layer
    model[1].running_mean.fill_(0.25)  # buffers travel too
    return model


def expect_equal(model, reference):
    ref = reference.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def fresh():
    model = net(2)
    model(torch.rand(1, 3, 5, 5))
    return model


def test_bare_state_dict(tmp_path, trained):
    torch.save(trained.state_dict(), tmp_path / "student.pt")
    expect_equal(load_weights(fresh(), tmp_path / "student.pt"), trained)


def test_lightning_checkpoint_keeps_student_and_drops_adapters(tmp_path, trained):
    state = {f"student.{k}": v for k, v in trained.state_dict().items()}
    state["distillers.fitnet.adapter.weight"] = torch.ones(3)
    ckpt = {
        "state_dict": state, "epoch": 3, "global_step": 30,
        # what save_hyperparameters() leaves in a checkpoint: not loadable with weights_only
        "hyper_parameters": {"cfg": OmegaConf.create({"lr": 0.1})},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.raises(pickle.UnpicklingError):  # so the fallback is really exercised
        torch.load(tmp_path / "last.ckpt", weights_only=True)
    expect_equal(load_weights(fresh(), tmp_path / "last.ckpt"), trained)


def test_safetensors_and_ddp_prefix(tmp_path, trained):
    save_file({f"module.{k}": v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    expect_equal(load_weights(fresh(), tmp_path / "w.safetensors"), trained)


def test_pickled_module_and_model_key(tmp_path, trained):
    torch.save(trained, tmp_path / "whole.pt")
    expect_equal(load_weights(fresh(), tmp_path / "whole.pt"), trained)
    torch.save({"model": trained.state_dict()}, tmp_path / "wrapped.pth")
    assert read_state_dict(tmp_path / "wrapped.pth").keys() == trained.state_dict().keys()


def test_missing_file_says_so(tmp_path):
    with pytest.raises(KdkitError, match=r"^teacher checkpoint not found: .*absent\.pt$"):
        load_weights(fresh(), tmp_path / "absent.pt")


def test_wrong_architecture(tmp_path, trained):
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(KdkitError, match="does not fit Sequential: .*size mismatch"):
        load_weights(other, tmp_path / "w.pt")
    bigger = fresh().append(nn.Linear(2, 2))
    with pytest.raises(KdkitError, match=r"2 missing keys \['4.weight', '4.bias'\], 0 unexpected"):
        load_weights(bigger, tmp_path / "w.pt")
    load_weights(bigger, tmp_path / "w.pt", strict=False)  # partial loads are allowed when asked
    assert torch.equal(bigger[0].weight, trained[0].weight)


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(KdkitError, match="holds no state_dict"):
        read_state_dict(tmp_path / "list.pt")
