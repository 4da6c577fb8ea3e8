import math

import pytest
import torch
from torch import nn

from kdkit.distillers.base import DistillContext
from kdkit.distillers.ft import FT, factor_distance
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch, run_once


def feats(s, t):
    return Outputs(features={"f": s}), Outputs(features={"f": t})


def test_factor_distance_by_hand():
    # sample 0: (3, 4)/5 vs (1, 0): |.6 - 1| + |.8 - 0| = 1.2; sample 1: (0, 2)/2 vs (0, 1): 0
    s = torch.tensor([[3.0, 4.0], [0.0, 2.0]]).view(2, 1, 1, 2)
    t = torch.tensor([[1.0, 0.0], [0.0, 5.0]]).view(2, 1, 1, 2)
    assert factor_distance(s, t).item() == pytest.approx(1.2 / 4, rel=1e-6)


def test_factor_distance_matches_an_explicit_sum_and_pools_the_larger_map():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)
    pooled = torch.nn.functional.avg_pool2d(s, 2).tolist()
    total = 0.0
    for a, b in zip(pooled, t.tolist()):
        a = [v for c in a for row in c for v in row]
        b = [v for c in b for row in c for v in row]
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        total += sum(abs(x / na - y / nb) for x, y in zip(a, b))
    assert factor_distance(s, t).item() == pytest.approx(total / (2 * 3 * 2 * 2), rel=1e-5)


def test_modules_and_terms_by_hand():
    d = FT(student_feature="f", teacher_feature="f", paraphrase_rate=0.5, reconstruction_weight=0.25)
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 6, 2, 2)
    d.build(*feats(s, t), DistillContext())
    convs = [m for m in d.paraphraser.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(6, 6), (6, 3), (3, 3), (3, 3), (3, 6), (6, 6)]
    assert [m.out_channels for m in d.translator if isinstance(m, nn.Conv2d)] == [3, 3, 3]
    terms = d(*feats(s, t), {})

    def leaky(x):
        return torch.where(x > 0, x, 0.1 * x)

    code = t
    for conv in convs[:3]:
        code = leaky(torch.nn.functional.conv2d(code, conv.weight, conv.bias, padding=1))
    rec = code
    for conv in convs[3:]:
        rec = leaky(torch.nn.functional.conv_transpose2d(rec, conv.weight, conv.bias, padding=1))
    assert terms["reconstruction"].item() == pytest.approx(0.25 * ((rec - t) ** 2).mean().item(), rel=1e-5)
    assert terms["factor"].item() == pytest.approx(factor_distance(d.translator(s), code).item(), rel=1e-5)


def test_the_factor_term_never_trains_the_paraphraser():
    d = FT(student_feature="f", teacher_feature="f")
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 2, 2, requires_grad=True), torch.randn(2, 4, 2, 2)
    d.build(*feats(s, t), DistillContext())
    d(*feats(s, t), {})["factor"].backward()
    assert all(p.grad is None for p in d.paraphraser.parameters())
    assert all(p.grad is not None for p in d.translator.parameters()) and s.grad is not None


def test_start_up_errors():
    with pytest.raises(KdkitError, match="ft.paraphrase_rate must be > 0"):
        FT(paraphrase_rate=0)
    with pytest.raises(KdkitError, match="ft.reconstruction_weight must be > 0"):
        FT(reconstruction_weight=0)
    d = FT(student_feature="f", teacher_feature="f")
    with pytest.raises(KdkitError, match=r"ft: f / f must be maps .* student shape \(3,\)"):
        d.build(*feats(torch.zeros(2, 3), torch.zeros(2, 4, 2, 2)), DistillContext())


def test_gradients_reach_student_translator_and_paraphraser_only():
    d = FT(student_feature="layer2", teacher_feature="layer3")
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert any(k.startswith("paraphraser.") for k in d.state_dict())  # saved with the student
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"factor", "reconstruction"}
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("ft")
    knobs = (d.student_feature, d.teacher_feature, d.paraphrase_rate, d.reconstruction_weight, d.weight)
    assert knobs == ("layer3", "layer3", 0.5, 0.002, 500.0)
    terms = run_once(d)
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    assert d.translator[0].in_channels == 16 and d.paraphraser.encoder[2].out_channels == 12
