import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdkit.distillers.trg import TRG, contextual_loss, global_loss, local_loss, sample_nodes
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.teachers import build_distiller

from .vit_helpers import ViTPair
from .helpers import CONF, Pair, build, distill_backward, from_yaml, image_batch, staged_net


def images16(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 16, 16, generator=g), "label": torch.randint(0, 5, (n,), generator=g),
            "index": torch.arange(n)}


# ---- independent computations (explicit loops) --------------------------------------------

def contextual_by_loops(f_s, f_t):
    b, n = f_s.shape[:2]
    total = 0.0
    for i in range(b):
        rows = []
        for f in (f_s[i].tolist(), f_t[i].tolist()):
            d = len(f[0])
            cs = []
            for a in range(n):
                scores = [sum(x * y for x, y in zip(f[a], f[c])) / math.sqrt(d) for c in range(n)]
                top = max(scores)
                e = [math.exp(s - top) for s in scores]
                cs.append([v / sum(e) for v in e])
            rows.append(cs)
        total += sum((rows[0][a][c] - rows[1][a][c]) ** 2 for a in range(n) for c in range(n))
    return total / (b * n * n)


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def local_by_loops(z_s, z_t, k, sigma):
    zs, zt = [_unit(v) for v in z_s.tolist()], [_unit(v) for v in z_t.tolist()]
    m = len(zs)

    def d2(z, i, j):
        return sum((a - b) ** 2 for a, b in zip(z[i], z[j]))

    total = 0.0
    for i in range(m):
        nbrs = sorted((j for j in range(m) if j != i), key=lambda j: d2(zt, i, j))[:k]
        a_t = [math.exp(-d2(zt, i, j) / (2 * sigma)) for j in nbrs]
        a_s = [math.exp(-d2(zs, i, j) / (2 * sigma)) for j in nbrs]
        p_t = [v / sum(a_t) for v in a_t]
        p_s = [v / sum(a_s) for v in a_s]
        total += sum(p * math.log(p / q) for p, q in zip(p_t, p_s))
    return total / m


def global_by_loops(p_s, z_t, tau):
    ps, zt = [_unit(v) for v in p_s.tolist()], [_unit(v) for v in z_t.tolist()]
    total = 0.0
    for i, p in enumerate(ps):
        logits = [sum(a * b for a, b in zip(p, t)) / tau for t in zt]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / len(ps)


# ---- the loss functions --------------------------------------------------------------------

def test_contextual_loss_matches_loops_across_widths():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(2, 5, 3), torch.randn(2, 5, 7)
    assert contextual_loss(f_s, f_t).item() == pytest.approx(contextual_by_loops(f_s, f_t), rel=1e-5)
    assert contextual_loss(f_t, f_t).item() == 0.0


def test_local_loss_matches_loops_and_vanishes_for_equal_graphs():
    torch.manual_seed(1)
    z_s, z_t = torch.randn(10, 4), torch.randn(10, 6)
    for k, sigma in ((3, 0.1), (5, 0.5)):
        assert local_loss(z_s, z_t, k, sigma).item() == pytest.approx(local_by_loops(z_s, z_t, k, sigma), rel=1e-5)
    assert local_loss(z_t, z_t, 3, 0.1).item() == pytest.approx(0.0, abs=1e-7)
    # scaled tokens have the same graph (the kernel acts on normalised tokens)
    assert local_loss(3 * z_t, z_t, 3, 0.1).item() == pytest.approx(0.0, abs=1e-7)
    # k is capped at M - 1; one node has no edges
    assert local_loss(z_s[:4], z_t[:4], 50, 0.2).item() == pytest.approx(
        local_by_loops(z_s[:4], z_t[:4], 3, 0.2), rel=1e-5)
    assert local_loss(z_s[:1], z_t[:1], 3, 0.1).item() == 0.0


def test_global_loss_matches_loops():
    torch.manual_seed(2)
    p_s, z_t = torch.randn(6, 5), torch.randn(6, 5)
    for tau in (0.1, 0.7):
        assert global_loss(p_s, z_t, tau).item() == pytest.approx(global_by_loops(p_s, z_t, tau), rel=1e-5)
    # aligned nodes score better than shuffled ones
    assert global_loss(z_t, z_t, 0.1) < global_loss(z_t.roll(1, 0), z_t, 0.1)


