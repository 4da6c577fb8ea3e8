import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdkit.distillers.ofa import OFA, ofa_loss
from kdkit.distillers.ofa_branches import (MapBranch, OfficialMapBranch, OfficialTokenBranch, PatchMerging, SepConv,
                                           TokenBranch)
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.teachers import build_distiller

from .helpers import CONF, Pair, assert_gradients, build, distill_backward, from_yaml, image_batch, staged_net
from .vit_helpers import ViTPair, tiny_vit


def images16(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 16, 16, generator=g), "label": torch.randint(0, 5, (n,), generator=g),
            "index": torch.arange(n)}


def ofa_by_loops(s, t, labels, gamma=1.0, temperature=1.0, variant="paper"):
    """The OFA loss sample by sample, class by class, with explicit softmaxes."""

    def softmax(row):
        e = [math.exp(v / temperature) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for z_s, z_t, y in zip(s.tolist(), t.tolist(), labels.tolist()):
        p_s, p_t = softmax(z_s), softmax(z_t)
        for c in range(len(p_s)):
            if c == y:
                w = (1 + p_t[c]) ** gamma - (1 if variant == "official" else 0)
            else:
                w = p_t[c] ** gamma if variant == "official" else p_t[c]
            total -= w * math.log(p_s[c])
    return total / len(labels)


def vit_pair(d, student=None, teacher=None):
    """A ViT student and a CNN teacher (heterogeneous, as OFA is meant for) by default."""
    return ViTPair(d, student=student if student is not None else tiny_vit(0),
                   teacher=teacher if teacher is not None else staged_net(6))


# ---- the loss ------------------------------------------------------------------------------

# Teacher probabilities (.5, .3, .2) with label 0 and (.1, .6, .3) with label 1; the student's
# (.2, .5, .3) and (.25, .25, .5), given as log-probabilities (softmax gives them back).
T_HAND = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log()
S_HAND = torch.tensor([[0.2, 0.5, 0.3], [0.25, 0.25, 0.5]]).log()
Y_HAND = torch.tensor([0, 1])


@pytest.mark.parametrize("gamma, variant, expected", [
    # gamma = 1: -(1.5 ln .2 + .3 ln .5 + .2 ln .3) = 2.862896, -(1.7 ln .25 + .3 ln .5) = 2.564645
    (1.0, "paper", 2.713770),
    # gamma = 0: the target weighs 1: -(ln .2 + .3 ln .5 + .2 ln .3) = 2.058177, -(1.1 ln .25 + .3 ln .5) = 1.732868
    (0.0, "paper", 1.895522),
    # gamma = 2: -(2.25 ln .2 + ...) = 4.069974, -(2.56 ln .25 + .1 ln .25 + .3 ln .5) = 3.895487
    (2.0, "paper", 3.982731),
    # official, gamma = 2: -(1.25 ln .2 + .09 ln .5 + .04 ln .3) = 2.122340,
    #                      -(1.56 ln .25 + .01 ln .25 + .09 ln .5) = 2.238865
    (2.0, "official", 2.180602),
])
def test_two_samples_three_classes_by_hand(gamma, variant, expected):
    value = ofa_loss(S_HAND, T_HAND, Y_HAND, gamma=gamma, variant=variant)
    assert value.item() == pytest.approx(expected, abs=1e-5)
    assert value.item() == pytest.approx(ofa_by_loops(S_HAND, T_HAND, Y_HAND, gamma, 1.0, variant), rel=1e-6)


def test_gamma_one_is_label_ce_plus_teacher_ce_and_gamma_zero_drops_the_teacher_target():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    p_t = t.softmax(dim=1)
    # paper, gamma = 1: the target weighs 1 + p_t: CE with the label + CE with the teacher's distribution
    expected = F.cross_entropy(s, y) + F.cross_entropy(s, p_t)
    assert ofa_loss(s, t, y, gamma=1.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # paper, gamma = 0: the target weighs 1, the other classes p_t
    no_target = p_t.masked_fill(F.one_hot(y, 5).bool(), 0.0)
    expected = F.cross_entropy(s, y) + F.cross_entropy(s, no_target)
    assert ofa_loss(s, t, y, gamma=0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # official, gamma = 1: plain CE with the teacher's distribution (the label's CE is the task's)
    assert ofa_loss(s, t, y, gamma=1.0, variant="official").item() == pytest.approx(
        F.cross_entropy(s, p_t).item(), rel=1e-6)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_matches_loops_with_gamma_and_temperature_and_teacher_gets_no_gradient(variant):
    torch.manual_seed(1)
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    y = torch.tensor([0, 5, 2, 2])
    value = ofa_loss(s, t, y, gamma=1.5, temperature=2.0, variant=variant)
    assert value.item() == pytest.approx(ofa_by_loops(s, t, y, 1.5, 2.0, variant), rel=1e-6)
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_loss_is_float32_from_bf16_logits():
    s, t = S_HAND.bfloat16(), T_HAND.bfloat16()
    value = ofa_loss(s, t, Y_HAND)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(ofa_by_loops(s.float(), t.float(), Y_HAND), rel=1e-6)


# ---- branches ------------------------------------------------------------------------------

def test_simple_branch_shapes_for_tokens_and_maps():
    d = OFA(stages=["blocks.0", "blocks.1"], student_prefix_tokens=1, branch="simple")
    pair, batch = vit_pair(d), images16()
    pair.build(d, batch)
    assert all(isinstance(b, TokenBranch) for b in d.branches)
    feats = pair.student_outputs(batch).features
    assert feats["blocks.0"].shape == (4, 17, 16)
    assert d.branches[0](feats["blocks.0"]).shape == (4, 5)

    c = OFA(stages=["layer1", "layer2"], branch_width=12, branch="simple")
    cnn = ViTPair(c, student=staged_net(4), teacher=tiny_vit(1))
    cnn.build(c, batch)
    assert all(isinstance(b, MapBranch) for b in c.branches)
    assert c.branches[1].conv.in_channels == 8 and c.branches[1].conv.out_channels == 12
    assert c.branches[1](cnn.student_outputs(batch).features["layer2"]).shape == (4, 5)


def test_official_cnn_branches_downsample_each_stage_to_the_last_and_widen_to_the_widest():
    """staged_net(4) on 16x16: layer1 4ch 16x16, layer2 8ch 8x8, layer3 16ch 4x4 -> 2, 1 and 0 SepConv
    blocks (the authors' 4 - stage), channels doubling, the last block (or the 1x1 conv) to 16."""
    d = OFA(stages=["layer1", "layer2", "layer3"])
    pair, batch = ViTPair(d, student=staged_net(4), teacher=tiny_vit(1)), images16()
    pair.build(d, batch)
    assert all(isinstance(b, OfficialMapBranch) for b in d.branches)
    sep = [[m for m in b.body if isinstance(m, SepConv)] for b in d.branches]
    assert [len(s) for s in sep] == [2, 1, 0]
    assert [(blk[0].in_channels, blk[5].out_channels) for blk in sep[0]] == [(4, 8), (8, 16)]
    assert (sep[1][0][0].in_channels, sep[1][0][5].out_channels) == (8, 16)
    last = d.branches[2].body[0]
    assert isinstance(last, torch.nn.Conv2d) and (last.in_channels, last.out_channels, last.kernel_size) == (16, 16, (1, 1))
    feats = pair.student_outputs(batch).features
    for branch, name in zip(d.branches, d.stages):
        # before pooling: every stage reaches the last stage's 4x4 at 16 channels
        assert branch.body(feats[name]).shape == (4, 16, 4, 4)
        assert branch(feats[name]).shape == (4, 5)
    assert d.branches[0].fc.weight.std().item() == pytest.approx(0.02, rel=0.5)  # the authors' init
    assert torch.count_nonzero(d.branches[0].fc.bias) == 0
    wide = OFA(stages=["layer2", "layer3"], branch_width=24)
    ViTPair(wide, student=staged_net(4), teacher=tiny_vit(1)).build(wide, batch)
    assert wide.branches[0].body[0][5].out_channels == 24 and wide.branches[1].body[0].out_channels == 24


def test_official_token_branch_is_blocks_then_the_cls_token_then_linear():
    """Stages blocks.0, blocks.1 of 2: 1 block each (max(n - 1 - i, 1)); a 4x4 grid is below
    7 x 7, so no merging. The logits equal linear(blocks(x)[:, 0]) computed by hand."""
    d = OFA(stages=["blocks.0", "blocks.1"], student_prefix_tokens=1)
    pair, batch = vit_pair(d), images16()
    pair.build(d, batch)
    assert all(isinstance(b, OfficialTokenBranch) for b in d.branches)
    assert [len(b.blocks) for b in d.branches] == [1, 1] and len(d.branches[0].merge) == 0
    x = pair.student_outputs(batch).features["blocks.0"]
    branch = d.branches[0].eval()
    with torch.no_grad():
        expected = branch.fc(branch.blocks[0](x)[:, 0])
        assert torch.allclose(branch(x), expected, atol=1e-6)
        changed = x.clone()
        changed[:, 1:] = torch.randn_like(changed[:, 1:])  # patch tokens reach the CLS token through attention
        assert not torch.allclose(branch(changed), expected)
    three = OFA(stages=["blocks.0", "blocks.1", "norm"], student_prefix_tokens=1)
    deeper = ViTPair(three, student=tiny_vit(0, depth=3))
    deeper.build(three, batch)
    assert [len(b.blocks) for b in three.branches] == [2, 1, 1]


def test_patch_merging_concatenates_each_2x2_group_in_swins_order():
    torch.manual_seed(5)
    merge = PatchMerging((4, 4), dim=3, act=False)
    x = torch.randn(2, 16, 3)
    grid = x.view(2, 4, 4, 3)
    groups = []
    for y in range(2):
        for xx in range(2):  # Swin's order: (0,0), (1,0), (0,1), (1,1) within each 2x2 group
            groups.append(torch.cat([grid[:, 2 * y, 2 * xx], grid[:, 2 * y + 1, 2 * xx],
                                     grid[:, 2 * y, 2 * xx + 1], grid[:, 2 * y + 1, 2 * xx + 1]], dim=-1))
    expected = merge.reduction(merge.norm(torch.stack(groups, dim=1)))
    assert merge(x).shape == (2, 4, 3) and torch.allclose(merge(x), expected, atol=1e-6)
    # a 28x28 grid (patch 8 on 224) merges twice towards 7x7; GELU after the first only
    branch = OfficialTokenBranch(prefix_tokens=1, grid=(28, 28), dim=8, num_classes=5, blocks=1)
    assert len(branch.merge) == 2
    assert isinstance(branch.merge[0].act, torch.nn.GELU) and isinstance(branch.merge[1].act, torch.nn.Identity)
    assert branch(torch.randn(2, 1 + 28 * 28, 8)).shape == (2, 5)
    with pytest.raises(KdkitError, match="divisible by 4"):
        OfficialTokenBranch(prefix_tokens=1, grid=(4, 4), dim=6, num_classes=5, blocks=1)


def test_token_branch_mean_pools_layer_normed_patch_tokens_only():
    torch.manual_seed(2)
    branch = TokenBranch(prefix_tokens=2, dim=3, num_classes=4)
    x = torch.randn(2, 2 + 4, 3)
    expected = []
    for sample in x.tolist():
        pooled = [0.0, 0.0, 0.0]
        for token in sample[2:]:
            mean = sum(token) / 3
            var = sum((v - mean) ** 2 for v in token) / 3
            for j, v in enumerate(token):
                pooled[j] += (v - mean) / math.sqrt(var + 1e-5) / 4
        w, b = branch.fc.weight.tolist(), branch.fc.bias.tolist()
        expected.append([sum(w[k][j] * pooled[j] for j in range(3)) + b[k] for k in range(4)])
    out = branch(x)
    assert torch.allclose(out, torch.tensor(expected), atol=1e-5)
    changed = x.clone()
    changed[:, :2] = torch.randn(2, 2, 3)  # prefix tokens do not count
    assert torch.allclose(branch(changed), out)
    cls = TokenBranch(prefix_tokens=1, dim=3, num_classes=4, pool="cls")
    changed = x.clone()
    changed[:, 1:] = torch.randn(2, 5, 3)  # only the first token counts
    assert torch.allclose(cls(changed), cls(x))


def test_terms_are_the_loss_on_each_branch_with_its_gamma_and_weight():
    d = OFA(stages=["blocks.0", "blocks.1"], student_prefix_tokens=1, gamma=[0.5, 1.5, 2.0],
            stage_weight=[1.0, 2.0], final_weight=3.0, temperature=2.0)
    pair, batch = vit_pair(d), images16()
    pair.build(d, batch)
    d.eval()
    s, t = pair.student_outputs(batch), pair.teacher_outputs(batch)
    terms = d(s, t, batch)
    assert list(terms) == ["stage0", "stage1", "final"]
    y = batch["label"]
    with torch.no_grad():
        z0, z1 = d.branches[0](s.features["blocks.0"]), d.branches[1](s.features["blocks.1"])
    assert terms["stage0"].item() == pytest.approx(ofa_by_loops(z0, t.logits, y, 0.5, 2.0), rel=1e-5)
    assert terms["stage1"].item() == pytest.approx(2 * ofa_by_loops(z1, t.logits, y, 1.5, 2.0), rel=1e-5)
    assert terms["final"].item() == pytest.approx(3 * ofa_by_loops(s.logits, t.logits, y, 2.0, 2.0), rel=1e-5)
    # soft labels count as their argmax
    soft = dict(batch, label=F.one_hot(y, 5).float() * 0.9 + 0.02)
    assert d(s, t, soft)["stage1"].item() == pytest.approx(terms["stage1"].item(), rel=1e-6)


def test_final_false_gives_stage_terms_only():
    d = OFA(stages=["layer1"], final=False)
    pair, batch = Pair(d), image_batch()
    build(d, pair, batch)
    assert list(d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)) == ["stage0"]


# ---- gradients and precision ---------------------------------------------------------------

def _student_grads(student):
    return {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters()}


def test_vit_gradients_reach_tapped_stages_and_branches_not_later_blocks_or_teacher():
    d = OFA(stages=["blocks.0"], student_prefix_tokens=1, final=False)
    pair, batch = vit_pair(d), images16()
    pair.build(d, batch)
    terms = distill_backward(d, pair, batch)
    assert list(terms) == ["stage0"]
    grads = _student_grads(pair.student)
    reached = {n for n, g in grads.items() if g}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= reached
    assert any(n.startswith("blocks.0.") for n in reached)
    for n, p in pair.student.named_parameters():
        if n.startswith(("blocks.1.", "norm.", "head.")):
            assert p.grad is None, f"student {n} lies past the tapped stage"
    for n, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"branch {n} got no gradient"
    for n, p in pair.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, f"teacher {n} must not learn"


def test_vit_final_reaches_the_students_head():
    d = OFA(stages=["blocks.0"], student_prefix_tokens=1, final=True)
    pair, batch = vit_pair(d), images16()
    pair.build(d, batch)
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"stage0", "final"}
    grads = _student_grads(pair.student)
    assert grads["head.weight"] and grads["norm.weight"]
    assert all(grads.values()), [n for n, g in grads.items() if not g]


def test_cnn_student_vit_teacher_gradients():
    d = OFA(stages=["layer1"], final=False)
    pair, batch = ViTPair(d, student=staged_net(4), teacher=tiny_vit(1)), images16()
    pair.build(d, batch)
    distill_backward(d, pair, batch)
    assert_gradients(pair, d, ["conv1", "layer1"])


def test_cnn_final_reaches_every_student_module():
    d = OFA(stages=["layer1", "layer2"], final=True)
    pair, batch = Pair(d), image_batch()
    build(d, pair, batch)
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"stage0", "stage1", "final"}
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


