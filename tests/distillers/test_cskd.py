import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kdkit.distillers.base import DistillContext
from kdkit.distillers.cskd import (CSKD, ckf_weight, cskd_loss, dense_logits_from_map,
                                   dense_logits_from_tokens)
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.teachers import build_distiller

from .helpers import CONF, distill_backward
from .test_deit import ViTPair, hard_by_loops, vit_batch


def linear_by_loops(head: nn.Linear, vector):
    w, b = head.weight.tolist(), head.bias.tolist()
    return [sum(wi * xi for wi, xi in zip(w_row, vector)) + b_k for w_row, b_k in zip(w, b)]


def dense_by_loops(head: nn.Linear, fmap):
    """``[B][y][x][K]`` lists: ``head`` at every position of ``fmap`` ``[B, C, H, W]``."""
    b, c, h, w = fmap.shape
    return [[[linear_by_loops(head, [fmap[i, ch, y, x].item() for ch in range(c)]) for x in range(w)]
             for y in range(h)] for i in range(b)]


def pool_by_loops(dense, size):
    """Average ``dense`` ``[B][H][W][K]`` over equal non-overlapping windows to ``size``."""
    out = []
    for sample in dense:
        h, w = len(sample), len(sample[0])
        fy, fx = h // size[0], w // size[1]
        out.append([[[sum(sample[y * fy + a][x * fx + c][k] for a in range(fy) for c in range(fx)) / (fy * fx)
                      for k in range(len(sample[0][0]))] for x in range(size[1])] for y in range(size[0])])
    return out


def cskd_by_loops(s_dense, t_dense, t_global, alpha, mode="hard", tau=1.0):
    """Per position: fuse the teacher's logits, then CE to the fused argmax (hard) or tau^2 KL
    (soft); averaged over samples and positions."""
    total, count = 0.0, 0
    for i, (s_rows, t_rows) in enumerate(zip(s_dense, t_dense)):
        for s_row, t_row in zip(s_rows, t_rows):
            for s_vec, t_vec in zip(s_row, t_row):
                fused = [alpha * a + (1 - alpha) * g for a, g in zip(t_vec, t_global[i])]
                if mode == "hard":
                    y = max(range(len(fused)), key=lambda c: fused[c])
                    total += math.log(sum(math.exp(v) for v in s_vec)) - s_vec[y]
                else:
                    zs = sum(math.exp(v / tau) for v in s_vec)
                    zt = sum(math.exp(v / tau) for v in fused)
                    total += tau**2 * sum(math.exp(b / tau) / zt * ((b / tau - math.log(zt)) - (a / tau - math.log(zs)))
                                          for a, b in zip(s_vec, fused))
                count += 1
    return total / count


def test_ckf_weight_by_hand():
    assert [ckf_weight(e, 10) for e in (0, 5, 9, 10, 12)] == pytest.approx([1.0, 0.5, 0.1, 0.0, 0.0])
    assert ckf_weight(5, 10, "square") == pytest.approx(0.25)
    assert ckf_weight(5, 10, "cosine") == pytest.approx(math.sqrt(0.5))
    assert ckf_weight(3, 4, "cosine") == pytest.approx(math.cos(3 * math.pi / 8))
    with pytest.raises(KdkitError, match="cskd.schedule must be one of"):
        ckf_weight(0, 10, "exp")


def test_dense_logits_match_loops_and_the_teacher_global_prediction():
    torch.manual_seed(0)
    head = nn.Linear(3, 4)
    fmap = torch.randn(2, 3, 2, 3)
    dense = dense_logits_from_map(fmap, head)
    assert dense.shape == (2, 4, 2, 3)
    expected = dense_by_loops(head, fmap)
    for i in range(2):
        for y in range(2):
            for x in range(3):
                assert dense[i, :, y, x].tolist() == pytest.approx(expected[i][y][x], rel=1e-5)
    # tokens [B, P + h*w, D]: the prefix tokens are skipped, patches are row-major
    tokens = torch.cat([torch.full((2, 2, 3), 99.0), fmap.flatten(2).transpose(1, 2)], dim=1)
    assert torch.allclose(dense_logits_from_tokens(tokens, 2, (2, 3), head), dense)
    # a linear head after global average pooling: the mean dense prediction is the global one
    assert torch.allclose(dense.mean(dim=(2, 3)), head(fmap.mean(dim=(2, 3))), atol=1e-6)


