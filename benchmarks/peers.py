"""kdkit side by side with torchdistill: the same KD run through each toolkit's own training path.

Both sides get the same work (issue #16): kdkit's CIFAR ResNet-20 teacher (frozen, eval mode)
and ResNet-8 student (one initialisation, deep-copied), the shared CIFAR-10 decoded to tensors
once (``CIFAR10DataModule``'s in-memory ``TensorImageDataset``), batches of 128 collated by a
``DataLoader`` (``num_workers=0``), SGD (lr 0.05, momentum 0.9, wd 5e-4, no schedule) and
CE + KD (Hinton et al. 2015, T=4, KD weight 1.0 as in ``conf/distiller/kd.yaml``).

- kdkit: ``ClassificationTask`` in the ``Trainer`` that ``kdkit-train`` builds, minus logging and
  saving (``benchmarks/overhead.py``'s ``make_trainer``). Images stay in [0, 1]; the task
  normalises each batch.
- torchdistill: its ``DistillationBox`` (``get_distillation_box``) from a train config written
  here as the dict its YAML files load into, driven as ``train_one_epoch`` in its
  ``examples/torchvision/image_classification.py`` drives it: ``MetricLogger.log_every`` over
  ``box.train_data_loader`` (built by torchdistill with its ``BaseDatasetWrapper``),
  ``forward_process``, ``post_forward_process``, ``loss.item()``. Its ``KDLoss`` with
  ``alpha=1, beta=1`` is ``CE + T^2 KL``, kdkit's objective. Its dataset normalises per image,
  as torchvision's ``Normalize`` transform does in torchdistill's configs.

Step time (default, and ``--quick``): the two are interleaved in one process, one thread: every
``--block`` kdkit steps a Lightning callback runs ``--block`` torchdistill steps. A kdkit step is
the time between consecutive ``on_train_batch_end`` calls minus the torchdistill block run in
between (as in ``overhead.py``); a torchdistill step is one loop iteration, data fetch included.
The ratio is the median over block pairs of (mean kdkit step / mean torchdistill step), so
machine noise hits both sides of a pair alike. The teacher is randomly initialised here: step
time does not depend on its weights. When kdkit is slower, ``cProfile`` runs each side alone
and the report lists where the time goes.

``--full``: accuracy at equal epochs. The teacher is trained first (plain PyTorch loop, same
data and optimiser, kept in ``--runs-dir``; or ``--teacher-ckpt`` in any ``kdkit.peer_checkpoints``
layout), then for each of ``--seeds`` student initialisations each toolkit trains its own copy of
the student for ``--epochs`` on the augmented train set (random crop + flip, kdkit's
``RandomCropFlip`` for both), and both students are scored on the test set by the same function.
Each finished (side, seed) is a row of ``--runs-dir``/results.jsonl: a stopped run continues.
``--schedule cosine`` decays the rate to 0 over the run on both sides (per step): the accuracy after
a constant-rate run's last step is noisier than after a decayed rate has settled.

    python benchmarks/peers.py --quick
    python benchmarks/peers.py --full --schedule cosine --epochs 10 --seeds 3 \
        --teacher-ckpt benchmarks/runs/cifar10_20k/teacher/teacher.pt
    python benchmarks/peers.py st --quick    # sentence-transformers instead: benchmarks/peers_st.py

Last line: ``torchdistill_step_ratio=X`` = kdkit step / torchdistill step (> 1: kdkit slower);
with ``--full``, ``torchdistill_wall_ratio=X`` (mean wall time of the sequential fits, no speed measure).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib.metadata as md
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from benchmarks._common import RunLog, command, header, machine, mean_std, write  # noqa: E402
from benchmarks.overhead import make_trainer  # noqa: E402
from kdkit.datamodules.cifar10 import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule  # noqa: E402
from kdkit.distillers.kd import KD  # noqa: E402
from kdkit.models import cifar_resnet  # noqa: E402
from kdkit.tasks.classification import ClassificationTask  # noqa: E402

TEMPERATURE, LR, MOMENTUM, WD, NUM_CLASSES = 4.0, 0.05, 0.9, 5e-4, 10


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


# ---------------------------------------------------------------- kdkit side


class SharedDataModule(L.LightningDataModule):
    """Serves a ``TensorImageDataset`` (dict samples, images in [0, 1]) the way kdkit's image
    datamodules do for training: shuffled or not, batches of ``batch_size``, remainder dropped.
    The attributes are the ones ``ClassificationTask`` reads at start-up (see overhead.py)."""

    teacher_input_fingerprint = None
    fixed_shards = False

    def use_fixed_shards(self) -> None:
        self.fixed_shards = True  # one process: nothing to shard

    def __init__(self, dataset, batch_size: int, shuffle: bool, seed: int = 0):
        super().__init__()
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.num_classes = NUM_CLASSES
        self.static_for_teacher = dataset.transform is None
        self.num_train_samples = len(dataset)

    def example_batch(self, n: int | None = None) -> dict:
        return default_collate([self.dataset[i] for i in range(n or 4)])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if self.shuffle else None
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                          drop_last=True, generator=generator)


def cosine(optimizer, total_steps: int):
    """The learning rate of ``--schedule cosine``: cosine decay to 0 over the run, stepped after
    every optimizer step (kdkit's scheduler interval; torchdistill's ``scheduling_step: 1``)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


