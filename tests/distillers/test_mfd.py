import pytest
import torch
from omegaconf import OmegaConf

from kdkit.distillers.mfd import (MFD, VISIBLE_KEY, draw_visible, masked_count, masked_feature_loss,
                                  visible_at)
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.tasks.classification import ClassificationTask
from kdkit.teachers import build_distiller

from .vit_helpers import ViTPair, tiny_vit
from .helpers import CONF, Pair, build, distill_backward, from_yaml, image_batch


def images(n: int = 4, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=g), "label": torch.randint(0, 5, (n,), generator=g),
            "index": torch.arange(10, 10 + n)}


def vit_mfd(**kwargs) -> MFD:
    args = dict(student_feature="blocks.0", teacher_feature="blocks.1", student_prefix_tokens=1,
                teacher_prefix_tokens=1, patch_size=4)
    return MFD(**{**args, **kwargs})


# ---- the mask ------------------------------------------------------------------------------

@pytest.mark.parametrize("size, patch, ratio, masked", [(16, 4, 0.5, 8), (16, 4, 0.75, 12), (28, 4, 0.5, 25),
                                                         (16, 2, 0.9, 58), (16, 4, 0.0, 0)])
def test_each_image_has_round_ratio_masked_patches(size, patch, ratio, masked):
    assert masked_count((size // patch) ** 2, ratio) == masked
    d = MFD(mask_ratio=ratio, patch_size=patch)
    out = d.student_batch(images(5, size))
    visible = out[VISIBLE_KEY]
    assert visible.dtype == torch.bool and visible.shape == (5, size // patch, size // patch)
    assert (~visible).flatten(1).sum(1).tolist() == [masked] * 5


def test_masked_pixels_are_zero_visible_pixels_untouched_and_the_batch_is_new():
    batch = images(3)
    saved = {k: v.clone() for k, v in batch.items()}
    keys = set(batch)
    out = MFD(mask_ratio=0.5, patch_size=4).student_batch(batch)
    assert out is not batch and set(batch) == keys  # the given dict is not mutated
    assert all(torch.equal(batch[k], saved[k]) for k in keys)
    assert out["label"] is batch["label"] and out["index"] is batch["index"]
    visible = out[VISIBLE_KEY]
    for b in range(3):
        for y in range(4):
            for x in range(4):
                patch = out["image"][b, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4]
                if visible[b, y, x]:
                    assert torch.equal(patch, batch["image"][b, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4])
                else:
                    assert torch.count_nonzero(patch) == 0


def test_masks_depend_on_seed_step_and_index_only():
    index = torch.tensor([3, 7, 11, 20])
    base = draw_visible(index, (4, 4), 0.5, seed=0, step=5)
    assert torch.equal(base, draw_visible(index, (4, 4), 0.5, seed=0, step=5))  # reproducible
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(base[order], draw_visible(index[order], (4, 4), 0.5, seed=0, step=5))  # per sample
    assert torch.equal(base[1:2], draw_visible(index[1:2], (4, 4), 0.5, seed=0, step=5))  # batch-independent
    assert not torch.equal(base, draw_visible(index, (4, 4), 0.5, seed=0, step=6))
    assert not torch.equal(base, draw_visible(index, (4, 4), 0.5, seed=1, step=5))
    assert len({tuple(m.flatten().tolist()) for m in base}) > 1  # samples differ
    d = MFD(mask_ratio=0.5, patch_size=4)
    d.set_progress(0, 5)
    batch = {"image": torch.ones(4, 3, 16, 16), "index": index}
    assert torch.equal(d.student_batch(batch)[VISIBLE_KEY], base)  # the step is self.progress's


def test_visible_at_other_grids_is_area_resizing():
    visible = torch.tensor([[[1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]]], dtype=torch.bool)
    assert torch.equal(visible_at(visible, (4, 4)), visible.float())
    coarse = visible_at(visible, (2, 2))
    expected = [[visible[0, 2 * y:2 * y + 2, 2 * x:2 * x + 2].float().mean().item() for x in range(2)]
                for y in range(2)]
    assert coarse[0].tolist() == expected == [[1.0, 0.75], [0.75, 1.0]]
    fine = visible_at(visible, (8, 8))
    assert torch.equal(fine, visible.repeat_interleave(2, 1).repeat_interleave(2, 2).float())  # nearest


# ---- the loss ------------------------------------------------------------------------------

def mfd_by_loops(f_s, f_t, visible, loss="mse", normalize=False):
    """Weighted by each position's visible fraction (0 / 1 on the mask's own grid)."""
    b, c, h, w = f_s.shape
    total, count = 0.0, 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                v = float(visible[i, y, x])
                if v == 0:
                    continue
                s, t = f_s[i, :, y, x].tolist(), f_t[i, :, y, x].tolist()
                if normalize:
                    ns, nt = sum(u * u for u in s) ** 0.5, sum(u * u for u in t) ** 0.5
                    s, t = [u / ns for u in s], [u / nt for u in t]
                total += v * sum((p - q) ** 2 if loss == "mse" else abs(p - q) for p, q in zip(s, t))
                count += v * c
    return total / count


def test_loss_matches_loops_over_visible_positions():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    visible = torch.rand(3, 4, 4) > 0.5
    for loss, normalize in (("mse", False), ("l1", False), ("l1", True), ("mse", True)):
        assert masked_feature_loss(f_s, f_t, visible, loss, normalize).item() == pytest.approx(
            mfd_by_loops(f_s, f_t, visible, loss, normalize), rel=1e-5)
    fractions = torch.rand(3, 4, 4) * visible  # area-resized masks: weights in [0, 1]
    assert masked_feature_loss(f_s, f_t, fractions).item() == pytest.approx(
        mfd_by_loops(f_s, f_t, fractions), rel=1e-5)
    assert masked_feature_loss(f_s, f_t, torch.zeros(3, 4, 4, dtype=torch.bool)).item() == 0.0
    # masked positions drop out whatever their values, inf included
    f_inf = torch.where(visible[:, None], f_s, torch.full_like(f_s, float("inf")))
    assert masked_feature_loss(f_inf, f_t, visible).item() == pytest.approx(
        masked_feature_loss(f_s, f_t, visible).item(), rel=1e-6)


def test_forward_through_the_linear_adapter_matches_loops_and_ignores_masked_positions():
    torch.manual_seed(1)
    d = MFD(student_feature="s", teacher_feature="t", student_prefix_tokens=1, teacher_prefix_tokens=1)
    s, t = torch.randn(2, 1 + 16, 8), torch.randn(2, 1 + 16, 12)
    d.build(Outputs(features={"s": s}), Outputs(features={"t": t}), None)
    batch = d.student_batch({"image": torch.rand(2, 3, 16, 16), "index": torch.tensor([0, 1])})
    visible = batch[VISIBLE_KEY]
    loss = d(Outputs(features={"s": s}), Outputs(features={"t": t}), batch)["loss"]
    lin = d.adapter.linear
    with torch.no_grad():
        total, count = 0.0, 0
        for b in range(2):
            for pos in range(16):
                if visible[b, pos // 4, pos % 4]:
                    r = lin.weight @ s[b, 1 + pos] + lin.bias
                    total += ((r - t[b, 1 + pos]) ** 2).sum().item()
                    count += 12
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # new values at the masked patch tokens (both sides) and at the CLS tokens: the same loss
    masked_tokens = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~visible.flatten(1)], 1)
    s2 = torch.where(masked_tokens[..., None], torch.randn_like(s) * 100, s)
    t2 = torch.where(masked_tokens[..., None], torch.randn_like(t) * 100, t)
    loss2 = d(Outputs(features={"s": s2}), Outputs(features={"t": t2}), batch)["loss"]
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    # while a visible token changes it
    b, pos = (visible.flatten(1)).nonzero()[0].tolist()
    s3 = s.clone()
    s3[b, 1 + pos] += 1.0
    assert d(Outputs(features={"s": s3}), Outputs(features={"t": t}), batch)["loss"].item() != pytest.approx(
        loss.item(), rel=1e-6)


def test_tokens_onto_a_coarser_map_weigh_cells_by_their_visible_area():
    torch.manual_seed(2)
    d = MFD(student_feature="s", teacher_feature="t", student_prefix_tokens=1, adapter=True)
    s, t = torch.randn(2, 1 + 16, 8), torch.randn(2, 6, 2, 2)  # ViT 4x4 grid onto a 2x2 map
    d.build(Outputs(features={"s": s}), Outputs(features={"t": t}), None)
    batch = d.student_batch({"image": torch.rand(2, 3, 16, 16), "index": torch.tensor([4, 5])})
    d.eval()  # BatchNorm in eval: position-wise, so the comparison below is exact
    loss = d(Outputs(features={"s": s}), Outputs(features={"t": t}), batch)["loss"]
    with torch.no_grad():
        s_map = d.adapter(s, (2, 2))
    visible = batch[VISIBLE_KEY]
    cells = torch.tensor([[[visible[b, 2 * y:2 * y + 2, 2 * x:2 * x + 2].float().mean().item() for x in range(2)]
                           for y in range(2)] for b in range(2)])
    assert loss.item() == pytest.approx(mfd_by_loops(s_map, t, cells), rel=1e-5)


@pytest.mark.parametrize("student_shape", [(2, 1 + 16, 8), (2, 8, 4, 4)])
def test_onto_a_finer_token_grid_each_token_takes_its_patch_visibility(student_shape):
    """ViT tokens (4x4 grid) or a CNN map (4x4) onto teacher tokens of an 8x8 grid (with CLS):
    the grid adapters drop the teacher's prefix; the mask goes to 8x8 by nearest."""
    torch.manual_seed(3)
    d = MFD(student_feature="s", teacher_feature="t", student_prefix_tokens=1, teacher_prefix_tokens=1)
    s, t = torch.randn(*student_shape), torch.randn(2, 1 + 64, 6)
    d.build(Outputs(features={"s": s}), Outputs(features={"t": t}), None)
    batch = d.student_batch({"image": torch.rand(2, 3, 16, 16), "index": torch.tensor([6, 7])})
    d.eval()
    loss = d(Outputs(features={"s": s}), Outputs(features={"t": t}), batch)["loss"]
    with torch.no_grad():
        r = d.adapter(s)  # [2, 64, 6] patch tokens on the teacher's grid
    visible = batch[VISIBLE_KEY]
    total, count = 0.0, 0
    for b in range(2):
        for pos in range(64):
            if visible[b, pos // 8 // 2, pos % 8 // 2]:
                total += ((r[b, pos] - t[b, 1 + pos]) ** 2).sum().item()
                count += 6
    assert r.shape == (2, 64, 6) and loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("masking", ["pixels", "tokens"])
def test_gradients_reach_the_student_and_adapter_only(masking):
    d = vit_mfd(masking=masking)
    pair = ViTPair(d)
    batch = images()
    pair.build(d, batch)
    terms = distill_backward(d, pair, d.student_batch(batch))
    assert terms["loss"] > 0
    reached = {n for n, p in pair.student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"} <= reached
    assert not any(n.startswith(("blocks.1", "norm", "head")) for n in reached)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    assert all(not p.requires_grad and p.grad is None for p in pair.teacher.parameters())


def test_only_the_training_student_sees_masked_images():
    d = vit_mfd()
    task = ClassificationTask(tiny_vit(0), tiny_vit(1, embed_dim=24), num_classes=5, distillers={"mfd": d},
                              optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1))
    seen = {"student": [], "teacher": []}
    task.student.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0].clone()))
    task.teacher.model.register_forward_pre_hook(lambda m, args: seen["teacher"].append(args[0].clone()))
    batch = images()
    task.build(batch)
    seen["student"].clear()
    seen["teacher"].clear()
    losses, _ = task.losses(batch)
    assert torch.isfinite(losses["mfd"]) and VISIBLE_KEY not in batch
    (student_input,), (teacher_input,) = seen["student"], seen["teacher"]
    assert torch.equal(teacher_input, batch["image"])  # the teacher: the full image
    masked = d.student_batch(batch)["image"]  # step 0 both times: the same mask
    assert torch.equal(student_input, masked) and not torch.equal(student_input, batch["image"])
    task.update_metrics = lambda stage, out, b: None
    task.eval_step("val", batch)
    assert torch.equal(seen["student"][-1], batch["image"])  # evaluation: never masked


