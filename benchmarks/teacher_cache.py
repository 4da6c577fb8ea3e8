"""Epoch time with a live teacher vs with the teacher-output cache (``kdkit.cache``).

Static, pre-resized 32x32 images (no augmentation: the teacher sees each sample identically
every epoch), a ResNet-56 teacher and a ResNet-8 student (CE + KD, SGD), kdkit's
``ClassificationTask`` under Lightning. Two identical tasks, one with ``teacher.cache`` and
one without, train in alternation, one epoch at a time, in one process; the cached task's
first epoch fills the cache and is reported apart. The ideal speed-up is
(teacher forward + student step) / student step, measured on the same batches.

    python benchmarks/teacher_cache.py [--threads 1] [--rounds 3] [--mode memory|disk]

Last line: ``cache_speedup=X`` = median live epoch / median cached epoch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from datetime import datetime, timezone

import lightning as L
import torch
from omegaconf import OmegaConf
from overhead import MEAN, STD, BatchesDataModule, machine, make_batches, make_task, make_trainer

from kdkit.cache import build_teacher_cache
from kdkit.models.cifar_resnet import resnet8, resnet56


class EpochClock(L.Callback):
    """Wall time of each training epoch."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, task):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, task):
        self.seconds.append(time.perf_counter() - self.start)


def component_ms(task, batches: list[dict], repeats: int = 3) -> tuple[float, float]:
    """Median teacher forward and student step (forward, backward, SGD) per batch, in ms."""
    teacher, student = task.teacher, copy.deepcopy(task.student)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    t_ms, s_ms = [], []
    for _ in range(repeats):
        for batch in batches:
            x = task.model_input(batch, "teacher")
            start = time.perf_counter()
            with torch.no_grad():
                teacher(x)
            t_ms.append(1e3 * (time.perf_counter() - start))
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(student(x), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            s_ms.append(1e3 * (time.perf_counter() - start))
    return statistics.median(t_ms), statistics.median(s_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=6, help="batches per epoch")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs of each task")
    p.add_argument("--mode", default="memory", choices=["memory", "disk"])
    p.add_argument("--dtype", default=None, choices=[None, "float16", "bfloat16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, student = resnet56(args.num_classes), resnet8(args.num_classes)
    batches = make_batches(args.batches, args.batch_size, args.num_classes)
    dm = BatchesDataModule(batches, args.num_classes, static=True)
    cfg = OmegaConf.create({
        "teacher": {"cache": args.mode, "cache_dtype": args.dtype, "normalize": None, "precision": None},
        "data": {"name": "random32", "n": dm.num_train_samples, "seed": 0},
        "task": {"_target_": "kdkit.tasks.classification.ClassificationTask",
                 "mean": list(MEAN), "std": list(STD)},
        "paths": {"cache_dir": tempfile.mkdtemp(prefix="kdkit-cache-bench-")},
    })
    cache = build_teacher_cache(cfg, teacher, dm)
    tasks = {"live": make_task(copy.deepcopy(student), copy.deepcopy(teacher), args.num_classes),
             "cached": make_task(copy.deepcopy(student), teacher, args.num_classes, teacher_cache=cache)}
    forwards = {name: 0 for name in tasks}
    def counter(name):
        return lambda *_: forwards.__setitem__(name, forwards[name] + 1)

    for name, task in tasks.items():
        task.teacher.model.register_forward_hook(counter(name))
    clocks = {name: EpochClock() for name in tasks}

    for _ in range(args.rounds + 1):  # round 0: warm-up for live, cache fill for cached
        for name, task in tasks.items():
            make_trainer(max_epochs=1, callbacks=[clocks[name]]).fit(task, datamodule=dm)
            if name == "cached" and len(clocks[name].seconds) == 1:
                forwards["cached_after_fill"] = forwards["cached"]
    live, cached = clocks["live"].seconds[1:], clocks["cached"].seconds[1:]
    fill = clocks["cached"].seconds[0]
    t_ms, s_ms = component_ms(tasks["live"], batches)
    speedup = statistics.median(live) / statistics.median(cached)

    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, torch {torch.__version__}, "
          f"lightning {L.__version__}, threads={args.threads}")
    print(f"# resnet56 -> resnet8, {args.batches} x {args.batch_size} static 32x32 images, "
          f"{args.num_classes} classes, CE + KD, cache mode={args.mode} dtype={args.dtype or 'as produced'}")
    print(f"live_epoch_s {' '.join(f'{s:.2f}' for s in live)} (median {statistics.median(live):.2f})")
    print(f"cached_epoch_s {' '.join(f'{s:.2f}' for s in cached)} (median {statistics.median(cached):.2f}); "
          f"fill epoch {fill:.2f}")
    print(f"teacher_forwards: cached task {forwards['cached_after_fill']} while filling, "
          f"{forwards['cached'] - forwards['cached_after_fill']} after; cache hits={cache.hits}")
    print(f"teacher_forward_ms={t_ms:.0f} student_step_ms={s_ms:.0f} "
          f"ideal_speedup={(t_ms + s_ms) / s_ms:.2f}")
    print(f"cache_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
