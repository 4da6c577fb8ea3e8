"""TeacherBudget: the budget is spent exactly, teacher forwards are counted exactly, only bought
rows are distilled, rankings follow their formulas, and the state survives a checkpoint."""

import functools

import lightning as L
import pytest
import torch
import torch.nn as nn

from kdkit.datamodules.digits import DigitsDataModule
from kdkit.distillers.kd import KD
from kdkit.errors import KdkitError
from kdkit.selection.base import StepPlan, per_sample_js
from kdkit.selection.teacher_budget import TeacherBudget, pool_scores, round_epoch
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import TinyNet


def _fit(policy, epochs=2, kd=None):
    torch.manual_seed(0)
    dm = DigitsDataModule(labeled_fraction=0.2, batch_size=64)
    dm.setup("fit")
    dm.use_train_view("transfer")
    teacher = TinyNet(in_channels=1, num_classes=10)
    rows = []
    teacher.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    task = ClassificationTask(TinyNet(in_channels=1, num_classes=10), teacher, distillers={"kd": kd or KD()},
                              num_classes=10, optimizer=functools.partial(torch.optim.SGD, lr=0.05),
                              selection={"teacher_budget": policy})
    task.probe(dm)
    rows.clear()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    return task, dm, rows


class Seen(KD):
    """KD that records the dataset indices it distils."""

    def forward(self, student, teacher, batch):
        self.indices = getattr(self, "indices", set()) | set(batch["index"].tolist())
        return super().forward(student, teacher, batch)


@pytest.mark.parametrize("order", ["random", "uncertainty", "view_disagreement"])
def test_the_budget_is_spent_exactly_and_every_teacher_row_is_counted(order):
    kd = Seen()
    policy = TeacherBudget(fraction=0.3, order=order, rounds=2)
    task, dm, rows = _fit(policy, kd=kd)
    n = len(dm.plain_train_view)
    assert int(policy.bought.sum()) == round(0.3 * n)
    assert policy.teacher_forwards == sum(rows) > 0  # the count is every row the teacher ran on
    assert kd.indices <= set(policy.bought.nonzero().flatten().tolist())  # only bought rows distilled
    assert task.fit_summary()["selection/teacher_budget/samples_bought"] == round(0.3 * n)


def test_rounds_are_spent_at_evenly_spaced_epochs():
    assert [round_epoch(r, 3, 10) for r in range(3)] == [0, 3, 6]
    assert [round_epoch(r, 4, 2) for r in range(4)] == [0, 0, 1, 1]


class Linear(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.table = nn.Parameter(logits)

    def forward(self, image):  # image [B, 1, 1, 2]: (row id, mirrored flag) -> a fixed logit row
        return self.table[image[:, 0, 0, 0].long()] * (1 + image[:, 0, 0, 1:2])


class Pool(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.tensor([[[float(i), 0.0]]]), "label": torch.tensor(0), "index": torch.tensor(i)}


def test_uncertainty_ranks_by_the_smallest_top2_margin_and_view_disagreement_by_mirror_js():
    logits = torch.tensor([[3.0, 0.0], [0.1, 0.0], [1.0, 0.0], [0.0, 5.0]])
    task = ClassificationTask(Linear(logits), num_classes=2)
    p = logits.softmax(-1).sort(-1, descending=True).values
    assert torch.allclose(pool_scores(task, Pool(), "uncertainty", 3), p[:, 1] - p[:, 0])
    # mirroring image i's two pixels (i, 0) gives (0, i): row 0 of the table, scaled by 1 + i
    mirrored = logits[0] * (1 + torch.arange(4.0))[:, None]
    assert torch.allclose(pool_scores(task, Pool(), "view_disagreement", 2), per_sample_js(logits, mirrored))
    budget = TeacherBudget(fraction=0.5, order="uncertainty", rounds=1)
    budget.bought, budget.rounds_done = torch.zeros(4, dtype=torch.bool), 0
    budget.buy(task, Pool())
    assert budget.bought.nonzero().flatten().tolist() == [1, 2]  # the two smallest margins


def test_random_order_is_deterministic_given_the_seed():
    picks = []
    for seed in (1, 1, 2):
        budget = TeacherBudget(fraction=0.5, order="random", rounds=1, seed=seed)
        budget.bought, budget.rounds_done = torch.zeros(100, dtype=torch.bool), 0
        budget.buy(None, range(100))
        picks.append(budget.bought.nonzero().flatten().tolist())
    assert picks[0] == picks[1] != picks[2] and len(picks[0]) == 50


def test_the_state_survives_a_checkpoint_and_a_later_round_buys_only_new_samples():
    budget = TeacherBudget(fraction=0.5, order="random", rounds=2)
    budget.bought, budget.rounds_done = torch.zeros(10, dtype=torch.bool), 0
    budget.buy(None, range(10))
    first = budget.bought.clone()
    restored = TeacherBudget(fraction=0.5, order="random", rounds=2)
    restored.load_state_dict(budget.state_dict())
    restored.buy(None, range(10))
    assert int(first.sum()) == 2 and int(restored.bought.sum()) == 5 and bool(restored.bought[first].all())


def test_plan_keeps_only_bought_rows_of_the_batch():
    budget = TeacherBudget(fraction=0.5)
    budget.bought = torch.tensor([True, False, True, False, False, True])
    task = ClassificationTask(TinyNet(), TinyNet(), num_classes=3)
    plan = budget.plan(task, StepPlan({"image": torch.zeros(3, 1, 8, 8), "index": torch.tensor([5, 4, 0])}))
    assert plan.distill_rows.tolist() == [0, 2] and budget.teacher_forwards == 2


@pytest.mark.parametrize("bad", [{"fraction": 0.0}, {"fraction": 1.2}, {"order": "loss"}, {"rounds": 0}])
def test_bad_knobs_are_refused_by_name(bad):
    with pytest.raises(KdkitError, match="selection.teacher_budget"):
        TeacherBudget(**bad)