def test_errors():
    with pytest.raises(KdkitError, match="mask_ratio"):
        MFD(mask_ratio=1.0)
    with pytest.raises(KdkitError, match=r"patch_size=5 does not divide the image size 16x16.*\[1, 2, 4, 8, 16\]"):
        MFD(patch_size=5).student_batch(images())
    with pytest.raises(KdkitError, match="masks all 2x2"):
        MFD(patch_size=8, mask_ratio=0.9).student_batch(images())
    with pytest.raises(KdkitError, match="index"):
        MFD().student_batch({"image": torch.rand(2, 3, 16, 16)})
    d = MFD(student_feature="s", teacher_feature="t", adapter=False)
    fmap = torch.zeros(2, 4, 4, 4)
    with pytest.raises(KdkitError, match="no 'mfd/visible' mask"):
        d(Outputs(features={"s": fmap}), Outputs(features={"t": fmap}), {})
    with pytest.raises(KdkitError, match=r"student shape \(5,\) and teacher shape \(4, 4, 4\)"):
        d.build(Outputs(features={"s": torch.zeros(2, 5)}), Outputs(features={"t": fmap}), None)
    with pytest.raises(KdkitError, match=r"student shape \(8, 4, 4\) does not match teacher shape \(4, 4, 4\)"):
        d.build(Outputs(features={"s": torch.zeros(2, 8, 4, 4)}), Outputs(features={"t": fmap}), None)
    d = MFD(student_feature="s", teacher_feature="t")  # tokens onto a map need the student's prefix
    both = r"student_prefix_tokens.*\(student shape \(17, 8\), teacher shape \(4, 4, 4\)\)"
    with pytest.raises(KdkitError, match=both):
        d.build(Outputs(features={"s": torch.zeros(2, 17, 8)}), Outputs(features={"t": fmap}), None)


