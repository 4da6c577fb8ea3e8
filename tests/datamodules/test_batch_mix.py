"""Mixup / CutMix batches: images and soft labels against the definitions, the Beta draws'
moments, and the refusals."""

from __future__ import annotations

import pytest
import torch

from kdkit.datamodules.batch_mix import BatchMix, MixingCollate, cutmix_box
from kdkit.errors import KdkitError

B, C, H, W, K = 6, 3, 16, 16, 5


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    # distinct labels for row i and row B-1-i, so each soft label shows lam itself
    return {"image": torch.rand(B, C, H, W, generator=g), "label": torch.tensor([0, 1, 2, 3, 4, 1]),
            "index": torch.arange(B)}


def _lam(label: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per-row weight of the row's own class in its soft label."""
    return label[torch.arange(len(classes)), classes]


def test_mixup_blends_each_image_with_its_mirror_row_by_the_labels_weight():
    torch.manual_seed(1)
    batch = _batch()
    out = BatchMix(mixup_alpha=0.8)(batch, K)
    lam = _lam(out["label"], batch["label"])
    assert torch.allclose(lam, lam[0].expand(B)) and 0 < float(lam[0]) < 1  # one lam per batch
    expected = lam[0] * batch["image"] + (1 - lam[0]) * batch["image"].flip(0)
    torch.testing.assert_close(out["image"], expected)
    onehot = torch.eye(K)[batch["label"]]
    torch.testing.assert_close(out["label"], lam[0] * onehot + (1 - lam[0]) * onehot.flip(0))
    assert out["label"].dtype == torch.float32 and torch.equal(out["index"], batch["index"])


def test_cutmix_pastes_one_box_of_the_mirror_row_and_weights_labels_by_its_area():
    for seed in range(20):
        torch.manual_seed(seed)
        batch = _batch(seed)
        out = BatchMix(cutmix_alpha=1.0)(batch, K)
        changed = (out["image"] != batch["image"]).any(1)  # [B, H, W]
        partner = batch["image"].flip(0)
        rows = [i for i in range(B) if i != B - 1 - i]
        area = int(changed[0].sum())
        for i in rows:  # the same box in every row, filled from the mirror row
            assert torch.equal(changed[i], changed[0])
            assert torch.equal(out["image"][i][:, changed[i]], partner[i][:, changed[i]])
            assert torch.equal(out["image"][i][:, ~changed[i]], batch["image"][i][:, ~changed[i]])
        if area:
            ys, xs = changed[0].nonzero(as_tuple=True)
            assert area == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a rectangle
        lam = _lam(out["label"], batch["label"])
        torch.testing.assert_close(lam, torch.full((B,), 1 - area / (H * W)))


def test_beta_draws_have_the_beta_moments():
    mix = BatchMix(mixup_alpha=0.8)
    torch.manual_seed(0)
    x = {"image": torch.tensor([[[[1.0]]], [[[0.0]]]]), "label": torch.tensor([0, 1])}
    lams = torch.tensor([float(mix(x, 2)["image"][0].item()) for _ in range(4000)])
    a = 0.8  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(float(lams.mean()) - 0.5) < 0.02
    assert abs(float(lams.var()) - 1 / (4 * (2 * a + 1))) < 0.01


def test_prob_and_switch_prob():
    batch = _batch()
    torch.manual_seed(0)
    off = BatchMix(mixup_alpha=1.0, prob=0.0)(batch, K)
    assert torch.equal(off["image"], batch["image"])
    assert torch.equal(off["label"], torch.eye(K)[batch["label"]])
    torch.manual_seed(0)
    kinds = []
    for _ in range(200):
        out = BatchMix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.3)(batch, K)
        diff = (out["image"] != batch["image"]).any(1)[0]
        kinds.append(bool(diff.all()))  # mixup changes every pixel, cutmix a box
    assert 0.6 < sum(kinds) / 200 < 0.8  # mixup with probability 1 - 0.3


def test_box_is_clipped_to_the_image():
    torch.manual_seed(0)
    for lam in (0.0, 0.3, 0.9, 1.0):
        top, bottom, left, right = cutmix_box(H, W, lam)
        assert 0 <= top <= bottom <= H and 0 <= left <= right <= W
        assert (bottom - top) <= int(H * (1 - lam) ** 0.5) and (right - left) <= int(W * (1 - lam) ** 0.5)


def test_collate_mixes_a_list_of_samples():
    samples = [{"image": torch.full((C, 2, 2), float(i)), "label": torch.tensor(i % K), "index": torch.tensor(i)}
               for i in range(4)]
    torch.manual_seed(0)
    out = MixingCollate(BatchMix(mixup_alpha=1.0), K)(samples)
    assert out["image"].shape == (4, C, 2, 2) and out["label"].shape == (4, K)
    torch.testing.assert_close(out["label"].sum(1), torch.ones(4))


@pytest.mark.parametrize("kwargs, match", [
    ({"mixup_alpha": -1.0}, "mixup_alpha=-1.0 must be >= 0"),
    ({"mixup_alpha": 1.0, "prob": 1.5}, "mix_prob=1.5"),
    ({"cutmix_alpha": 1.0, "switch_prob": -0.1}, "mix_switch_prob=-0.1"),
    ({}, "mixup_alpha > 0 or data.cutmix_alpha > 0"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(KdkitError, match=match):
        BatchMix(**kwargs)


def test_rows_without_a_label_are_refused():
    batch = {**_batch(), "label": torch.tensor([0, -1, 2, 3, 4, 0])}
    with pytest.raises(KdkitError, match="without a label cannot be mixed"):
        BatchMix(mixup_alpha=1.0)(batch, K)