@pytest.mark.parametrize("mode,tau", [("hard", 1.0), ("soft", 1.0), ("soft", 2.0)])
@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
def test_cskd_loss_matches_loops(mode, tau, alpha):
    torch.manual_seed(1)
    s, t, g = 2 * torch.randn(2, 4, 2, 2), 2 * torch.randn(2, 4, 2, 2), 2 * torch.randn(2, 4)
    as_lists = lambda x: x.permute(0, 2, 3, 1).tolist()  # noqa: E731
    expected = cskd_by_loops(as_lists(s), as_lists(t), g.tolist(), alpha, mode, tau)
    assert cskd_loss(s, t, g, alpha, mode, tau).item() == pytest.approx(expected, rel=1e-5)


def test_the_finer_grid_is_pooled_to_the_coarser():
    torch.manual_seed(2)
    s_fine, t, g = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2), torch.randn(2, 4)
    pooled = pool_by_loops(s_fine.permute(0, 2, 3, 1).tolist(), (2, 2))
    t_lists = t.permute(0, 2, 3, 1).tolist()
    expected = cskd_by_loops(pooled, t_lists, g.tolist(), 0.5)
    assert cskd_loss(s_fine, t, g, 0.5).item() == pytest.approx(expected, rel=1e-5)
    # the other way round: the teacher's finer map is pooled to the student's grid
    s, t_fine = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 4, 4)
    t_pooled = pool_by_loops(t_fine.permute(0, 2, 3, 1).tolist(), (2, 2))
    assert cskd_loss(s, t_fine, g, 0.5, "soft").item() == pytest.approx(
        cskd_by_loops(s.permute(0, 2, 3, 1).tolist(), t_pooled, g.tolist(), 0.5, "soft"), rel=1e-5)


def test_forward_on_hand_made_networks_follows_the_epoch():
    """Positions whose teacher dense argmax differs from the global one: epoch 0 uses the dense
    labels, late epochs the global label; the student's head classifies the patch tokens."""
    s_head, t_head = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        for head in (s_head, t_head):
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
    context = DistillContext(models={"student": nn.Sequential(s_head), "teacher": nn.Sequential(t_head)})
    d = CSKD(epochs=4, student_tokens="tok", student_prefix_tokens=1, student_head="0",
             teacher_feature="map", teacher_head="0", distill_feature=None)
    # student: CLS (ignored) + 2x2 patch tokens with logits [2, 0], [0, 2], [2, 0], [0, 2]
    tokens = torch.tensor([[[9.0, -9.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]])
    # teacher dense logits [1.2, 0], [0, 3], [2, 0], [0, 1] -> classes 0, 1, 0, 1; global [0, 1] -> 1
    fmap = torch.tensor([[[[1.2, 0.0], [2.0, 0.0]], [[0.0, 3.0], [0.0, 1.0]]]])
    student = Outputs(features={"tok": tokens})
    teacher = Outputs(logits=torch.tensor([[0.0, 1.0]]), features={"map": fmap})
    d.build(student, teacher, context)
    right, wrong = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))  # CE of [2, 0] to class 0 / 1
    d.set_progress(0, 0)  # alpha = 1: the dense labels 0, 1, 0, 1: every token right
    assert d.alpha() == 1.0
    assert d(student, teacher, {})["dense"].item() == pytest.approx(right, rel=1e-6)
    d.set_progress(2, 0)  # alpha = 1/2: [0.6, 0.5], [0, 2], [1, 0.5], [0, 1]: still 0, 1, 0, 1
    assert d(student, teacher, {})["dense"].item() == pytest.approx(right, rel=1e-6)
    d.set_progress(3, 0)  # alpha = 1/4: [0.3, 0.75], [0, 1.5], [0.5, 0.75], [0, 1]: all class 1
    assert d.alpha() == pytest.approx(0.25)
    assert d(student, teacher, {})["dense"].item() == pytest.approx((wrong + right) / 2, rel=1e-6)


