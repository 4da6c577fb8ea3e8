import pytest
import torch
from omegaconf import OmegaConf

from kdkit.distillers.ab import AB, boundary_loss
from kdkit.distillers.adapters import ConvAdapter
from kdkit.distillers.base import DistillContext
from kdkit.errors import KdkitError
from kdkit.features import FeatureTap
from kdkit.models.cifar_resnet import resnet8, resnet20
from kdkit.outputs import Outputs
from kdkit.teachers import build_distiller

from .helpers import CONF, Pair, assert_gradients, build, distill_backward, image_batch, run_once

PRE_RELU = [["layer1.2:input", "layer1.2:input"], ["layer2.2:input", "layer2.2:input"],
            ["layer3.2:input", "layer3.2:input"]]  # the Pair's blocks are conv, bn, relu


def ab_by_loops(s, t, margin=1.0):
    """The hinge on every neuron, written as the paper's two cases, summed, / batch size."""
    total = 0.0
    for x, y in zip(s.flatten().tolist(), t.flatten().tolist()):
        if y > 0:
            total += max(0.0, margin - x) ** 2
        else:
            total += max(0.0, margin + x) ** 2
    return total / s.shape[0]


def test_value_by_hand():
    # teacher on (> 0): student 0.5 -> (1 - .5)^2 = .25; student 2 -> 0 (beyond the margin)
    # teacher off (<= 0, zero included): student -0.2 -> (1 - .2)^2 = .64; student -3 -> 0
    s = torch.tensor([[0.5, 2.0], [-0.2, -3.0]])
    t = torch.tensor([[1.0, 0.1], [0.0, -1.0]])
    assert boundary_loss(s, t).item() == pytest.approx((0.25 + 0.64) / 2)
    assert boundary_loss(s, t, margin=0.0).item() == 0.0  # the boundaries already agree


def test_matches_loops_and_pairs_are_weighted_by_depth():
    torch.manual_seed(0)
    maps = {k: torch.randn(2, 3, 2, 2) for k in ("a", "b", "c", "x", "y", "z")}
    assert boundary_loss(maps["a"], maps["x"], 0.7).item() == pytest.approx(ab_by_loops(maps["a"], maps["x"], 0.7), rel=1e-6)
    d = AB(pairs=[["a", "x"], ["b", "y"], ["c", "z"]], adapter=False, epochs=None)
    student, teacher = Outputs(features=maps), Outputs(features=maps)
    d.build(student, teacher, DistillContext())
    expected = (ab_by_loops(maps["a"], maps["x"]) / 4 + ab_by_loops(maps["b"], maps["y"]) / 2
                + ab_by_loops(maps["c"], maps["z"]))
    assert d(student, teacher, {})["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_the_loss_stops_after_its_epochs_but_keeps_the_graph():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2, requires_grad=True), torch.randn(2, 3, 2, 2)
    d = AB(pairs=[["f", "f"]], adapter=False, epochs=2)
    student, teacher = Outputs(features={"f": s}), Outputs(features={"f": t})
    d.build(student, teacher, DistillContext())
    d.set_progress(1, 10)
    assert d(student, teacher, {})["loss"].item() == pytest.approx(ab_by_loops(s.detach(), t), rel=1e-6)
    d.set_progress(2, 20)
    loss = d(student, teacher, {})["loss"]
    assert loss.item() == 0.0 and loss.requires_grad


def test_start_up_errors():
    with pytest.raises(KdkitError, match="ab.epochs must be a whole number >= 1 or null, got 0"):
        AB(epochs=0)
    with pytest.raises(KdkitError, match="ab.margin"):
        AB(margin=-1)
    with pytest.raises(KdkitError, match="ab.pairs"):
        AB(pairs=[])
    d = AB(pairs=[["layer1.2:input", "layer1.2:input"]], adapter=False)
    pair = Pair(d, s_width=4, t_width=6)
    with pytest.raises(KdkitError, match=r"ab: student shape \(4, 8, 8\) does not match .*\(6, 8, 8\).*adapter"):
        build(d, pair, image_batch())
    vector = Outputs(features={"v": torch.zeros(2, 4)})
    with pytest.raises(KdkitError, match=r"ab: pair \[v, v\] needs maps"):
        AB(pairs=[["v", "v"]]).build(vector, vector, DistillContext())


def test_gradients_reach_the_student_and_the_connectors_only():
    d = AB(pairs=PRE_RELU[:2])
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert all(isinstance(a, ConvAdapter) for a in d.adapters)
    assert any(k.startswith("adapters.1.") for k in d.state_dict())  # saved with the student
    distill_backward(d, pair, batch)
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_default_names_are_pre_relu_maps_of_the_cifar_resnets():
    d = AB()
    student, teacher = resnet8(), resnet20()
    s_tap = FeatureTap(student, d.student_features, "student")
    t_tap = FeatureTap(teacher, d.teacher_features, "teacher")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        student(x), teacher(x)
    for name, f in [*s_tap.pop().items(), *t_tap.pop().items()]:
        assert f.dim() == 4 and (f < 0).any(), name  # not yet through a ReLU


def test_yaml_instantiates_and_runs():
    node = OmegaConf.load(CONF / "ab.yaml")["ab"]
    assert [tuple(p) for p in node.pairs] == AB().pairs  # the defaults tested above
    node.pairs = PRE_RELU  # the yaml names kdkit's CIFAR ResNets; the Pair's blocks differ
    d = build_distiller(node)
    assert (d.weight, d.margin, d.use_adapter, d.epochs) == (0.003, 1.0, True, 30)
    loss = run_once(d)["loss"]
    assert torch.isfinite(loss) and loss > 0