def kdkit_task(student, teacher, schedule: str = "constant") -> ClassificationTask:
    return ClassificationTask(student, teacher, distillers={"kd": KD(weight=1.0, temperature=TEMPERATURE)},
                              num_classes=NUM_CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD, optimizer=sgd,
                              scheduler=cosine if schedule == "cosine" else None)


# ---------------------------------------------------------- torchdistill side


class NormalizedView(Dataset):
    """``(normalised image, label)`` pairs of the same dataset: torchdistill's configs feed
    classification models through torchvision's ``Normalize`` transform, per image."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return (sample["image"] - self.mean) / self.std, sample["label"]


def train_config(batch_size: int, shuffle: bool, epochs: int, total_steps: int | None = None) -> dict:
    """What torchdistill's YAML ``train:`` section loads into, for this run (structure from its
    ``configs/sample/cifar10/kd/*.yaml``; no wrapper: one CPU process). ``total_steps``: cosine
    decay over that many optimizer steps (``--schedule cosine``); None: a constant rate."""
    schedule = {"scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": total_steps}, "scheduling_step": 1}}
    return {**(schedule if total_steps else {}),
        "num_epochs": epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler if shuffle else SequentialSampler, "kwargs": None},
            "kwargs": {"batch_size": batch_size, "num_workers": 0, "drop_last": True},
        },
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False,
                    "frozen_modules": []},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [],
                    "requires_grad": True, "frozen_modules": []},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                # alpha * CE + beta * T^2 * KL with alpha = beta = 1: kdkit's CE + 1.0 * KD
                "temperature": TEMPERATURE, "alpha": 1.0, "beta": 1.0, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }


class TorchdistillLoop:
    """torchdistill's training loop, one step at a time (its example's ``train_one_epoch``)."""

    def __init__(self, teacher, student, dataset, batch_size: int, shuffle: bool, epochs: int = 10**6,
                 schedule: str = "constant"):
        from torchdistill.core.distillation import get_distillation_box

        total = epochs * (len(dataset) // batch_size) if schedule == "cosine" else None
        self.box = get_distillation_box(teacher, student, {"train": NormalizedView(dataset)},
                                        train_config(batch_size, shuffle, epochs, total), torch.device("cpu"),
                                        None, False, 1)
        self.epoch, self.batches = 0, None

    def _next(self):
        from torchdistill.misc.log import MetricLogger

        while True:
            if self.batches is None:
                self.box.pre_epoch_process(epoch=self.epoch)
                self.metric_logger = MetricLogger(delimiter="  ")
                self.batches = iter(self.metric_logger.log_every(self.box.train_data_loader, 10**9,
                                                                 f"Epoch: [{self.epoch}]"))
            try:
                return next(self.batches)
            except StopIteration:
                self.box.post_epoch_process()
                self.epoch, self.batches = self.epoch + 1, None

    def step(self) -> float:
        start = time.perf_counter()
        sample_batch, targets, supp_dict = self._next()
        loss = self.box.forward_process(sample_batch, targets, supp_dict)
        self.box.post_forward_process(loss=loss)
        self.metric_logger.update(loss=loss.item(), lr=self.box.optimizer.param_groups[0]["lr"])
        return time.perf_counter() - start

    def epoch_(self) -> None:
        """One whole epoch (``--full``)."""
        for _ in range(len(self.box.train_data_loader)):
            self.step()


# ------------------------------------------------------------------ timing


class Interleave(L.Callback):
    """Times kdkit steps; after every ``block`` of them runs ``block`` torchdistill steps."""

    def __init__(self, peer: TorchdistillLoop, block: int):
        self.peer, self.block = peer, block
        self.kdkit: list[float] = []
        self.torchdistill: list[float] = []
        self.mark: float | None = None

    def on_train_batch_start(self, trainer, task, batch, batch_idx):
        if self.mark is None:
            self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
        self.kdkit.append(time.perf_counter() - self.mark)
        if len(self.kdkit) % self.block == 0:
            self.torchdistill += [self.peer.step() for _ in range(self.block)]
        self.mark = time.perf_counter()


def models(seed: int = 0):
    torch.manual_seed(seed)
    teacher = cifar_resnet.resnet20(NUM_CLASSES).eval()
    student = cifar_resnet.resnet8(NUM_CLASSES)
    return teacher, student


def block_ratios(kd: list[float], td: list[float], block: int, warmup_blocks: int) -> list[float]:
    pairs = range(warmup_blocks, min(len(kd), len(td)) // block)
    return [statistics.fmean(kd[i * block:(i + 1) * block]) / statistics.fmean(td[i * block:(i + 1) * block])
            for i in pairs]


class ProfileFrom(L.Callback):
    """Profiles kdkit's steps after the first ``warm`` (start-up and first-step costs are not
    what a long run pays per step)."""

    def __init__(self, prof: cProfile.Profile, warm: int):
        self.prof, self.warm = prof, warm

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
        if batch_idx + 1 == self.warm:
            self.prof.enable()

    def on_train_end(self, trainer, task):
        self.prof.disable()


def profile_sides(teacher, student, dataset, batch_size: int, steps: int, warm: int = 3) -> str:
    """cProfile of each side alone for ``steps`` steady-state steps: where the time goes."""
    out = []
    for side in ("kdkit", "torchdistill"):
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        prof = cProfile.Profile()
        if side == "kdkit":
            trainer = make_trainer(max_steps=warm + steps, callbacks=[ProfileFrom(prof, warm)])
            trainer.fit(kdkit_task(s, t), datamodule=SharedDataModule(dataset, batch_size, shuffle=False))
        else:
            loop = TorchdistillLoop(t, s, dataset, batch_size, shuffle=False)
            for _ in range(warm):
                loop.step()
            prof.enable()
            for _ in range(steps):
                loop.step()
            prof.disable()
        out.append(profile_report(prof, side, steps, r"kdkit|lightning|torchdistill"))
    return "\n".join(out)


def profile_report(prof: cProfile.Profile, side: str, steps: int, pattern: str) -> str:
    """A markdown block: the top functions by own time, then by cumulative time among those
    whose path matches ``pattern`` (the toolkits' own code)."""
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(14)
    stats.sort_stats("cumulative").print_stats(pattern, 14)
    total = sum(v[2] for v in stats.stats.values())  # tottime summed = profiled wall time
    body = "\n".join(line for line in text.getvalue().splitlines() if line.strip()
                     and not line.startswith(("   Ordered by", "   List reduced")))
    return f"### {side}: {steps} steps, {total:.2f} s under cProfile (top by own time)\n\n```\n{body}\n```\n"


def versions() -> str:
    return ", ".join(f"{p} {md.version(p)}" for p in ("torch", "lightning", "torchdistill"))


def step_time(args) -> float:
    dm = CIFAR10DataModule(augment=False, val_size=0, batch_size=args.batch_size)
    dm.setup("fit")
    dataset = dm.plain_train_set  # the shared CIFAR-10 train images, decoded once, in [0, 1]
    teacher, student = models()
    peer = TorchdistillLoop(copy.deepcopy(teacher), copy.deepcopy(student), dataset, args.batch_size, shuffle=False)
    clock = Interleave(peer, args.block)
    steps = args.rounds * args.block
    task = kdkit_task(copy.deepcopy(student), copy.deepcopy(teacher))
    make_trainer(max_steps=steps, callbacks=[clock]).fit(
        task, datamodule=SharedDataModule(dataset, args.batch_size, shuffle=False))

    kd, td = clock.kdkit[args.warmup * args.block:], clock.torchdistill[args.warmup * args.block:]
    ratios = block_ratios(clock.kdkit, clock.torchdistill, args.block, args.warmup)
    ratio = statistics.median(ratios)
    lines = [
        f"- versions: {versions()}",
        f"- work: resnet20 (random init, eval mode, frozen) -> resnet8, CIFAR-10 train images "
        f"(shared tensors, no augmentation), batch {args.batch_size}, CE + KD(T={TEMPERATURE}), "
        f"SGD lr {LR} momentum {MOMENTUM} wd {WD}; {torch.get_num_threads()} thread(s)",
        f"- timing: {len(ratios)} interleaved block pairs of {args.block} steps after {args.warmup} warm-up "
        f"pairs ({len(kd)} + {len(td)} timed steps)",
        "",
        "| side | median step (ms) | mean (ms) | min (ms) |",
        "|---|---|---|---|",
        f"| kdkit (Lightning) | {1e3 * statistics.median(kd):.1f} | {1e3 * statistics.fmean(kd):.1f} "
        f"| {1e3 * min(kd):.1f} |",
        f"| torchdistill (DistillationBox) | {1e3 * statistics.median(td):.1f} | "
        f"{1e3 * statistics.fmean(td):.1f} | {1e3 * min(td):.1f} |",
        "",
        f"Ratio kdkit / torchdistill, median over block pairs: **{ratio:.3f}** "
        f"(block ratios min {min(ratios):.3f}, max {max(ratios):.3f}; "
        f"gap of medians {1e3 * (statistics.median(kd) - statistics.median(td)):+.2f} ms/step)",
    ]
    if ratio > 1.0 + args.profile_above or args.profile:
        lines += ["", "## Where the time goes (cProfile, each side alone)", "",
                  profile_sides(teacher, student, dataset, args.batch_size, args.profile_steps)]
    text = header("kdkit vs torchdistill: step time") + "\n".join(lines) + "\n\n" + full_command_note()
    print("\n".join(lines))
    from benchmarks.peers_st import kept_sections

    write(args.out, text + kept_sections(args.out))  # the sentence-transformers sections stay
    return ratio


def full_command_note() -> str:
    return ("Accuracy at equal epochs: `peers_full_cosine.md` (about 2 x epochs x 156 steps per seed), from\n"
            "`OMP_NUM_THREADS=1 python benchmarks/peers.py --full --schedule cosine --epochs 10 --seeds 3 "
            "--teacher-ckpt benchmarks/runs/cifar10_20k/teacher/teacher.pt`\n")


# ---------------------------------------------------------------- accuracy


@torch.no_grad()
def accuracy(model, dataset, batch_size: int = 512) -> float:
    model.eval()
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    correct = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        correct += (model((batch["image"] - mean) / std).argmax(1) == batch["label"]).sum().item()
    return correct / len(dataset)


def train_teacher(teacher, dataset, batch_size: int, epochs: int):
    """Plain CE training of the teacher shared by both sides (same data and optimiser)."""
    opt = sgd(teacher.parameters())
    view = NormalizedView(dataset)
    teacher.train()
    for _ in range(epochs):
        for x, y in DataLoader(view, batch_size=batch_size, shuffle=True, drop_last=True):
            loss = F.cross_entropy(teacher(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return teacher.eval()


def full(args) -> float:
    """Both toolkits train a copy of one student per seed; each (side, seed) is one row of
    ``<runs-dir>/results.jsonl``, so a stopped run continues where it stopped."""
    runs = Path(args.runs_dir or f"benchmarks/runs/peers_full_{args.schedule}")
    runs.mkdir(parents=True, exist_ok=True)
    log = RunLog(runs / "results.jsonl", key=lambda r: (r["side"], r["seed"]))  # + a committed copy in results/raw
    done = log.done
    other = {(r["epochs"], r.get("schedule", "constant")) for r in done.values()} - {(args.epochs, args.schedule)}
    if other:
        raise SystemExit(f"{log.path} holds rows of other runs (epochs, schedule) {sorted(other)}: rows compare at "
                         f"equal epochs and schedule; give another --runs-dir")
    dm = CIFAR10DataModule(augment=True, val_size=0, batch_size=args.batch_size)
    dm.setup("fit")
    teacher, teacher_src = full_teacher(args, dm, runs)
    teacher_acc = accuracy(teacher, dm.test_set)
    for seed in range(args.seeds):
        _, student = models(seed)
        for side in SIDES:
            if (side, seed) in done:
                continue
            torch.manual_seed(1000 + seed)  # crops, flips and torchdistill's sampler, per side
            start = time.perf_counter()
            trained = train_side(side, copy.deepcopy(student), copy.deepcopy(teacher), dm.train_set, args, seed)
            row = {"side": side, "seed": seed, "acc": accuracy(trained, dm.test_set),
                   "wall_s": time.perf_counter() - start, "epochs": args.epochs, "schedule": args.schedule, "teacher": teacher_src,
                   "teacher_acc": teacher_acc, "machine": machine(), "command": command()}
            log.record(row)
            print(f"{side} seed {seed}: {100 * row['acc']:.2f}% in {row['wall_s']:.0f} s", flush=True)
    text = full_report(done, args, teacher_src, teacher_acc, len(dm.test_set))
    print(text)
    write(args.out.replace(".md", f"_full_{args.schedule}.md"),
          header("kdkit vs torchdistill: accuracy at equal epochs") + text)
    times = {side: statistics.fmean(r["wall_s"] for (s, _), r in done.items() if s == side) for side in SIDES}
    return times["kdkit"] / times["torchdistill"]


SIDES = ("kdkit", "torchdistill")


def _pct(row: dict | None) -> str:
    return f"{100 * row['acc']:.2f}" if row else "-"


def _secs(row: dict | None) -> str:
    return f"{row['wall_s']:.0f}" if row else "-"


def full_teacher(args, dm, runs: Path):
    """The frozen teacher both sides share: ``--teacher-ckpt``, or trained here once and kept in
    ``<runs-dir>/teacher.pt`` so that a continued run distils from the same weights."""
    teacher, _ = models()
    if args.teacher_ckpt:
        from kdkit.checkpoints import load_weights

        load_weights(teacher, args.teacher_ckpt, layout=args.teacher_layout)
        src = args.teacher_ckpt
    else:
        kept = runs / "teacher.pt"
        if kept.exists():
            teacher.load_state_dict(torch.load(kept, map_location="cpu", weights_only=True))
        else:
            train_teacher(teacher, dm.train_set, args.batch_size, args.teacher_epochs)
            torch.save(teacher.state_dict(), kept)
        src = f"trained by this script, {args.teacher_epochs} epochs ({kept})"
    return teacher.eval().requires_grad_(False), src


def train_side(side: str, student, teacher, train_set, args, seed: int):
    if side == "kdkit":
        make_trainer(max_epochs=args.epochs).fit(
            kdkit_task(student, teacher, args.schedule),
            datamodule=SharedDataModule(train_set, args.batch_size, True, seed=seed))
    else:
        loop = TorchdistillLoop(teacher, student, train_set, args.batch_size, True, args.epochs, args.schedule)
        for _ in range(args.epochs):
            loop.epoch_()
    return student


def full_report(done: dict, args, teacher_src: str, teacher_acc: float, test_size: int) -> str:
    seeds = sorted({seed for _, seed in done})
    acc = {side: {seed: done[(side, seed)]["acc"] for s, seed in done if s == side} for side in SIDES}
    lines = [f"- versions: {versions()}",
             f"- teacher resnet20 ({teacher_src}): {100 * teacher_acc:.2f}% test accuracy",
             f"- student resnet8, {args.epochs} epochs on each side, batch {args.batch_size}, lr {LR} "
             f"{'with cosine decay to 0 (per step)' if args.schedule == 'cosine' else 'constant'}, "
             f"CE + KD(T={TEMPERATURE}), random crop + flip (kdkit's `RandomCropFlip` on both sides); "
             f"one student initialisation per seed, copied to both; test set {test_size} images",
             "- the two sides of a seed ran one after the other in one process, one thread: wall times are "
             "no speed measure (`peers.md`'s interleaved step times are)",
             "", "| seed | kdkit (%) | torchdistill (%) | kdkit - torchdistill | kdkit s | torchdistill s | machine |",
             "|---|---|---|---|---|---|---|"]
    for seed in seeds:
        k, t = done.get(("kdkit", seed)), done.get(("torchdistill", seed))
        diff = f"{100 * (k['acc'] - t['acc']):+.2f}" if k and t else "-"
        lines.append(f"| {seed} | {_pct(k)} | {_pct(t)} | {diff} | {_secs(k)} | {_secs(t)} | {(k or t)['machine']} |")
    paired = [acc["kdkit"][s] - acc["torchdistill"][s] for s in seeds if s in acc["kdkit"] and s in acc["torchdistill"]]
    lines += ["", f"- kdkit {mean_std(list(acc['kdkit'].values()))}, torchdistill "
              f"{mean_std(list(acc['torchdistill'].values()))} (mean ± std over seeds)"]
    if len(paired) > 1:
        lines.append(f"- paired difference kdkit - torchdistill: {mean_std(paired)} points over {len(paired)} seeds")
    elif paired:
        lines.append(f"- paired difference kdkit - torchdistill: {100 * paired[0]:+.2f} points, 1 seed "
                     "(no spread yet: run more `--seeds`)")
    commands = sorted({row["command"] for row in done.values() if row.get("command")})
    lines += ["", "Rows measured by: " + "; ".join(f"`{c}`" for c in commands)] if commands else []
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["st"]:  # the sentence-transformers side by side (benchmarks/peers_st.py)
        from benchmarks.peers_st import main as st_main

        return st_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="step time only (the default mode)")
    p.add_argument("--full", action="store_true", help="accuracy at equal epochs instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=40, help="interleaved block pairs")
    p.add_argument("--block", type=int, default=5, help="steps per block")
    p.add_argument("--warmup", type=int, default=2, help="block pairs left out at the start")
    p.add_argument("--profile", action="store_true", help="profile even when kdkit is not slower")
    p.add_argument("--profile-above", type=float, default=0.02,
                   help="profile when the ratio exceeds 1 + this")
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--teacher-ckpt", default=None, help="trained teacher weights instead")
    p.add_argument("--teacher-layout", default=None, help="torchdistill | repdistiller | mdistiller")
    p.add_argument("--seeds", type=int, default=1, help="--full: student seeds (each trained on both sides)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="--full: the learning rate over the run, the same on both sides")
    p.add_argument("--runs-dir", default=None,
                   help="--full: one row per (side, seed) and the teacher it trained; a rerun continues "
                   "(default: benchmarks/runs/peers_full_<schedule>)")
    p.add_argument("--out", default="peers.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.full:  # sequential fits: a wall-time ratio, not the interleaved step ratio
        print(f"torchdistill_wall_ratio={full(args):.3f}")
    else:
        print(f"torchdistill_step_ratio={step_time(args):.3f}")


if __name__ == "__main__":
    main()
