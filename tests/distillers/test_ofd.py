import math
from statistics import NormalDist

import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.ofd import OFD, gaussian_margin, partial_l2
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch


norm = NormalDist()


def margin_by_stdlib(m: float, s: float) -> float:
    """The official code's formula, with the standard library's normal distribution."""
    if norm.cdf(-m / s) > 0.001:
        return m - s * norm.pdf(m / s) / norm.cdf(-m / s)
    return -3 * s


def test_margin_matches_the_truncated_normal_mean():
    means = [0.0, -1.0, 0.7, 2.0, 5.0]
    stds = [1.0, 0.5, 2.0, 1.0, 1.0]  # the last is beyond the 0.001 tail: -3 s
    got = gaussian_margin(torch.tensor(means), torch.tensor(stds))
    for g, m, s in zip(got.tolist(), means, stds):
        assert g == pytest.approx(margin_by_stdlib(m, s), rel=1e-5)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # half-normal mean
    assert got[-1].item() == -3.0


def test_partial_l2_by_hand():
    # one channel, margin -1; positions: (s, t)
    s = torch.tensor([0.5, -2.0, -0.5, -0.5, 1.0, -3.0]).view(1, 1, 1, 6)
    t = torch.tensor([-2.0, -2.0, -0.2, -0.8, 2.0, 0.5]).view(1, 1, 1, 6)
    # T = max(t, -1) = [-1, -1, -0.2, -0.8, 2, 0.5]
    # 1: s > T -> 1.5^2;  2: s <= T <= 0 -> 0;  3: s <= T <= 0 -> 0;  4: s > T -> 0.3^2
    # 5: T > 0 -> 1;  6: T > 0 -> 3.5^2
    expected = 2.25 + 0.09 + 1.0 + 12.25
    assert partial_l2(s, t, torch.tensor([-1.0])).item() == pytest.approx(expected, rel=1e-6)
    assert partial_l2(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1), torch.tensor([-1.0])).item() \
        == pytest.approx(expected, rel=1e-6)  # averaged over the batch


def test_margin_comes_from_the_teacher_statistics_and_is_frozen_after_margin_steps():
    torch.manual_seed(0)
    t1 = 0.5 + 2.0 * torch.randn(4, 2, 3, 3)
    d = OFD(pairs=[["a", "b"]], margin_steps=1)
    student = Outputs(features={"a": torch.randn(4, 3, 3, 3)})
    d.build(student, Outputs(features={"b": t1}), DistillContext())
    x = t1.transpose(0, 1).flatten(1).double()
    expected = [margin_by_stdlib(x[c].mean().item(), x[c].std(unbiased=False).item()) for c in range(2)]
    assert d.margin(0).tolist() == pytest.approx(expected, rel=1e-4)
    t2 = torch.randn(4, 2, 3, 3) - 1.0
    d.train()(student, Outputs(features={"b": t2}), {})  # step 1 of 1: accumulated
    both = torch.cat([t1, t2]).transpose(0, 1).flatten(1).double()
    expected = [margin_by_stdlib(both[c].mean().item(), both[c].std(unbiased=False).item()) for c in range(2)]
    assert d.margin(0).tolist() == pytest.approx(expected, rel=1e-4)
    d.train()(student, Outputs(features={"b": t2 + 5}), {})  # past margin_steps: frozen
    assert d.margin(0).tolist() == pytest.approx(expected, rel=1e-4)
    d.eval()(student, Outputs(features={"b": t2 + 5}), {})
    assert d.margin(0).tolist() == pytest.approx(expected, rel=1e-4)
    assert "stats0" in d.state_dict() and d.state_dict()["step"].item() == 2


def test_loss_weights_deeper_pairs_more():
    torch.manual_seed(1)
    student = Outputs(features={"a": torch.randn(2, 3, 2, 2)})
    teacher = Outputs(features={"b": torch.randn(2, 4, 2, 2)})
    d = OFD(pairs=[["a", "b"], ["a", "b"]], margin_steps=0).eval()
    d.build(student, teacher, DistillContext())
    d.connectors[1].load_state_dict(d.connectors[0].state_dict())
    s = d.connectors[0](student.features["a"])
    single = partial_l2(s, teacher.features["b"], d.margin(0)).item()
    assert d(student, teacher, {})["loss"].item() == pytest.approx(1.5 * single, rel=1e-5)


def test_bad_settings_and_shapes_are_refused():
    with pytest.raises(KdkitError, match="margin_steps"):
        OFD(margin_steps=-1)
    with pytest.raises(KdkitError, match=r"ofd: pair \[a, b\] needs maps"):
        OFD(pairs=[["a", "b"]]).build(Outputs(features={"a": torch.zeros(2, 3)}),
                                      Outputs(features={"b": torch.zeros(2, 3, 2, 2)}), DistillContext())


PAIR_PAIRS = [["layer1.2:input", "layer1.2:input"], ["layer2.2:input", "layer3.2:input"]]


def test_gradients_reach_student_and_connectors_only():
    d = OFD(pairs=PAIR_PAIRS)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert d.connectors[1].size == (2, 2)  # student 4x4 resized to the teacher's 2x2
    distill_backward(d, pair, batch)
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("ofd")
    assert d.weight == 0.001 and d.margin_steps == 100
    assert d.pairs[0] == ("layer1.0.relu2:input", "layer1.2.relu2:input")
    from kdkit.models.cifar_resnet import resnet8, resnet20
    names8 = {n for n, _ in resnet8().named_modules()}
    names20 = {n for n, _ in resnet20().named_modules()}
    for s, t in d.pairs:
        assert s.removesuffix(":input") in names8 and t.removesuffix(":input") in names20
    d.pairs = [tuple(p) for p in PAIR_PAIRS]  # the tiny Pair's pre-ReLU names
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    loss = d.train()(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)["loss"]
    assert torch.isfinite(loss) and loss > 0