def test_yaml_instantiates_and_runs():
    d = from_yaml("mfd")
    assert (d.student_feature, d.teacher_feature, d.mask_ratio, d.patch_size) == ("layer3", "layer3", 0.5, 4)
    assert (d.use_adapter, d.loss, d.normalize, d.seed, d.weight) == (True, "mse", False, 0, 1.0)
    pair, batch = Pair(d), image_batch()  # CNNs at 8x8: a 2x2 mask grid, layer3 2x2 maps
    build(d, pair, batch)
    assert distill_backward(d, pair, d.student_batch(batch))["loss"] > 0
    node = OmegaConf.load(CONF / "mfd.yaml")["mfd"]
    node.merge_with({"student_feature": "blocks.1", "teacher_feature": "blocks.1",
                     "student_prefix_tokens": 1, "teacher_prefix_tokens": 1, "mask_ratio": 0.75})
    d = build_distiller(node)
    pair, batch = ViTPair(d), images()
    build(d, pair, batch)
    masked = d.student_batch(batch)
    assert (~masked[VISIBLE_KEY]).flatten(1).sum(1).tolist() == [12] * 4
    assert distill_backward(d, pair, masked)["loss"] > 0


# ---- masking: tokens (MAE-style token dropping in a ViT student) ----------------------------

