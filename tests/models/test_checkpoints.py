"""kdkit.checkpoints.load_weights: every checkpoint format it promises, and its errors."""

from __future__ import annotations

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
    torch.save({"state_dict": state, "epoch": 3, "global_step": 30}, tmp_path / "last.ckpt")
    expect_equal(load_weights(fresh(), tmp_path / "last.ckpt"), trained)


def test_checkpoint_with_pickled_objects_is_refused_unless_trusted(tmp_path, trained):
    ckpt = {
        "state_dict": {f"student.{k}": v for k, v in trained.state_dict().items()},
        # what save_hyperparameters() leaves in a checkpoint: not loadable with weights_only
        "hyper_parameters": {"cfg": OmegaConf.create({"lr": 0.1})},
    }
    torch.save(ckpt, tmp_path / "hp.ckpt")
    with pytest.raises(KdkitError) as err:
        load_weights(fresh(), tmp_path / "hp.ckpt")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "hp.ckpt") in message
    assert "arbitrary unpickling" in message and "teacher.trust_checkpoint=true" in message
    expect_equal(load_weights(fresh(), tmp_path / "hp.ckpt", trust=True), trained)


class _Evil:
    """A pickle that runs a shell command while it loads, as a crafted checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(KdkitError, match="refusing to load teacher checkpoint .*evil.pt"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, trained, damage):
    path = tmp_path / "teacher.pt"
    torch.save(trained.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not a checkpoint at all" * 10, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    with pytest.raises(KdkitError) as err:
        load_weights(fresh(), path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "unreadable" in message


def test_truncated_safetensors_names_the_file(tmp_path, trained):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(KdkitError, match=f"{path.name} is unreadable"):
        load_weights(fresh(), path)


def test_safetensors_and_ddp_prefix(tmp_path, trained):
    save_file({f"module.{k}": v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    expect_equal(load_weights(fresh(), tmp_path / "w.safetensors"), trained)


def test_pickled_module_needs_trust_and_model_key(tmp_path, trained):
    torch.save(trained, tmp_path / "whole.pt")
    with pytest.raises(KdkitError, match="arbitrary unpickling"):
        load_weights(fresh(), tmp_path / "whole.pt")
    expect_equal(load_weights(fresh(), tmp_path / "whole.pt", trust=True), trained)
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


def test_flipped_tensor_bytes_are_caught_by_the_crc(tmp_path, trained):
    """torch.load itself never checks the zip's CRCs: damaged weights would load silently."""
    path = tmp_path / "teacher.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    start = data.index(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[:64])
    data[start + 100:start + 164] = bytes(64)  # zero 64 bytes inside the tensor's data
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["w"][30].item() == 0.0  # torch loads it anyway
    with pytest.raises(KdkitError, match=r"teacher.pt is unreadable \(.*fails its CRC check"):
        read_state_dict(path)
