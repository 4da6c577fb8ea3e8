"""AugmentSelect: candidates are real crops/flips, the argmax is picked on a hand-built case,
divergences match their formulas, and the chosen candidate's teacher outputs are reused."""

import functools

import pytest
import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.selection.augment_select import AugmentSelect, choose, divergence, draw_candidates
from kdkit.selection.base import StepPlan
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import TinyNet, image_batch


def test_choose_picks_the_argmax_per_sample_and_per_batch_on_a_hand_built_case():
    div = torch.tensor([[0.1, 0.9, 0.3],   # candidate 0
                        [0.5, 0.2, 0.3],   # candidate 1
                        [0.4, 0.1, 0.8]])  # candidate 2
    assert choose(div, "sample").tolist() == [1, 0, 2]
    # batch means: 0.433, 0.333, 0.433 -> the first of the tied maxima
    assert choose(div, "batch").tolist() == [0, 0, 0]


def test_candidates_are_padded_crops_and_mirrors_of_each_image():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).view(2, 1, 4, 4) + 1
    out = draw_candidates(images, 5, 1, True, torch.Generator().manual_seed(0))
    assert out.shape == (5, 2, 1, 4, 4)
    padded = F.pad(images, (1, 1, 1, 1))
    for k in range(5):
        for i in range(2):
            windows = [padded[i, :, y:y + 4, x:x + 4] for y in range(3) for x in range(3)]
            windows += [w.flip(-1) for w in windows]
            assert any(torch.equal(out[k, i], w) for w in windows)
    no_pad = draw_candidates(images, 3, 0, False, torch.Generator().manual_seed(0))
    assert torch.equal(no_pad, images.expand(3, *images.shape))


def test_candidates_are_deterministic_given_the_generator_seed():
    images = torch.rand(4, 3, 8, 8)
    draw = lambda s: draw_candidates(images, 4, 4, True, torch.Generator().manual_seed(s))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_js_divergence_matches_the_formula_and_is_symmetric():
    t, s = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    p, q = t.softmax(-1), s.softmax(-1)
    m = (p + q) / 2
    want = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert torch.allclose(divergence(t, s, "js", 1.0), want[None])
    assert torch.allclose(divergence(t, s, "js", 1.0), divergence(s, t, "js", 1.0))


def _task():
    torch.manual_seed(0)
    teacher = TinyNet()
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    task = ClassificationTask(TinyNet(), teacher, distillers={}, num_classes=3,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    task.build(image_batch(4))
    calls.clear()
    return task, calls


def test_the_plan_trains_on_the_most_divergent_candidate_with_its_teacher_outputs():
    task, calls = _task()
    batch = image_batch(4)
    policy = AugmentSelect(candidates=3, padding=2, seed=7)
    plan = policy.plan(task, StepPlan(batch))
    assert calls == [12]  # one live teacher forward over the 3 x 4 candidates
    cands = draw_candidates(batch["image"], 3, 2, True, torch.Generator().manual_seed(7 * 1_000_003))
    with torch.no_grad():
        t = task.teacher.model(cands.flatten(0, 1)).view(3, 4, -1)
        s = task.student(cands.flatten(0, 1)).view(3, 4, -1)
    div = torch.stack([divergence(t[k], s[k], "kl", 1.0) for k in range(3)])
    best = div.argmax(0)
    assert torch.equal(plan.batch["image"], cands[best, torch.arange(4)])
    assert torch.allclose(plan.teacher["teacher"].logits, t[best, torch.arange(4)], atol=1e-6)
    assert torch.equal(plan.batch["label"], batch["label"]) and policy.summary()["teacher_forwards"] == 12


def test_it_refuses_augmented_loader_images():
    class Data:
        augment = True

    with pytest.raises(KdkitError, match="data.augment=false"):
        AugmentSelect().check_data(Data())


@pytest.mark.parametrize("bad", [{"candidates": 0}, {"per": "row"}, {"divergence": "l2"}, {"padding": -1}])
def test_bad_knobs_are_refused_by_name(bad):
    with pytest.raises(KdkitError, match="selection.augment_select"):
        AugmentSelect(**bad)
