"""Framework overhead: a kdkit training step under Lightning vs a hand-written PyTorch loop.

Both sides do the same work on the same in-memory batches: a frozen ResNet-56 teacher forward,
a ResNet-20 student forward/backward, cross-entropy + KD (Hinton et al. 2015, ``kd_loss``, T=4),
SGD with momentum. The Lightning side is kdkit's ``ClassificationTask`` in a ``Trainer`` as
``kdkit-train`` builds it (no logger, checkpoint or progress bar). The two are interleaved in
one process: every ``--block`` Lightning steps, a callback runs ``--block`` hand-written steps,
so machine noise (other jobs, frequency changes) hits both alike. A Lightning step is the time
between two consecutive ``on_train_batch_end`` calls, minus the hand-written block run between
them; the first ``--warmup`` steps of each side are dropped.

    python benchmarks/overhead.py [--threads 1] [--rounds 8] [--block 3]
                                  [--teacher resnet56 --student resnet20 --batch-size 128]

Last line: ``overhead_ratio=X`` = median Lightning step / median hand-written step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from datetime import datetime, timezone

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdkit.distillers.kd import KD, kd_loss
from kdkit.models import cifar_resnet
from kdkit.tasks.classification import ClassificationTask

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
TEMPERATURE, LR = 4.0, 0.05


def machine() -> str:
    """CPU model, its kernel set and core count, for the record."""
    from kdkit.run_environment import cpu_model

    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores"


def make_batches(n_batches: int, batch_size: int, num_classes: int, seed: int = 0) -> list[dict]:
    """Random 32x32 RGB images in [0, 1] with labels and dataset indices, already batched."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(batch_size, 3, 32, 32, generator=g),
             "label": torch.randint(0, num_classes, (batch_size,), generator=g),
             "index": torch.arange(i * batch_size, (i + 1) * batch_size)}
            for i in range(n_batches)]


class BatchesDataModule(L.LightningDataModule):
    """Serves prebuilt batches as they are (``batch_size=None``: no collation), so neither side
    pays for data loading and the comparison isolates the training step.

    Args:
        batches: the batch dicts, served in order every epoch.
        num_classes: number of classes (read by the task's start-up checks).
        static: whether the teacher sees a sample identically every epoch (for the cache).
    """

    teacher_input_fingerprint = None
    fixed_shards = False

    def use_fixed_shards(self) -> None:
        self.fixed_shards = True  # one process: nothing to shard

    def __init__(self, batches: list[dict], num_classes: int, static: bool = True):
        super().__init__()
        self.batches, self.num_classes, self.static_for_teacher = batches, num_classes, static
        self.num_train_samples = sum(len(b["index"]) for b in batches)

    def example_batch(self, n: int | None = None) -> dict:
        return {k: v[:n or 4] for k, v in self.batches[0].items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)


def make_task(student, teacher, num_classes: int, **kwargs) -> ClassificationTask:
    return ClassificationTask(
        student, teacher, distillers={"kd": KD(weight=1.0, temperature=TEMPERATURE)},
        num_classes=num_classes, mean=MEAN, std=STD,
        optimizer=lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4),
        **kwargs)


def make_trainer(max_steps: int = -1, max_epochs: int | None = None, callbacks=()) -> L.Trainer:
    """The Trainer ``kdkit-train`` builds (conf/trainer/default.yaml), minus logging and saving."""
    return L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps,
                     max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks))


class HandLoop:
    """The same step written directly in PyTorch, as one would without a framework."""

    def __init__(self, student, teacher, batches: list[dict]):
        self.student, self.teacher, self.batches = student, teacher.eval(), batches
        self.teacher.requires_grad_(False)
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)
        self.opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        self.i = 0

    def step(self) -> float:
        start = time.perf_counter()
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        x = (batch["image"] - self.mean) / self.std
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        loss = F.cross_entropy(s, batch["label"]) + kd_loss(s, t, TEMPERATURE)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


class Interleave(L.Callback):
    """Times Lightning steps and runs a block of hand-written steps every ``block`` of them."""

    def __init__(self, hand: HandLoop, block: int):
        self.hand, self.block = hand, block
        self.lightning: list[float] = []
        self.handwritten: list[float] = []
        self.mark: float | None = None

    def on_train_batch_start(self, trainer, task, batch, batch_idx):
        if self.mark is None:  # first step: time from here
            self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.lightning.append(now - self.mark)
        if len(self.lightning) % self.block == 0:
            self.handwritten += [self.hand.step() for _ in range(self.block)]
        self.mark = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher", default="resnet56", help="a kdkit.models.cifar_resnet factory")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--rounds", type=int, default=8, help="Lightning/hand-written block pairs")
    p.add_argument("--block", type=int, default=3, help="steps per block")
    p.add_argument("--warmup", type=int, default=2, help="steps of each side left out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = getattr(cifar_resnet, args.teacher)(args.num_classes)
    student = getattr(cifar_resnet, args.student)(args.num_classes)
    batches = make_batches(4, args.batch_size, args.num_classes)
    hand = HandLoop(copy.deepcopy(student), copy.deepcopy(teacher), batches)
    task = make_task(student, teacher, args.num_classes)
    clock = Interleave(hand, args.block)
    steps = args.rounds * args.block
    dm = BatchesDataModule(batches, args.num_classes)
    make_trainer(max_steps=steps, callbacks=[clock]).fit(task, datamodule=dm)

    light = clock.lightning[args.warmup :]
    handw = clock.handwritten[args.warmup :]
    ratio = statistics.median(light) / statistics.median(handw)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
          f"torch {torch.__version__}, lightning {L.__version__}, threads={args.threads}")
    print(f"# {args.teacher} -> {args.student}, batch {args.batch_size}, 32x32, {args.num_classes} classes, "
          f"CE + KD(T={TEMPERATURE}), SGD; {len(light)} + {len(handw)} timed steps, "
          f"interleaved by {args.block}")
    print(f"lightning_step_ms median={1e3 * statistics.median(light):.1f} "
          f"mean={1e3 * statistics.fmean(light):.1f} min={1e3 * min(light):.1f}")
    print(f"handwritten_step_ms median={1e3 * statistics.median(handw):.1f} "
          f"mean={1e3 * statistics.fmean(handw):.1f} min={1e3 * min(handw):.1f}")
    gap = statistics.median(light) - statistics.median(handw)
    print(f"lightning_minus_handwritten_ms median={1e3 * gap:.2f}")
    print(f"mean_ratio={statistics.fmean(light) / statistics.fmean(handw):.3f} "
          f"min_ratio={min(light) / min(handw):.3f}")
    print(f"overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