# ---- errors --------------------------------------------------------------------------------

def test_untapped_or_unknown_stage():
    with pytest.raises(KdkitError, match="blocks.7"):
        vit_pair(OFA(stages=["blocks.7"], student_prefix_tokens=1))
    d = OFA(stages=["layer2"])
    with pytest.raises(KdkitError, match="'layer2'.*not captured"):
        d.build(Outputs(logits=torch.zeros(2, 5), features={"layer1": torch.zeros(2, 4, 8, 8)}),
                Outputs(logits=torch.zeros(2, 5)), None)


def test_tokens_need_a_prefix_count_that_leaves_a_grid():
    batch = images16()
    d = OFA(stages=["blocks.0"])
    pair = vit_pair(d)
    with pytest.raises(KdkitError, match=r"ofa\.student_prefix_tokens; .*\[1, 8\]"):
        pair.build(d, batch)
    d = OFA(stages=["blocks.0"], student_prefix_tokens=2)
    with pytest.raises(KdkitError, match="15 patch tokens"):
        vit_pair(d).build(d, batch)
    d = OFA(stages=["blocks.0"], student_prefix_tokens=0, token_pool="cls", branch="simple")
    tokens = Outputs(logits=torch.zeros(2, 5), features={"blocks.0": torch.zeros(2, 16, 8)})
    with pytest.raises(KdkitError, match="no CLS token"):
        d.build(tokens, Outputs(logits=torch.zeros(2, 5)), None)
    d = OFA(stages=["fc:input"])
    with pytest.raises(KdkitError, match=r"\(8,\): neither a map"):
        d.build(Outputs(logits=torch.zeros(2, 5), features={"fc:input": torch.zeros(2, 8)}),
                Outputs(logits=torch.zeros(2, 5)), None)


