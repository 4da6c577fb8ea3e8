"""A tiny DistillationTask on vectors whose validation score each epoch is scripted."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdkit.distillers.base import Distiller
from kdkit.outputs import Outputs
from kdkit.tasks.base import DistillationTask


class Vectors(Dataset):
    def __init__(self, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


class VectorData(L.LightningDataModule):
    num_classes = None

    def __init__(self):
        super().__init__()
        self.train, self.val = Vectors(8, 0), Vectors(4, 1)
        self.num_train_samples = len(self.train)

    def example_batch(self, n: int | None = None) -> dict:
        return next(iter(DataLoader(self.train, batch_size=n or 4)))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=4)


class AdapterMSE(Distiller):
    """MSE through a trainable adapter (so the distillers hold trained state too)."""

    def build(self, student: Outputs, teacher: Outputs, context) -> None:
        self.adapter = nn.Linear(student.logits.shape[-1], teacher.logits.shape[-1])

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        return {"loss": F.mse_loss(self.adapter(student.logits), teacher.logits)}


class ScriptedTask(DistillationTask):
    """Linear student, MSE task loss; ``val/acc`` of epoch e is ``scores[e]``."""

    def __init__(self, scores=(), **kwargs):
        super().__init__(**kwargs)
        self.scores = list(scores)

    def forward_outputs(self, model, batch: dict, role: str) -> Outputs:
        return Outputs(logits=model(batch["x"]))

    def task_loss(self, outputs: Outputs, batch: dict) -> Tensor:
        return F.mse_loss(outputs.logits, batch["y"])

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        epoch = self.current_epoch  # after a fit (trainer.validate): one past the last epoch
        return {"acc": torch.tensor(self.scores[epoch] if epoch < len(self.scores) else 0.0)}


def scripted_task(scores, distill: bool = True, seed: int = 0, **kwargs) -> ScriptedTask:
    torch.manual_seed(seed)
    extra = {"teacher": nn.Linear(4, 3), "distillers": {"mse": AdapterMSE()}} if distill else {}
    return ScriptedTask(scores, student=nn.Linear(4, 2),
                        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1), **extra, **kwargs)


def trained_state(task: DistillationTask) -> dict[str, Tensor]:
    """Student and adapters, cloned."""
    return {f"{name}.{k}": v.detach().clone() for name in ("student", "distillers")
            for k, v in getattr(task, name).state_dict().items()}


class Snapshots(L.Callback):
    """The trained state at every validation of the fit."""

    def __init__(self):
        self.states = []

    def on_validation_epoch_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.states.append(trained_state(module))


def trainer(epochs: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, log_every_n_steps=1, **kwargs)