def token_mfd(**kwargs) -> MFD:
    return vit_mfd(masking="tokens", **kwargs)


def tokens_entering_blocks(model) -> list[torch.Tensor]:
    seen = []
    model.blocks.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("distilled", [False, True])
def test_token_masking_feeds_the_blocks_the_prefix_and_the_visible_patches_in_order(distilled):
    prefix = 2 if distilled else 1
    d = token_mfd(student_prefix_tokens=prefix)
    pair = ViTPair(d, student=tiny_vit(0, distilled=distilled))
    batch = images()
    pair.build(d, batch)
    seen = tokens_entering_blocks(pair.student)
    masked = d.student_batch(batch)
    assert torch.equal(masked["image"], batch["image"])  # the full image: tokens are dropped, not pixels
    pair.student(masked["image"])
    with torch.no_grad():  # what the blocks would get without dropping: patch embedding + positions
        full = pair.student._pos_embed(pair.student.patch_embed(batch["image"]))
    visible = masked[VISIBLE_KEY].flatten(1)
    assert seen[-1].shape == (4, prefix + 8, 16)
    for b in range(4):
        positions = visible[b].nonzero().flatten().tolist()  # row-major patch order
        expected = torch.cat([full[b, :prefix], full[b, prefix + torch.tensor(positions)]])
        assert torch.equal(seen[-1][b], expected)
    pair.student(batch["image"])  # the next forward nobody armed (evaluation): every token
    assert seen[-1].shape == (4, prefix + 16, 16) and torch.equal(seen[-1], full)