def test_labels_missing_or_misshapen():
    d = OFA(stages=["layer1"])
    pair, batch = Pair(d), image_batch()
    build(d, pair, batch)
    s, t = pair.student_outputs(batch), pair.teacher_outputs(batch)
    with pytest.raises(KdkitError, match=r"batch\['label'\].*\['image', 'index'\]"):
        d(s, t, {k: v for k, v in batch.items() if k != "label"})
    with pytest.raises(KdkitError, match=r"\(3,\).*\[6\]"):
        d(s, t, dict(batch, label=batch["label"][:3]))


def test_bad_settings():
    with pytest.raises(KdkitError, match="3 values"):
        OFA(stages=["layer1"], gamma=[1.0, 1.0, 1.0])
    with pytest.raises(KdkitError, match="gamma must be >= 0"):
        OFA(gamma=-1.0)
    with pytest.raises(KdkitError, match="stage_weight"):
        OFA(stages=["layer1", "layer2"], stage_weight=[1.0])
    with pytest.raises(KdkitError, match="temperature"):
        OFA(temperature=0.0)
    with pytest.raises(KdkitError, match="variant"):
        OFA(variant="focal")
    with pytest.raises(KdkitError, match="token_pool"):
        OFA(token_pool="max")
    with pytest.raises(KdkitError, match="stages"):
        OFA(stages=[])
    with pytest.raises(KdkitError, match="stages"):
        OFA(stages="layer1")


