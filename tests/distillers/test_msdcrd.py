import math

import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.msdcrd import MSDCRD, decoupled_infonce
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch


def maps(s: torch.Tensor, t: torch.Tensor) -> tuple[Outputs, Outputs]:
    return Outputs(features={"f": s}), Outputs(features={"f": t})


def dcl_by_loops(scores, offset=0):
    """mean over groups and rows of -s_ii + log sum_{j != i} exp(s_ij), explicit loops."""
    total, n = 0.0, 0
    for group in scores.tolist():
        for i, row in enumerate(group):
            pos = row[i + offset]
            total += -pos + math.log(sum(math.exp(v) for j, v in enumerate(row) if j != i + offset))
            n += 1
    return total / n


def test_decoupled_infonce_by_loops_with_an_offset():
    scores = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.3, 1.0, 2.0, -0.5]],
                           [[0.0, 0.0, 1.0, 1.0], [1.5, -2.0, 0.5, 3.0]]])
    assert decoupled_infonce(scores[:, :, :2]).item() == pytest.approx(dcl_by_loops(scores[:, :, :2]), rel=1e-6)
    assert decoupled_infonce(scores, offset=2).item() == pytest.approx(dcl_by_loops(scores, 2), rel=1e-6)
    # Two columns: the loss is s_ij - s_ii exactly (no positive in the denominator).
    assert decoupled_infonce(torch.tensor([[[3.0, 1.0], [0.0, 2.0]]])).item() == pytest.approx(-2.0)


def normalize(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def test_multi_scale_loss_by_hand():
    torch.manual_seed(0)
    d = MSDCRD(pairs=[["f", "f"]], scales=[1, 2], feat_dim=2, temperature=0.5)
    s, t = torch.randn(3, 2, 2, 2), torch.randn(3, 3, 2, 2)  # B=3, student C=2, teacher C=3, 2x2
    d.build(*maps(s, t), DistillContext())
    w_s, w_t = [[1.0, 0.0], [0.5, 1.0]], [[1.0, 0.0, 1.0], [0.0, 2.0, -1.0]]
    with torch.no_grad():
        d.embed_s[0].linear.weight.copy_(torch.tensor(w_s))
        d.embed_t[0].linear.weight.copy_(torch.tensor(w_t))
        d.embed_s[0].linear.bias.zero_()
        d.embed_t[0].linear.bias.zero_()
    loss = d(*maps(s, t), {})["loss"]

    def project(w, v):
        return normalize([sum(a * b for a, b in zip(row, v)) for row in w])

    def cells(f, scale):  # list over positions of [B][C] pooled vectors (2x2 maps)
        if scale == 2:
            return [[f[b, :, y, x].tolist() for b in range(3)] for y in range(2) for x in range(2)]
        return [[f[b].mean(dim=(1, 2)).tolist() for b in range(3)]]

    per_scale = []
    for scale in (1, 2):
        scores = []
        for cs, ct in zip(cells(s, scale), cells(t, scale)):
            vs = [project(w_s, v) for v in cs]
            vt = [project(w_t, v) for v in ct]
            scores.append([[sum(a * b for a, b in zip(vs[i], vt[j])) / 0.5 for j in range(3)] for i in range(3)])
        per_scale.append(dcl_by_loops(torch.tensor(scores)))
    assert loss.item() == pytest.approx(sum(per_scale) / 2, rel=1e-5)


def test_gradients_reach_student_up_to_the_layer_and_both_heads():
    d = MSDCRD(pairs=[["layer2", "layer3"]], scales=[1, 2])  # student 4x4, teacher 2x2
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert set(distill_backward(d, pair, batch)) == {"loss"}
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("msdcrd")
    knobs = (d.weight, d.pairs, d.scales, d.feat_dim, d.temperature)
    assert knobs == (1.0, [("layer3", "layer3")], [1, 2, 4], 128, 0.07)
    with pytest.raises(KdkitError, match="scale 4 is finer.*smallest map side 2"):
        build(d, Pair(d), image_batch())  # the Pair's layer3 is 2x2; CIFAR ResNets' is 8x8
    d.pairs = [("layer2", "layer2")]  # 4x4 maps in the Pair
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert d.embed_s[0].linear.in_features == 8 and d.embed_t[0].linear.in_features == 12
    loss = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)["loss"]
    assert torch.isfinite(loss)


def test_bad_settings_and_shapes():
    with pytest.raises(KdkitError, match="scales"):
        MSDCRD(scales=[])
    with pytest.raises(KdkitError, match="scales"):
        MSDCRD(scales=[0, 2])
    with pytest.raises(KdkitError, match="temperature > 0"):
        MSDCRD(temperature=0)
    with pytest.raises(KdkitError, match="pairs"):
        MSDCRD(pairs=["layer3"])
    d = MSDCRD(pairs=[["f", "f"]], scales=[1])
    with pytest.raises(KdkitError, match=r"maps \[B, C, H, W\]"):
        d.build(*maps(torch.zeros(2, 4), torch.zeros(2, 4)), DistillContext())
    d.build(*maps(torch.zeros(2, 2, 2, 2), torch.zeros(2, 3, 2, 2)), DistillContext())
    with pytest.raises(KdkitError, match="batch size >= 2"):
        d(*maps(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2)), {})
    with pytest.raises(RuntimeError, match="build"):
        MSDCRD(pairs=[["f", "f"]])(*maps(torch.zeros(2, 2, 2, 2), torch.zeros(2, 3, 2, 2)), {})
