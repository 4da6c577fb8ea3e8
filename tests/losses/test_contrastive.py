"""CLIP's loss on transfer data: ``keep`` (the captioned rows) makes the loss of the kept pairs
alone, with no gradient into the others and no NaN when nothing is kept."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.losses.contrastive import contrastive_loss, mask_columns, masked_mean

KEEP = torch.tensor([True, False, True, True, False, True])


def embeddings(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return image, text


def clip_loss_by_loops(image, text, scale):
    """Symmetric InfoNCE written out: -log softmax of each pair's own column, both directions."""
    n, total = len(image), 0.0
    for i in range(n):
        i2t = [scale * float(image[i] @ text[j]) for j in range(n)]
        t2i = [scale * float(text[i] @ image[j]) for j in range(n)]
        for row in (i2t, t2i):
            total += math.log(sum(math.exp(v) for v in row)) - row[i]
    return total / (2 * n)


def test_kept_pairs_alone_give_the_clip_loss_of_that_subset():
    image, text = embeddings()
    masked = contrastive_loss(image, text, 7.0, keep=KEEP)
    expected = clip_loss_by_loops(image[KEEP].detach(), text[KEEP].detach(), 7.0)
    assert masked.item() == pytest.approx(expected, rel=1e-5)
    full = contrastive_loss(image, text, 7.0)
    assert full.item() == pytest.approx(clip_loss_by_loops(image.detach(), text.detach(), 7.0), rel=1e-5)
    assert abs(full.item() - masked.item()) > 1e-3  # the mask changes the value


def test_uncaptioned_rows_get_no_gradient_and_nothing_kept_is_zero_without_nan():
    image, text = embeddings()
    contrastive_loss(image, text, 7.0, keep=KEEP).backward()
    assert torch.all(image.grad[~KEEP] == 0) and torch.all(text.grad[~KEEP] == 0)
    assert torch.all(image.grad[KEEP].abs().sum(-1) > 0)
    image, text = embeddings()
    none = contrastive_loss(image, text, 7.0, keep=torch.zeros(6, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(image.grad).all() and torch.all(image.grad == 0)


def test_masked_columns_carry_no_probability_and_stay_finite():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    masked = mask_columns(logits, torch.tensor([True, False, True]))
    probs = masked.softmax(-1)
    assert torch.isfinite(masked).all() and probs[0, 1] == 0
    assert torch.allclose(probs[0, [0, 2]], F.softmax(torch.tensor([1.0, 3.0]), -1))
    assert masked_mean(torch.tensor([1.0, 5.0, 3.0]), torch.tensor([True, False, True])).item() == 2.0

