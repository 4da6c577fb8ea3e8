import math

import numpy as np
import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.reviewkd import ABF, ReviewKD, hcl_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch

PAIR_STUDENT = ["layer1", "layer2", "layer3", "embedding"]
PAIR_TEACHER = ["layer1.2:input", "layer2.2:input", "layer3.2:input", "embedding"]  # pre-ReLU


def block_means(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over non-overlapping k x k blocks of the last two axes (explicit loops)."""
    h = x.shape[-1] // k
    out = np.zeros(x.shape[:-2] + (h, h))
    for i in range(h):
        for j in range(h):
            out[..., i, j] = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k].mean(axis=(-2, -1))
    return out


def test_hcl_by_numpy():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a, b = f_s.double().numpy(), f_t.double().numpy()
    mse = lambda x, y: float(((x - y) ** 2).mean())  # noqa: E731
    # level 4 is skipped (not smaller than the 4x4 map); 2x2 weight 1/2, 1x1 weight 1/4
    expected = (mse(a, b) + 0.5 * mse(block_means(a, 2), block_means(b, 2))
                + 0.25 * mse(block_means(a, 4), block_means(b, 4))) / 1.75
    assert hcl_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-5)
    assert hcl_loss(f_s, f_t, levels=[]).item() == pytest.approx(mse(a, b), rel=1e-5)


def test_abf_fusion_by_hand():
    abf = ABF(2, 2, 3, fuse=True).eval()  # eval BN: x / sqrt(1 + eps)
    with torch.no_grad():
        abf.conv1[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # sigmoid: 1/2 and 3/4
    x = torch.arange(32.0).view(1, 2, 4, 4)
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 2, 2, 2)
    out, residual = abf(x, y, (4, 4))
    scale = 1 / math.sqrt(1 + abf.conv1[1].eps)
    for c in range(2):
        for i in range(4):
            for j in range(4):
                expected = 0.5 * x[0, c, i, j].item() * scale + 0.75 * y[0, c, i // 2, j // 2].item()
                assert residual[0, c, i, j].item() == pytest.approx(expected, rel=1e-5)
    assert out.shape == (1, 3, 4, 4) and torch.allclose(out, abf.conv2(residual))
    out, residual = abf(x, y, (8, 8))  # resized (nearest) to the teacher's size
    assert out.shape == (1, 3, 8, 8) and residual.shape == (1, 2, 8, 8)


def tiny_outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = Outputs(embedding=torch.randn(3, 6, generator=g),
                      features={"s1": torch.randn(3, 2, 4, 4, generator=g), "s2": torch.randn(3, 4, 2, 2, generator=g)})
    teacher = Outputs(embedding=torch.randn(3, 5, generator=g),
                      features={"t1": torch.randn(3, 3, 4, 4, generator=g), "t2": torch.randn(3, 5, 2, 2, generator=g)})
    return student, teacher


def built_tiny(**kwargs) -> ReviewKD:
    d = ReviewKD(student_stages=["s1", "s2", "embedding"], teacher_stages=["t1", "t2", "embedding"], **kwargs)
    d.build(*tiny_outputs(), DistillContext())
    return d.eval()


def test_fusion_runs_top_down_and_loss_sums_hcl_over_stages():
    d = built_tiny()
    assert d.student_features == ["s1", "s2"] and d.abfs[2].att_conv is None and d.abfs[0].att_conv is not None
    assert d.abfs[0].conv1[0].out_channels == 6  # min(512, channels of the deepest student stage)
    student, teacher = tiny_outputs()
    outs = d.fused(student, [(4, 4), (2, 2), (1, 1)])
    assert [tuple(z.shape) for z in outs] == [(3, 3, 4, 4), (3, 5, 2, 2), (3, 5, 1, 1)]
    changed_shallow = Outputs(embedding=student.embedding, features={**student.features, "s1": torch.zeros(3, 2, 4, 4)})
    again = d.fused(changed_shallow, [(4, 4), (2, 2), (1, 1)])
    assert torch.equal(again[1], outs[1]) and torch.equal(again[2], outs[2])  # deeper: unaffected
    assert not torch.equal(again[0], outs[0])
    changed_deep = Outputs(embedding=torch.zeros(3, 6), features=student.features)
    again = d.fused(changed_deep, [(4, 4), (2, 2), (1, 1)])
    assert not torch.equal(again[0], outs[0]) and not torch.equal(again[1], outs[1])  # reviewed
    t_maps = [teacher.features["t1"], teacher.features["t2"], teacher.embedding[:, :, None, None]]
    expected = sum(hcl_loss(z, t).item() for z, t in zip(outs, t_maps))
    assert d(student, teacher, {})["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_warmup_ramps_over_training_steps():
    d = built_tiny(warmup_steps=4)
    student, teacher = tiny_outputs()
    d_ref = built_tiny()
    d_ref.load_state_dict(d.state_dict())
    full = d_ref(student, teacher, {})["loss"].item()
    assert d(student, teacher, {})["loss"].item() == 0.0  # eval, step 0
    d.train()
    d_ref.train()
    for step in range(1, 7):
        got, ref = d(student, teacher, {})["loss"].item(), d_ref(student, teacher, {})["loss"].item()
        assert got == pytest.approx(min(step / 4, 1.0) * ref, rel=1e-5)
    assert full > 0 and d.state_dict()["step"].item() == 6


def test_bad_settings_and_shapes_are_refused():
    with pytest.raises(KdkitError, match="same length"):
        ReviewKD(student_stages=["a", "b"], teacher_stages=["a"])
    with pytest.raises(KdkitError, match="hcl_levels"):
        ReviewKD(hcl_levels=[4, 0])
    with pytest.raises(KdkitError, match="warmup_steps"):
        ReviewKD(warmup_steps=-1)
    d = ReviewKD(student_stages=["a"], teacher_stages=["b"])
    with pytest.raises(KdkitError, match=r"reviewkd: teacher stage 'b' must be.*\(4, 5\)"):
        d.build(Outputs(features={"a": torch.zeros(2, 3, 2, 2)}), Outputs(features={"b": torch.zeros(2, 4, 5)}),
                DistillContext())


def test_gradients_reach_student_and_fusion_modules_only():
    d = ReviewKD(student_stages=PAIR_STUDENT, teacher_stages=PAIR_TEACHER)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    distill_backward(d, pair, batch)
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("reviewkd")
    assert (d.weight, d.hcl_levels, d.warmup_steps, d.mid_channels) == (1.0, [4, 2, 1], 1000, None)
    assert d.student_stages == ["layer1", "layer2", "layer3", "embedding"]
    from kdkit.models.cifar_resnet import resnet20
    names = {n for n, _ in resnet20().named_modules()}
    assert all(t.removesuffix(":input") in names for t in d.teacher_features)
    d.teacher_stages = PAIR_TEACHER  # the tiny Pair's pre-ReLU names
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    loss = d.train()(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)["loss"]
    assert torch.isfinite(loss) and loss > 0  # 1 / 1000 of the loss on the first step