def test_student_and_teacher_logits_must_agree():
    d = OFA(stages=["layer1"])
    d.build(Outputs(logits=torch.zeros(2, 5), features={"layer1": torch.zeros(2, 4, 8, 8)}),
            Outputs(logits=torch.zeros(2, 5)), None)
    with pytest.raises(KdkitError, match=r"\(3,\).*\(5,\)"):
        d(Outputs(logits=torch.zeros(2, 3), features={"layer1": torch.zeros(2, 4, 8, 8)}),
          Outputs(logits=torch.zeros(2, 5)), {"label": torch.tensor([0, 1])})


# ---- configs -------------------------------------------------------------------------------

def test_yaml_instantiates_and_runs_on_a_cnn():
    d = from_yaml("ofa")
    assert d.stages == ["layer1", "layer2", "layer3"]
    assert (d.gammas, d.temperature, d.final, d.variant, d.weight) == ([1.0] * 4, 1.0, True, "paper", 1.0)
    assert (d.stage_weights, d.final_weight, d.token_pool, d.branch_width) == ([1.0] * 3, 1.0, "mean", None)
    pair, batch = Pair(d), image_batch()
    build(d, pair, batch)
    terms = distill_backward(d, pair, batch)
    assert list(terms) == ["stage0", "stage1", "stage2", "final"]
    assert all(v > 0 for v in terms.values())


def test_yaml_with_vit_stages_runs_under_bf16():
    node = OmegaConf.load(CONF / "ofa.yaml").ofa
    node.stages = ["blocks.0", "blocks.1"]
    node.student_prefix_tokens = 1
    node.gamma = [1.0, 1.0, 1.5]
    node.variant = "official"
    d = build_distiller(node)
    assert d.gammas == [1.0, 1.0, 1.5] and d.variant == "official"
    pair, batch = vit_pair(d), images16()
    pair.build(d, batch)
    terms = distill_backward(d, pair, batch)
    assert list(terms) == ["stage0", "stage1", "final"]
    assert all(v > 0 for v in terms.values())