def test_gradients_reach_the_distillation_head_and_blocks_not_the_class_head_or_teacher():
    d = CSKD(epochs=3)
    pair = ViTPair(d)
    batch = vit_batch()
    pair.build(d, batch)
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"dense", "distill"}
    # the distiller's own calls of head_dist (on the patch tokens) are not recorded by the tap
    assert pair.s_tap.store == {}
    grads = {n: p.grad for n, p in pair.student.named_parameters()}
    assert grads["head.weight"] is None
    for name in ("head_dist.weight", "blocks.0.attn.qkv.weight", "norm.weight", "patch_embed.proj.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in pair.teacher.parameters())
    # the heads stay the networks': nothing registered, nothing saved with the distiller
    assert list(d.parameters()) == [] and d.state_dict() == {}


def test_plain_vit_student_head_learns_from_the_patch_tokens():
    d = CSKD(epochs=3, student_prefix_tokens=1, student_head="head", distill_feature=None)
    pair = ViTPair(d, distilled=False)
    batch = vit_batch()
    pair.build(d, batch)
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"dense"}
    for name, p in pair.student.named_parameters():  # the head included
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the patch-token term alone: the dense loss with the student's own head on its patch tokens
    with torch.no_grad():
        s, t = pair.student_outputs(batch), pair.teacher_outputs(batch)
        s_dense = dense_logits_from_tokens(s.features["norm"], 1, (4, 4), pair.student.head)
        t_dense = dense_logits_from_map(t.features["layer3"], pair.teacher.model.fc)
    as_lists = lambda x: x.permute(0, 2, 3, 1).tolist()  # noqa: E731
    expected = cskd_by_loops(as_lists(s_dense), as_lists(t_dense), t.logits.tolist(), 1.0)
    assert d(s, t, batch)["dense"].item() == pytest.approx(expected, rel=1e-5)


def test_errors():
    batch = vit_batch()
    # a teacher feature that is not a map
    d = CSKD(epochs=3, teacher_feature="flatten")
    with pytest.raises(KdkitError, match=r"'flatten' has shape \(24,\), not a map"):
        ViTPair(d).build(d, batch)
    # prefix tokens that leave no square grid: the token layout's error, with the counts that fit
    d = CSKD(epochs=3, student_prefix_tokens=1)
    with pytest.raises(KdkitError, match=r"student_prefix_tokens=1 leaves 17 patch tokens.*\[2\]"):
        ViTPair(d).build(d, batch)
    d = CSKD(epochs=3, student_prefix_tokens=None)
    with pytest.raises(KdkitError, match="cskd.student_prefix_tokens"):
        ViTPair(d).build(d, batch)
    # a head that is not a module of the network
    d = CSKD(epochs=3, teacher_head="classifier")
    with pytest.raises(KdkitError, match="'classifier' is not a module of the teacher"):
        ViTPair(d).build(d, batch)
    # a head of the wrong width for the teacher's map
    d = CSKD(epochs=3, teacher_head="layer1.0")
    with pytest.raises(KdkitError, match="the teacher head 'layer1.0' cannot classify the positions of 'layer3'"):
        ViTPair(d).build(d, batch)
    # a student without distillation head
    with pytest.raises(KdkitError, match="'head_dist' is not a module of VisionTransformer"):
        ViTPair(CSKD(epochs=3, student_prefix_tokens=1), distilled=False)
    with pytest.raises(KdkitError, match="cskd.epochs must be the student's total training epochs"):
        CSKD(epochs=None)
    with pytest.raises(KdkitError, match="cskd.epochs"):
        CSKD(epochs=0)
    with pytest.raises(KdkitError, match="cskd.mode must be one of"):
        CSKD(epochs=3, mode="dense")
    with pytest.raises(RuntimeError, match="build"):
        CSKD(epochs=3)(Outputs(), Outputs(), {})


def test_class_counts_must_agree():
    d = CSKD(epochs=3, distill_feature=None)
    pair = ViTPair(d, num_classes=7)
    with pytest.raises(KdkitError, match=r"'student head': 7, 'teacher head': 5"):
        pair.build(d, vit_batch())


def test_yaml_instantiates_with_the_trainer_epochs_and_runs():
    node = OmegaConf.create({"trainer": {"max_epochs": 4}, "distiller": OmegaConf.load(CONF / "cskd.yaml")})
    d = build_distiller(node.distiller.cskd)
    assert (d.weight, d.epochs, d.student_tokens, d.prefix_tokens, d.student_head) == (1.0, 4, "norm", 2, "head_dist")
    assert (d.teacher_feature, d.teacher_head, d.mode, d.schedule) == ("layer3", "fc", "hard", "linear")
    assert (d.distill_feature, d.distill_weight) == ("head_dist", 0.5)
    pair = ViTPair(d)
    batch = vit_batch()
    pair.build(d, batch)
    d.set_progress(2, 10)
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    s, t = pair.student_outputs(batch), pair.teacher_outputs(batch)
    assert terms["distill"].item() == pytest.approx(0.5 * hard_by_loops(s.features["head_dist"], t.logits), rel=1e-5)
