"""``benchmarks/retrieval_methods.py`` sets each row's steps from ``StepClock``'s timing (equal
training time): the clock must time the steps after its warm-up, and stop the run there."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.retrieval_methods import Clocked, StepClock


class SlowAfterWarmup(L.LightningModule):
    """A linear model whose steps from batch ``warmup`` on take at least ``delay`` seconds."""

    def __init__(self, warmup: int, delay: float):
        super().__init__()
        self.layer, self.warmup, self.delay, self.seen = torch.nn.Linear(2, 1), warmup, delay, 0

    def training_step(self, batch, batch_idx):
        self.seen += 1
        if batch_idx >= self.warmup:
            time.sleep(self.delay)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_step_clock_times_the_steps_after_warmup_and_stops_the_run(tmp_path):
    model = SlowAfterWarmup(warmup=2, delay=0.05)
    path = tmp_path / "clock.json"
    trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StepClock(str(path), steps=4, warmup=2)])
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=2)
    with pytest.raises(Clocked):
        trainer.fit(model, data)
    clock = json.loads(path.read_text())
    assert clock["steps"] == 4
    assert model.seen == 2 + 4  # warm-up batches, then exactly the timed ones
    # every timed step slept 0.05 s (the fast warm-up steps are not in the mean)
    assert 0.05 <= clock["median_s"] <= clock["mean_s"] * 1.5
    assert clock["mean_s"] < 1.0