def test_token_masking_with_every_patch_visible_is_the_plain_forward():
    d = token_mfd(mask_ratio=0.0)
    pair = ViTPair(d)
    batch = images()
    pair.build(d, batch)
    pair.student.eval()
    with torch.no_grad():
        plain = pair.student(batch["image"])
        dropped = pair.student(d.student_batch(batch)["image"])
    assert torch.equal(plain, dropped)


@pytest.mark.parametrize("teacher_kind", ["vit_same_grid", "cnn_finer_map"])
def test_token_loss_matches_loops_over_the_visible_patches(teacher_kind):
    """Student patch j (the j-th visible, row-major) through the linear adapter against the
    teacher's feature at that patch: its token on the same 4x4 grid, or the mean of the 2x2
    cells it covers on an 8x8 map."""
    torch.manual_seed(4)
    if teacher_kind == "vit_same_grid":
        d = token_mfd(student_feature="blocks.1", teacher_feature="blocks.1")
        teacher = tiny_vit(1, embed_dim=24)
    else:
        d = token_mfd(student_feature="blocks.1", teacher_feature="conv", teacher_prefix_tokens=None)
        teacher = torch.nn.Sequential()
        teacher.add_module("conv", torch.nn.Conv2d(3, 6, 2, stride=2))  # 16x16 -> 8x8 map
        teacher.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
        teacher.add_module("flat", torch.nn.Flatten())
        teacher.add_module("fc", torch.nn.Linear(6, 5))
    pair = ViTPair(d, teacher=teacher)
    batch = images()
    pair.build(d, batch)
    masked = d.student_batch(batch)
    s, t = pair.student_outputs(masked), pair.teacher_outputs(batch)
    loss = d(s, t, masked)["loss"]
    s_tok, t_feat = s.features["blocks.1"], t.features[d.teacher_feature]
    lin = d.adapter
    visible = masked[VISIBLE_KEY].flatten(1)
    with torch.no_grad():
        total, count = 0.0, 0
        for b in range(4):
            for j, pos in enumerate(visible[b].nonzero().flatten().tolist()):
                r = lin.weight @ s_tok[b, 1 + j] + lin.bias
                y, x = divmod(pos, 4)
                if teacher_kind == "vit_same_grid":
                    target = t_feat[b, 1 + pos]
                else:
                    target = t_feat[b, :, 2 * y:2 * y + 2, 2 * x:2 * x + 2].mean(dim=(1, 2))
                total += ((r - target) ** 2).sum().item()
                count += target.numel()
    assert s_tok.shape[1] == 1 + 8 and loss.item() == pytest.approx(total / count, rel=1e-5)


def test_token_masking_in_the_task_trains_on_fewer_tokens_and_evaluates_on_all():
    d = token_mfd()
    task = ClassificationTask(tiny_vit(0), tiny_vit(1, embed_dim=24), num_classes=5, distillers={"mfd": d},
                              optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1))
    seen = tokens_entering_blocks(task.student)
    batch = images()
    task.build(batch)
    losses, _ = task.losses(batch)
    assert torch.isfinite(losses["mfd"]) and torch.isfinite(losses["task"])
    assert seen[-1].shape == (4, 1 + 8, 16)
    task.update_metrics = lambda stage, out, b: None
    task.eval_step("val", batch)
    assert seen[-1].shape == (4, 1 + 16, 16)


