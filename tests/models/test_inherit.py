"""Weight inheritance (kdkit.models.inherit): block choice, whole-head width slices, errors.

Expected tensors are re-derived here with explicit indexing (q/k/v and heads looped over), not
with the module's own index lists.
"""

import re

import pytest
import torch
from open_clip.transformer import VisionTransformer as ClipViT
from timm.layers import GluMlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models.inherit import InheritReport, choose_blocks, inherit
from kdkit.teacher import FrozenTeacher

HEAD_DIM = 8
IMAGES = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def randomised(model):
    """Every parameter random (norms start at 1 / 0, biases at 0): a wrong copy then shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def timm_vit(dim=24, depth=4, heads=3, classes=5, seed=0, cls=VisionTransformer, **kw):
    torch.manual_seed(seed)
    return randomised(cls(img_size=16, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads,
                          num_classes=classes, **kw))


def clip_vit(width=24, layers=3, heads=3, mlp_ratio=4.0, output_dim=8, seed=0, **kw):
    torch.manual_seed(seed)
    return randomised(ClipViT(image_size=16, patch_size=4, width=width, layers=layers, heads=heads,
                              mlp_ratio=mlp_ratio, output_dim=output_dim, **kw))


class Classifier(nn.Module):
    """A wrapper: an open_clip tower and a linear head on its (pre-projection) class token."""

    def __init__(self, width, heads, classes=4, seed=0):
        super().__init__()
        self.visual = clip_vit(width=width, heads=heads, seed=seed)
        self.head = randomised(nn.Linear(width, classes))
        self.temperature = nn.Parameter(torch.tensor([seed + 1.0]))


def fused_rows(t, parts, heads, teacher_width):
    """Rows of ``heads`` whole heads from each of ``parts`` fused projections, by loops."""
    rows = []
    for part in range(parts):
        for h in range(heads):
            start = part * teacher_width + h * HEAD_DIM
            rows.append(t[start:start + HEAD_DIM])
    return torch.cat(rows)


def expected_value(name, t, shape, teacher_width):
    """What student tensor ``name`` of ``shape`` must hold, derived from teacher tensor ``t``."""
    if name.endswith(("attn.qkv.weight", "attn.in_proj_weight", "attn.qkv.bias", "attn.in_proj_bias")):
        out = fused_rows(t, 3, shape[0] // 3 // HEAD_DIM, teacher_width)
        return out[:, :shape[1]] if t.dim() == 2 else out
    if name.endswith(("attn.proj.weight", "attn.out_proj.weight")):  # D_s rows, first heads' columns
        return t[:shape[0], :shape[1]]
    if name.endswith(("mlp.fc1.weight", "mlp.c_fc.weight")):
        return t[:shape[0], :shape[1]]
    if name.endswith("patch_embed.proj.weight") or name.endswith("conv1.weight"):
        return t[:shape[0], :, :, :]
    return t[tuple(slice(0, n) for n in shape)]  # norms, biases, tokens, heads: leading slices


def teacher_name(name, chosen, prefix=""):
    """The teacher tensor a student tensor comes from: block j -> block chosen[j]."""
    return prefix + re.sub(r"(blocks|resblocks)\.(\d+)\.", lambda m: f"{m[1]}.{chosen[int(m[2])]}.", name)


def check_copies(report, student, init, teacher, chosen, kept=(), special=None, prefix=""):
    """Every student tensor is the expected teacher slice, or (kept) unchanged from its init."""
    special = special or {}
    t_params = dict(teacher.named_parameters())
    names = [n for n, _ in student.named_parameters()]
    teacher_width = next(m for m in teacher.modules()
                         if isinstance(m, VisionTransformer | ClipViT))
    teacher_width = getattr(teacher_width, "embed_dim", None) or teacher_width.transformer.width
    assert sorted(report.kept) == sorted(kept)
    assert set(report.copied) == set(names) - set(kept)
    assert report.blocks == list(chosen)
    for name, p in student.named_parameters():
        if name in kept:
            assert torch.equal(p, init[name]), name
            continue
        t_name = teacher_name(name, chosen, prefix)
        assert report.copied[name][0] == t_name
        t = t_params[t_name]
        want = special[name](t) if name in special else expected_value(name, t, p.shape, teacher_width)
        assert want.shape == p.shape, name
        assert torch.equal(p, want.to(p.dtype)), name
        assert not torch.equal(init[name], p), f"{name} did not change: the test cannot tell"


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- block choice -------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher,student,want", [
    (6, 3, [1, 3, 5]), (4, 2, [1, 3]), (12, 4, [2, 5, 8, 11]), (12, 5, [2, 4, 7, 9, 11]),
    (4, 4, [0, 1, 2, 3]), (5, 1, [4]),
])
def test_every_takes_the_last_block_of_each_group(teacher, student, want):
    assert choose_blocks("every", teacher, student) == want


def test_first_last_and_lists():
    assert choose_blocks("first", 6, 2) == [0, 1]
    assert choose_blocks("last", 6, 2) == [4, 5]
    assert choose_blocks([5, 0], 6, 2) == [5, 0]
    assert choose_blocks((0, 2, 5), 6, 3) == [0, 2, 5]


@pytest.mark.parametrize("blocks,words", [
    ([0], ["1 entries", "student has 2", "teacher depth 4"]),
    ([0, 4], ["[4] out of range 0..3", "student depth 2"]),
    ([-1, 2], ["[-1] out of range"]),
    ([1, 1], ["repeats", "[1]"]),
    ([0.5, 1], ["integers"]),
    ("evry", ["'evry'", "closest: every"]),
    (3, ["blocks=3"]),
])
def test_bad_block_lists(blocks, words):
    with pytest.raises(KdkitError) as err:
        choose_blocks(blocks, 4, 2)
    for word in words:
        assert word in str(err.value)


def test_student_deeper_than_teacher():
    with pytest.raises(KdkitError, match="student depth 3, teacher depth 2"):
        choose_blocks("every", 2, 3)


# ---- timm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks,chosen", [([3, 0], [3, 0]), ("every", [1, 3])])
def test_timm_equal_width_copies_exactly_the_chosen_blocks(blocks, chosen):
    teacher, student = timm_vit(), timm_vit(depth=2, seed=1)
    init, params = snapshot(student), [id(p) for p in student.parameters()]
    report = inherit(student, teacher, blocks=blocks)
    check_copies(report, student, init, teacher, chosen)
    assert [id(p) for p in student.parameters()] == params  # same parameter objects
    assert str(report) == f"inherited 32 of 32 tensors from teacher blocks {chosen}; kept at init: none"


def test_timm_narrower_student_takes_whole_heads():
    teacher = timm_vit(dim=24, heads=3)
    student = timm_vit(dim=16, heads=2, depth=2, seed=1).double()  # dtype stays the student's
    init = snapshot(student)
    report = inherit(student, teacher, blocks=[0, 2], width="first")
    check_copies(report, student, init, teacher, [0, 2])
    assert all(p.dtype == torch.float64 for p in student.parameters())
    qkv = student.blocks[0].attn.qkv.weight
    assert qkv.shape == (48, 16)
    # whole heads of q, k and v, not the first 48 rows of the fused weight (which miss v)
    assert not torch.equal(qkv, teacher.blocks[0].attn.qkv.weight[:48, :16].double())
    assert torch.equal(qkv[32:40], teacher.blocks[0].attn.qkv.weight[48:56, :16].double())  # v head 0
    assert torch.equal(student.blocks[1].mlp.fc2.weight, teacher.blocks[2].mlp.fc2.weight[:16, :64].double())


def test_timm_forward_equals_the_teacher_through_the_chosen_blocks():
    teacher = timm_vit()
    student = timm_vit(seed=1)
    inherit(student, teacher, blocks="every")  # depth 4 of 4: all blocks
    with torch.no_grad():
        assert torch.equal(student(IMAGES), teacher(IMAGES))
        student = timm_vit(depth=2, seed=1)
        inherit(student, teacher, blocks=[0, 3])
        x = teacher._pos_embed(teacher.patch_embed(IMAGES))
        for i in (0, 3):
            x = teacher.blocks[i](x)
        by_hand = teacher.head(teacher.norm(x)[:, 0])
        assert torch.allclose(student(IMAGES), by_hand, atol=1e-6)
        assert not torch.allclose(teacher(IMAGES), by_hand, atol=1e-3)  # the subset matters


def test_distilled_student_from_a_plain_teacher_keeps_its_dist_token():
    teacher = timm_vit(dim=24, heads=3)
    student = timm_vit(dim=16, heads=2, depth=2, seed=1, cls=VisionTransformerDistilled)
    init = snapshot(student)
    report = inherit(student, teacher)
    kept = ["dist_token", "head_dist.weight", "head_dist.bias"]

    def pos_embed(t):  # rows: cls <- teacher cls, dist <- own init, patches <- teacher patches
        return torch.cat([t[:, :1, :16], init["pos_embed"][:, 1:2], t[:, 1:, :16]], dim=1)

    check_copies(report, student, init, teacher, [1, 3], kept=kept, special={"pos_embed": pos_embed})
    assert report.partly == ["pos_embed"]
    assert report.copied["pos_embed"][1][1] == [0, None] + list(range(1, 17))
    assert str(report) == ("inherited 32 of 35 tensors from teacher blocks [1, 3]; kept at init: dist_token, "
                           "head_dist.weight, head_dist.bias; partly inherited: pos_embed")
    assert set(report.reasons) == set(kept) and "no dist_token" in report.reasons["dist_token"]


def test_distilled_teacher_to_distilled_student_is_exact():
    teacher = timm_vit(cls=VisionTransformerDistilled)
    student = timm_vit(cls=VisionTransformerDistilled, seed=1)
    report = inherit(student, teacher, blocks="first", width=None)
    assert report.kept == []
    with torch.no_grad():
        assert torch.equal(student(IMAGES), teacher(IMAGES))


def test_plain_student_from_a_distilled_teacher_drops_the_dist_row():
    teacher = timm_vit(cls=VisionTransformerDistilled)
    student = timm_vit(depth=2, seed=1)
    init = snapshot(student)
    report = inherit(student, teacher)

    def pos_embed(t):  # teacher rows: cls, dist, patches
        return torch.cat([t[:, :1], t[:, 2:]], dim=1)

    check_copies(report, student, init, teacher, [1, 3], special={"pos_embed": pos_embed})


def test_other_class_count_keeps_the_head():
    teacher, student = timm_vit(classes=5), timm_vit(classes=3, depth=2, seed=1)
    init = snapshot(student)
    report = inherit(student, teacher)
    check_copies(report, student, init, teacher, [1, 3], kept=["head.weight", "head.bias"])
    assert "[3, 24] vs teacher head.weight [5, 24]" in report.reasons["head.weight"]


def test_glu_mlp_keeps_value_and_gate_halves():
    glu = GluMlp
    teacher = timm_vit(dim=24, heads=3, mlp_layer=glu)
    student = timm_vit(dim=16, heads=2, depth=2, seed=1, mlp_layer=glu)
    init = snapshot(student)
    report = inherit(student, teacher)
    assert teacher.blocks[0].mlp.fc1.weight.shape == (96, 24) and student.blocks[0].mlp.fc1.weight.shape == (64, 16)
    special = {f"blocks.{j}.mlp.fc1.{kind}": (lambda t: torch.cat([t[0:32], t[48:80]])[..., :16]
                                                if t.dim() == 2 else torch.cat([t[0:32], t[48:80]]))
               for j in range(2) for kind in ("weight", "bias")}
    check_copies(report, student, init, teacher, [1, 3], special=special)


# ---- open_clip ----------------------------------------------------------------------------------
def clip_forward_through(vit, blocks, images):
    x = vit._embeds(images)
    for i in blocks:
        x = vit.transformer.resblocks[i](x)
    pooled, _ = vit._pool(x)
    return pooled @ vit.proj


@pytest.mark.parametrize("blocks,chosen", [("last", [1, 2]), ([2, 0], [2, 0])])
def test_open_clip_equal_width_subset(blocks, chosen):
    teacher, student = clip_vit(), clip_vit(layers=2, seed=1)
    init = snapshot(student)
    report = inherit(student, teacher, blocks=blocks)
    check_copies(report, student, init, teacher, chosen)
    with torch.no_grad():
        assert torch.allclose(student(IMAGES), clip_forward_through(teacher, chosen, IMAGES), atol=1e-6)


def test_open_clip_all_blocks_is_the_teacher():
    teacher, student = clip_vit(), clip_vit(seed=1)
    inherit(student, teacher, blocks="every", width=None)
    with torch.no_grad():
        assert torch.equal(student(IMAGES), teacher(IMAGES))


def test_open_clip_narrower_student_and_other_output_width():
    teacher = clip_vit(width=24, heads=3, layers=3)
    student = clip_vit(width=16, heads=2, layers=2, mlp_ratio=2.0, output_dim=6, seed=1)
    init = snapshot(student)
    report = inherit(student, teacher, blocks=[0, 2])
    check_copies(report, student, init, teacher, [0, 2], kept=["proj"])
    w = student.transformer.resblocks[1].attn.in_proj_weight
    t = teacher.transformer.resblocks[2].attn.in_proj_weight
    assert torch.equal(w[16:24], t[24:32, :16])  # k, head 0
    assert torch.equal(student.transformer.resblocks[1].mlp.c_proj.weight,
                       teacher.transformer.resblocks[2].mlp.c_proj.weight[:16, :32])


def test_wrapper_inherits_the_tower_and_the_head_through_a_frozen_teacher():
    teacher = FrozenTeacher(Classifier(width=24, heads=3))
    student = Classifier(width=16, heads=2, seed=1)
    init = snapshot(student)
    report = inherit(student, teacher, blocks="every")
    check_copies(report, student, init, teacher, [0, 1, 2], prefix="model.")
    assert report.copied["head.weight"] == ("model.head.weight", (slice(0, 4), slice(0, 16)))
    assert report.copied["temperature"][0] == "model.temperature"


def test_wrapper_head_with_other_classes_is_kept():
    teacher, student = Classifier(width=24, heads=3, classes=4), Classifier(width=16, heads=2, classes=7, seed=1)
    init = snapshot(student)
    report = inherit(student, teacher)
    check_copies(report, student, init, teacher, [0, 1, 2], kept=["head.weight", "head.bias"])


def test_tower_from_a_whole_clip_teacher():
    from open_clip.model import CLIP

    torch.manual_seed(0)
    teacher = CLIP(embed_dim=8, vision_cfg=dict(image_size=16, patch_size=4, width=24, layers=2, head_width=8),
                   text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    randomised(teacher)
    student = clip_vit(width=16, heads=2, layers=1, seed=1)
    init = snapshot(student)
    report = inherit(student, teacher)
    check_copies(report, student, init, teacher, [1], prefix="visual.")


# ---- errors -------------------------------------------------------------------------------------
def raises(student, teacher, *words, **kw):
    before = snapshot(student)
    with pytest.raises(KdkitError) as err:
        inherit(student, teacher, **kw)
    for word in words:
        assert word in str(err.value), str(err.value)
    after = snapshot(student)
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing copied
    return str(err.value)


def test_head_dim_mismatch_names_both_layouts_and_what_fits():
    raises(timm_vit(dim=16, heads=4, depth=2), timm_vit(dim=24, heads=3), "head_dim",
           "4 heads x head_dim 4", "3 heads x head_dim 8", "num_heads=2")
    raises(clip_vit(width=12, heads=2, layers=2), clip_vit(), "multiple of 8")


def test_wider_student():
    raises(timm_vit(dim=32, heads=4, depth=2), timm_vit(dim=24, heads=3), "wider", "width 32", "width 24")
    raises(clip_vit(width=24, heads=3, mlp_ratio=8.0, layers=2), clip_vit(), "MLP 192", "MLP 96")


def test_different_patch_grids():
    torch.manual_seed(0)
    student = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5)
    raises(student, timm_vit(), "2x2 patches of 8x8 px", "4x4 patches of 4x4 px", "5 position rows", "17 position rows")
    raises(clip_vit(), ClipViT(image_size=32, patch_size=4, width=24, layers=3, heads=3, mlp_ratio=4.0),
           "4x4 patches", "8x8 patches")


def test_block_list_errors_through_inherit():
    raises(timm_vit(depth=2), timm_vit(), "3 entries", "student has 2", blocks=[0, 1, 2])
    raises(timm_vit(depth=2), timm_vit(), "[7] out of range 0..3", blocks=[0, 7])


def test_not_a_vit():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    raises(cnn, timm_vit(), "student Sequential", "no vision transformer", "0.weight [8, 3, 3, 3]")
    raises(timm_vit(), cnn, "teacher Sequential")


def test_other_errors():
    raises(clip_vit(layers=2), timm_vit(), "open_clip", "timm", "same family")
    raises(timm_vit(dim=16, heads=2, depth=2), timm_vit(), "width=null", "width 16", "width 24", width=None)
    raises(timm_vit(depth=2), timm_vit(), "width='last'", width="last")
    two = nn.ModuleDict({"a": timm_vit(depth=1), "b": timm_vit(depth=1)})
    raises(two, timm_vit(), "2 vision transformers (at a, b)")
    # a dim that must match (input channels) fails while planning: the student stays untouched
    torch.manual_seed(0)
    gray = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=2, num_heads=3, num_classes=5)
    raises(gray, timm_vit(), "patch_embed.proj.weight [24, 1, 4, 4]", "[24, 3, 4, 4]", "dim 1")


def test_report_is_a_dataclass_with_defaults():
    report = InheritReport(blocks=[0])
    assert str(report) == "inherited 0 of 0 tensors from teacher blocks [0]; kept at init: none"


def test_called_with_a_yaml_node():
    from omegaconf import OmegaConf

    init_cfg = OmegaConf.create("blocks: [3, 1]\nwidth: first\n")
    teacher, student = timm_vit(), timm_vit(dim=16, heads=2, depth=2, seed=1)
    init = snapshot(student)
    report = inherit(student, teacher, **init_cfg)
    check_copies(report, student, init, teacher, [3, 1])