def test_sample_nodes_takes_the_same_positions_on_both_sides():
    b, n = 3, 16
    pos = torch.arange(b * n, dtype=torch.float).view(b, n, 1)
    f_s, f_t = torch.cat([pos, -pos], 2), torch.cat([pos, pos, pos], 2)
    z_s, z_t = sample_nodes(f_s, f_t, 5)
    assert z_s.shape == (15, 2) and z_t.shape == (15, 3)
    assert torch.equal(z_s[:, 0], z_t[:, 0])  # aligned: same (image, position)
    ids = z_s[:, 0].long()
    assert torch.equal(ids // n, torch.arange(b).repeat_interleave(5))  # 5 per image
    assert all(len(set(ids[i * 5:(i + 1) * 5].tolist())) == 5 for i in range(b))  # distinct positions
    all_s, all_t = sample_nodes(f_s, f_t, None)
    assert torch.equal(all_s, f_s.reshape(-1, 2)) and torch.equal(all_t, f_t.reshape(-1, 3))
    assert torch.equal(sample_nodes(f_s, f_t, 16)[0], all_s)


# ---- the distiller -------------------------------------------------------------------------

def test_forward_reads_patch_tokens_and_maps_on_one_grid():
    """ViT tokens (CLS dropped) vs a CNN map twice as fine (area-pooled): every term equals the
    loss functions on tokens built by hand."""
    torch.manual_seed(3)
    s = torch.randn(2, 1 + 16, 8)  # CLS + 4x4 patch tokens
    t = torch.randn(2, 12, 8, 8)
    d = TRG(student_feature="s", teacher_feature="t", student_prefix_tokens=1, tokens_per_image=None,
            k=4, sigma=0.3, temperature=0.2, inner_weight=2.0, local_weight=3.0, global_weight=0.5)
    student, teacher = Outputs(features={"s": s}), Outputs(features={"t": t})
    d.build(student, teacher, None)
    terms = d(student, teacher, {})
    pooled = F.avg_pool2d(t, 2)  # [2, 12, 4, 4]
    t_tok = torch.stack([torch.stack([pooled[b, :, y, x] for y in range(4) for x in range(4)])
                         for b in range(2)])  # row-major positions
    s_tok = s[:, 1:]
    assert terms["inner"].item() == pytest.approx(2.0 * contextual_by_loops(s_tok, t_tok), rel=1e-5)
    z_s, z_t = s_tok.reshape(-1, 8), t_tok.reshape(-1, 12)
    assert terms["local"].item() == pytest.approx(3.0 * local_by_loops(z_s, z_t, 4, 0.3), rel=1e-4)
    with torch.no_grad():
        projected = d.projection(z_s)
    assert terms["global"].item() == pytest.approx(0.5 * global_by_loops(projected, z_t, 0.2), rel=1e-5)


def test_relation_terms_vanish_when_the_student_equals_the_teacher():
    torch.manual_seed(4)
    f = torch.randn(3, 1 + 16, 8)
    d = TRG(student_feature="f", teacher_feature="f", student_prefix_tokens=1, teacher_prefix_tokens=1,
            global_weight=0.0, tokens_per_image=6, k=4)
    out = Outputs(features={"f": f})
    d.build(out, out, None)
    terms = d(out, out, {})
    assert set(terms) == {"inner", "local"} and d.projection is None  # weight 0: skipped, no head
    assert terms["inner"].item() == 0.0 and terms["local"].item() == pytest.approx(0.0, abs=1e-7)


def test_dynamic_temperature_anneals_linearly_with_the_step():
    d = TRG(temperature=0.1, temperature_start=0.5, temperature_steps=100)
    for step, tau in ((0, 0.5), (25, 0.4), (100, 0.1), (500, 0.1)):
        d.set_progress(0, step)
        assert d.global_temperature() == pytest.approx(tau)
    assert TRG(temperature=0.2).global_temperature() == 0.2
    # the global term uses it
    torch.manual_seed(5)
    s, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    d = TRG(student_feature="s", teacher_feature="t", inner_weight=0, local_weight=0,
            temperature=0.1, temperature_start=0.9, temperature_steps=10)
    student, teacher = Outputs(features={"s": s}), Outputs(features={"t": t})
    d.build(student, teacher, None)
    d.set_progress(0, 5)
    with torch.no_grad():
        projected = d.projection(s.flatten(2).transpose(1, 2).reshape(-1, 4))
    expected = global_by_loops(projected, t.flatten(2).transpose(1, 2).reshape(-1, 4), 0.5)
    assert d(student, teacher, {})["global"].item() == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_the_student_and_projection_only_vit_teacher():
    d = TRG(student_feature="blocks.0", teacher_feature="blocks.1", student_prefix_tokens=1,
            teacher_prefix_tokens=1, tokens_per_image=5, k=3)
    pair = ViTPair(d)
    batch = images16()
    build(d, pair, batch)
    assert d.projection.in_features == 16 and d.projection.out_features == 24
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"inner", "local", "global"} and all(v > 0 for v in terms.values())
    reached = {n for n, p in pair.student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= reached
    assert not any(n.startswith(("blocks.1", "norm", "head")) for n in reached)  # past the tapped block
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    assert all(not p.requires_grad and p.grad is None for p in pair.teacher.parameters())


def test_cnn_teacher_map_is_read_as_tokens():
    # staged_net at 16x16: layer2 is 8x8, pooled to the ViT's 4x4 patch grid
    d = TRG(student_feature="blocks.1", teacher_feature="layer2", student_prefix_tokens=1, tokens_per_image=8)
    torch.manual_seed(6)
    pair = ViTPair(d, teacher=staged_net(6))
    batch = images16()
    build(d, pair, batch)
    assert d.projection.out_features == 12
    terms = distill_backward(d, pair, batch)
    assert all(v > 0 for v in terms.values())
    assert all(p.grad is None for p in pair.teacher.parameters())


def test_errors_show_both_shapes():
    d = TRG(student_feature="s", teacher_feature="t")
    vec, tok, fmap = torch.zeros(2, 5), torch.zeros(2, 17, 8), torch.zeros(2, 4, 4, 4)
    with pytest.raises(KdkitError, match=r"student shape \(5,\), teacher shape \(4, 4, 4\)"):
        d(Outputs(features={"s": vec}), Outputs(features={"t": fmap}), {})
    both = r"student_prefix_tokens.*\(student shape \(17, 8\), teacher shape \(4, 4, 4\)\)"
    with pytest.raises(KdkitError, match=both):
        d.build(Outputs(features={"s": tok}), Outputs(features={"t": fmap}), None)
    with pytest.raises(KdkitError, match="tokens_per_image"):
        TRG(tokens_per_image=0)
    with pytest.raises(KdkitError, match="at least one > 0"):
        TRG(inner_weight=0, local_weight=0, global_weight=0)
    with pytest.raises(KdkitError, match="sigma"):
        TRG(sigma=0)


def test_yaml_instantiates_and_runs():
    d = from_yaml("trg")  # defaults: the paper's CNN setting, the last stage's map
    assert (d.student_feature, d.teacher_feature) == ("layer3", "layer3")
    assert d.weights == {"inner": 1.0, "local": 1.0, "global": 1.0}
    assert (d.tokens_per_image, d.k, d.sigma, d.temperature, d.temperature_start) == (16, 8, 0.1, 0.1, None)
    pair, batch = Pair(d), image_batch()
    build(d, pair, batch)
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"inner", "local", "global"}
    # and for ViTs, with the token layout said
    node = OmegaConf.load(CONF / "trg.yaml")["trg"]
    node.merge_with({"student_feature": "blocks.1", "teacher_feature": "blocks.1",
                     "student_prefix_tokens": 1, "teacher_prefix_tokens": 1})
    d = build_distiller(node)
    pair, batch = ViTPair(d), images16()
    build(d, pair, batch)
    assert all(torch.isfinite(v) and v > 0 for v in distill_backward(d, pair, batch).values())
