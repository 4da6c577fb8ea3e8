import numpy as np
import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.fsp import FSP, fsp_matrix
from kdkit.errors import KdkitError
from kdkit.features import FeatureTap
from kdkit.models.cifar_resnet import resnet8, resnet20
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch

STAGES = ["conv1", "layer1", "layer2", "layer3"]  # the Pair's maps: w, w, 2w, 4w channels


def fsp_by_loops(f1, f2):
    """The paper's G_{i,j} = sum_{s,t} F1[s,t,i] F2[s,t,j] / (h w), one entry at a time."""
    f1, f2 = f1.double().numpy(), f2.double().numpy()
    b, c1, h, w = f1.shape
    g = np.zeros((b, c1, f2.shape[1]))
    for n in range(b):
        for i in range(c1):
            for j in range(f2.shape[1]):
                g[n, i, j] = sum(f1[n, i, y, x] * f2[n, j, y, x] for y in range(h) for x in range(w)) / (h * w)
    return g


def test_matrix_by_hand():
    f1 = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])  # [1, 2, 1, 2]
    f2 = torch.tensor([[[[3.0, -1.0]]]])               # [1, 1, 1, 2]
    # G[0] = (1*3 + 2*-1) / 2 = 0.5; G[1] = (0*3 + 1*-1) / 2 = -0.5
    assert fsp_matrix(f1, f2).flatten().tolist() == pytest.approx([0.5, -0.5])


def test_matrix_matches_loops_and_pools_the_larger_map():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    pooled = torch.nn.functional.avg_pool2d(f1, 2)
    assert np.allclose(fsp_matrix(f1, f2).numpy(), fsp_by_loops(pooled, f2), atol=1e-6)
    assert np.allclose(fsp_matrix(f2, f1).numpy(), fsp_by_loops(f2, pooled), atol=1e-6)


def test_loss_sums_the_mean_squared_differences_of_consecutive_matrices():
    torch.manual_seed(1)
    s = {k: torch.randn(2, c, 4, 4) for k, c in (("a", 2), ("b", 3), ("c", 3))}
    t = {k: torch.randn(2, c, 4, 4) for k, c in (("x", 2), ("y", 3), ("z", 3))}
    d = FSP(layers=["a", "b", "c"], teacher_layers=["x", "y", "z"], epochs=None)
    expected = (np.mean((fsp_by_loops(s["a"], s["b"]) - fsp_by_loops(t["x"], t["y"])) ** 2)
                + np.mean((fsp_by_loops(s["b"], s["c"]) - fsp_by_loops(t["y"], t["z"])) ** 2))
    assert d(Outputs(features=s), Outputs(features=t), {})["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert d(Outputs(features=s), Outputs(features=dict(zip("xyz", s.values()))), {})["loss"].item() == 0.0


def test_the_loss_stops_after_its_epochs():
    torch.manual_seed(2)
    s = {k: torch.randn(2, 2, 2, 2, requires_grad=True) for k in "ab"}
    t = {k: torch.randn(2, 2, 2, 2) for k in "ab"}
    d = FSP(layers=["a", "b"], epochs=3)
    d.set_progress(2, 5)
    assert d(Outputs(features=s), Outputs(features=t), {})["loss"].item() > 0
    d.set_progress(3, 6)
    loss = d(Outputs(features=s), Outputs(features=t), {})["loss"]
    assert loss.item() == 0.0 and loss.requires_grad


def test_start_up_errors():
    with pytest.raises(KdkitError, match="fsp.layers: give a list of at least two modules"):
        FSP(layers=["layer1"])
    with pytest.raises(KdkitError, match="fsp.teacher_layers has 3 modules but fsp.layers has 2"):
        FSP(layers=["a", "b"], teacher_layers=["a", "b", "c"])
    with pytest.raises(KdkitError, match="fsp.epochs"):
        FSP(epochs=1.5)
    d = FSP(layers=STAGES)
    pair = Pair(d, s_width=4, t_width=6)
    with pytest.raises(KdkitError, match=r"FSP matrix of \[conv1, layer1\] is 4x4 for the student but 6x6"):
        build(d, pair, image_batch())
    vector = Outputs(features={"a": torch.zeros(2, 3), "b": torch.zeros(2, 3, 1, 1)})
    with pytest.raises(KdkitError, match=r"fsp: student feature 'a' must be a map"):
        FSP(layers=["a", "b"]).build(vector, vector, DistillContext())


def test_gradients_reach_the_student_up_to_the_last_layer():
    d = FSP(layers=STAGES[:3])
    pair = Pair(d, s_width=4, t_width=4)
    batch = image_batch()
    build(d, pair, batch)
    distill_backward(d, pair, batch)
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("fsp")
    assert (d.layers, d.teacher_layers) == (["layer1:input", "layer1", "layer2", "layer3"],) * 2
    assert (d.weight, d.epochs) == (1.0, 30)
    pair = Pair(d, s_width=4, t_width=4)  # the Pair also has these names (layer1:input = conv1's map)
    batch = image_batch()
    build(d, pair, batch)
    loss = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)["loss"]
    assert torch.isfinite(loss) and loss > 0


def test_default_layers_fit_resnet20_to_resnet8():
    d = FSP()
    student, teacher = resnet8(), resnet20()
    s_tap, t_tap = FeatureTap(student, d.student_features), FeatureTap(teacher, d.teacher_features)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        student(x), teacher(x)
    s, t = Outputs(features=s_tap.pop()), Outputs(features=t_tap.pop())
    d.build(s, t, DistillContext())
    assert [tuple(s.features[n].shape[1:2]) for n in d.layers] == [(16,), (16,), (32,), (64,)]
    assert d(s, t, {})["loss"] > 0