def test_token_masking_errors():
    batch = images()
    d = MFD(student_feature="layer3", teacher_feature="layer3", masking="tokens")
    with pytest.raises(KdkitError, match=r"not tokens \[N, D\].*masking: pixels"):
        build(d, Pair(d), image_batch())  # a CNN student
    d = token_mfd(patch_size=2)  # an 8x8 mask grid for a 4x4 patch grid
    vit_pair = ViTPair(d)
    vit_pair.build(d, batch)
    with pytest.raises(KdkitError, match=r"8x8 mask grid.*4x4 patch grid.*patch_size=4"):
        d.student_batch(batch)
    d = token_mfd()
    with pytest.raises(KdkitError, match="already drops patch tokens"):
        ViTPair(d, student=tiny_vit(0, patch_drop_rate=0.25)).build(d, batch)
    d = token_mfd(token_module="patch_dropout")
    with pytest.raises(KdkitError, match="'patch_dropout' is not a module.*patch_drop"):
        ViTPair(d).build(d, batch)
    with pytest.raises(KdkitError, match="masking must be"):
        MFD(masking="tokenz")


def test_token_masking_on_an_open_clip_tower_drops_after_its_patch_dropout():
    from kdkit.models.vit import clip_visual_classifier

    student = clip_visual_classifier(num_classes=5, model_name="kdkit-vit-p8-d64")  # 4x4 patches of 8 on 32x32
    d = MFD(student_feature="visual.transformer.resblocks.1", teacher_feature="blocks.1", student_prefix_tokens=1,
            teacher_prefix_tokens=1, patch_size=8, masking="tokens", token_module="visual.patch_dropout")
    pair = ViTPair(d, student=student, teacher=tiny_vit(1, embed_dim=24, img_size=32, patch_size=8))
    batch = images(size=32)
    pair.build(d, batch)
    masked = d.student_batch(batch)
    terms = distill_backward(d, pair, masked)
    assert terms["loss"] > 0
    out = pair.student_outputs(d.student_batch(batch))
    assert out.features["visual.transformer.resblocks.1"].shape == (4, 1 + 8, 64)
    assert pair.student_outputs(batch).features["visual.transformer.resblocks.1"].shape == (4, 1 + 16, 64)


@pytest.mark.parametrize("masking", ["pixels", "tokens"])
def test_task_view_full_puts_the_task_loss_on_a_second_forward_of_the_unmasked_image(masking):
    import torch.nn.functional as F

    batch = images()
    results = {}
    for view in ("masked", "full"):
        d = vit_mfd(masking=masking, task_view=view)
        task = ClassificationTask(tiny_vit(0), tiny_vit(1, embed_dim=24), num_classes=5, distillers={"mfd": d},
                                  optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1))
        seen = tokens_entering_blocks(task.student)
        inputs = []
        task.student.register_forward_pre_hook(lambda m, args, into=inputs: into.append(args[0].clone()))
        task.build(batch)
        seen.clear()
        inputs.clear()
        losses, _ = task.losses(batch)
        fed, forwards = list(inputs), len(seen)
        masked = d.student_batch(batch)  # step 0 again: the same mask (tokens: armed for one forward)
        with torch.no_grad():
            masked_ce = F.cross_entropy(task.student(masked["image"]), batch["label"])
            clean_ce = F.cross_entropy(task.student(batch["image"]), batch["label"])
        results[view] = {k: v.item() for k, v in losses.items()}
        if view == "masked":  # one forward, which the task loss reads too
            assert len(fed) == 1 and losses["task"].item() == pytest.approx(masked_ce.item(), rel=1e-6)
        else:  # the distilled forward first (it consumes a token mask), then the clean one
            assert len(fed) == 2 and torch.equal(fed[1], batch["image"])
            assert losses["task"].item() == pytest.approx(clean_ce.item(), rel=1e-6)
            assert abs(clean_ce.item() - masked_ce.item()) > 1e-4  # the two views do differ
        if masking == "tokens":
            assert [s.shape[1] for s in seen[:forwards]] == [1 + 8, 1 + 16][:forwards]
        else:
            assert not torch.equal(fed[0], batch["image"])
    assert results["full"]["mfd"] == pytest.approx(results["masked"]["mfd"], rel=1e-6)  # same mask, same weights
    with pytest.raises(KdkitError, match="task_view must be"):
        MFD(task_view="clean")
