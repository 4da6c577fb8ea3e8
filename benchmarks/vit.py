"""Vision transformers on CIFAR-10: a CNN teacher -> a tiny ViT from scratch, and a ViT teacher ->
a smaller ViT that inherits its weights (issue #15). Resumable: every finished run is a line of
``<out>/results.jsonl``; rerun the same command to continue, ``--report-only`` to rewrite
``benchmarks/results/vit.md`` from what has finished.

    # CNN teacher (a trained resnet20, e.g. the one benchmarks/cifar10.py trained) -> vit_tiny
    python benchmarks/vit.py cnn --teacher-ckpt benchmarks/runs/cifar10_20k/teacher/teacher.pt \\
        --epochs 40 --seeds 3 --jobs 2
    # ViT teacher (vit_small, trained here) -> vit_tiny, inherited vs random init, equal budget
    python benchmarks/vit.py vit --teacher-epochs 40 --epochs 40 --jobs 2
    # time per training step of each method relative to plain KD (interleaved, one process)
    python benchmarks/vit.py steps
    # how often the teacher's hard label (DeiT's hard distillation target) is the true label
    python benchmarks/vit.py labels --teacher-ckpt benchmarks/runs/cifar10_20k/teacher/teacher.pt

Rows of ``cnn``: the ViT alone, KD (class token), DeiT hard / soft (distillation token), DeiT's
hard label on the class token (no distillation token), CSKD, TRG, FitNet and AT through the
token <-> map adapter, OFA-KD's branch heads, masked feature distillation (also at FitNet's loss
weight, so that it differs from FitNet only by the mask); the ViT alone, KD and
DeiT hard again with DeiT's strong augmentation (``*_strong_aug``). Seeds 1.. for the baseline,
KD and the best two.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    RAW,
    RunLog,
    command,
    cpu_of,
    header,
    machine,
    PAIRED_DELTA_NOTE,
    mean_std,
    paired_delta,
    raise_failures,
    restored_note,
    run_all_jobs,
    write,
)

STEPS = RAW / "vit_steps.md"  # the step-time table (``steps``), embedded in vit.md by report()
LABELS = RAW / "vit_teacher_labels.md"  # ``labels``' table, embedded in vit.md by report()
NOTES = Path(__file__).resolve().parent / "vit_notes.md"  # findings written by hand, embedded after the tables

PLAIN = ["student=vit_tiny"]  # no distillation token: it would average an untrained head in
# DeiT's own data recipe (Touvron et al. 2021, Table 8): RandAugment 2 ops of magnitude 9, random
# erasing 0.25, Mixup 0.8 / CutMix 1.0 (one of the two per batch); the teacher sees the mixed images
STRONG = ["data.randaugment_ops=2", "data.random_erasing=0.25", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0"]
# MFD (pixel masking, ratio 0.5) on FitNet's taps: the ViT's last block <-> the CNN's last stage
MFD_TAPS = [*PLAIN, "distiller=[mfd]", "task.task_loss_weight=1.0", "distiller.mfd.student_feature=blocks.3",
            "distiller.mfd.student_prefix_tokens=1", "distiller.mfd.teacher_feature=layer3"]
CNN_METHODS = {
    "baseline": [*PLAIN, "stages.student=false"],
    "kd": [*PLAIN, "distiller=[kd]", "task.task_loss_weight=1.0"],
    "deit_hard": [],  # the experiment as it is
    "deit_soft": ["distiller.deit.mode=soft", "distiller.deit.weight=0.1", "task.task_loss_weight=0.9"],
    "hard_class_token": [*PLAIN, "distiller.deit.student_feature=head"],
    # KD's loss weights and temperature on the distillation token: differs from `kd` only in the
    # head the teacher's distribution trains (deit_soft keeps the paper's lambda = 0.1, tau = 3)
    "deit_soft_kd_weights": ["distiller.deit.mode=soft", "distiller.deit.weight=1.0", "distiller.deit.temperature=4.0",
                             "task.task_loss_weight=1.0"],
    "cskd": ["distiller=[cskd]"],
    "trg": [*PLAIN, "distiller=[trg]", "task.task_loss_weight=1.0", "distiller.trg.student_feature=blocks.3",
            "distiller.trg.student_prefix_tokens=1", "distiller.trg.teacher_feature=layer3"],
    "fitnet": [*PLAIN, "distiller=[fitnet]", "task.task_loss_weight=1.0", "distiller.fitnet.student_feature=blocks.3",
               "distiller.fitnet.teacher_feature=layer3", "distiller.fitnet.student_prefix_tokens=1"],
    "at": [*PLAIN, "distiller=[at]", "task.task_loss_weight=1.0", "distiller.at.pairs=[[blocks.1,layer2],[blocks.3,layer3]]",
           "distiller.at.student_prefix_tokens=1"],
    "ofa": [*PLAIN, "distiller=[ofa]", "task.task_loss_weight=1.0", "distiller.ofa.stages=[blocks.0,blocks.1,blocks.2]",
            "distiller.ofa.student_prefix_tokens=1", "distiller.ofa.variant=official"],
    "ofa_simple": [*PLAIN, "distiller=[ofa]", "task.task_loss_weight=1.0", "distiller.ofa.stages=[blocks.0,blocks.1,blocks.2]",
                   "distiller.ofa.student_prefix_tokens=1", "distiller.ofa.variant=official", "distiller.ofa.branch=simple"],
    "baseline_strong_aug": [*PLAIN, "stages.student=false", *STRONG],
    "kd_strong_aug": [*PLAIN, "distiller=[kd]", "task.task_loss_weight=1.0", *STRONG],
    "deit_hard_strong_aug": [*STRONG],
    "mfd": MFD_TAPS,
    # the same with MAE-style token dropping: the student's blocks encode only the visible patches
    "mfd_tokens": [*MFD_TAPS, "distiller.mfd.masking=tokens"],
    # MFD at FitNet's loss weight (100, RepDistiller's; MFD's yaml keeps DMAE / CLIP-KD's 1.0): the
    # same taps, adapter and weight as `fitnet`, so it differs from it only by the masking
    "mfd_fitnet_weight": [*MFD_TAPS, "distiller.mfd.weight=100.0"],
    # ... and with the task loss on a second, unmasked forward: it differs from `fitnet` only in
    # that the distilled features come from the masked view, at the visible patches
    "mfd_full_view_fitnet_weight": [*MFD_TAPS, "distiller.mfd.weight=100.0", "distiller.mfd.task_view=full"],
    "mfd_full_view": [*MFD_TAPS, "distiller.mfd.task_view=full"],
}
VIT_METHODS = {
    "baseline": ["stages.student=false"],
    "kd": [],
    "baseline_random_init": ["stages.student=false", "student.init=null"],
    "kd_random_init": ["student.init=null"],
}
TIMED = [m for m in CNN_METHODS if not m.startswith("baseline")]  # ``steps``' rows: a baseline has no distiller
PARTS = {"cnn": ("cifar10_deit", CNN_METHODS), "vit": ("cifar10_vit_vit", VIT_METHODS)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["cnn", "vit", "steps", "labels"])
    p.add_argument("--epochs", type=int, default=40, help="student epochs of every row")
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--teacher-ckpt", default=None, help="a trained teacher.pt (cnn: required)")
    p.add_argument("--methods", default=None, help="comma-separated rows (default: all of the part; "
                   "steps: KD and these rows, into their own table)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the baseline, KD and the best two")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each")
    p.add_argument("--threads", type=int, default=2, help="torch threads of a teacher run / steps")
    p.add_argument("--out", default=None, help="default: benchmarks/runs/vit_<part>")
    p.add_argument("--rounds", type=int, default=6, help="steps: turns of 3 steps per row (the first warms up)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()
    if args.part == "steps":
        return step_times(args)
    if args.part == "labels":
        return teacher_labels(args)
    experiment, table = PARTS[args.part]
    methods = [m for m in (args.methods.split(",") if args.methods else table) if m]
    unknown = sorted(set(methods) - set(table))
    if unknown:
        p.error(f"unknown rows {unknown}; rows of {args.part}: {', '.join(table)}")
    out = Path(args.out or f"benchmarks/runs/vit_{args.part}")
    common = [f"experiment={experiment}", "data.train_limit=null", "trainer.enable_progress_bar=false",
              "logger=csv", "export.programs=[]", f"trainer.max_epochs={args.epochs}", *args.extra]
    log = RunLog(out / "results.jsonl", key=lambda row: (row["part"], row["method"], row["seed"]))
    if args.teacher_ckpt:
        record_given_teacher(args.part, Path(args.teacher_ckpt), log)
    failed: list[str] = []  # runs that failed: the other rows and the report go on, then they are raised
    if not args.report_only:
        teacher_ckpt = args.teacher_ckpt or train_teacher(args, common, out, log)
        over = {m: [*common, f"teacher.ckpt_path={teacher_ckpt}", "stages.teacher=false",
                    *([] if m.startswith("baseline") else ["stages.baseline=false"]), *table[m]]
                for m in methods}
        repeats = lambda ms: [(m, s) for s in range(1, args.seeds) for m in ms if m in methods]  # noqa: E731
        # the baseline's and KD's repeats queue behind every seed 0, so a worker freed by a short
        # row takes one instead of idling until the slowest seed 0 has picked the best two
        for todo in (lambda: [(m, 0) for m in methods] + repeats(["baseline", "kd"]),
                     lambda: repeats(best(log, args.part, methods, 2))):
            jobs = [(m, s, [*over[m], f"seed={s}"], str(out / f"{m}_s{s}"))
                    for m, s in todo() if (args.part, m, s) not in log.done]
            for row in run_all_jobs(jobs, args.jobs, args.threads, failed):
                log.record({"part": args.part, **row, "command": command()})
                print(f"[vit {args.part}] {row['method']} seed {row['seed']}: test/acc "
                      f"{row['test/acc']:.4f} ({row['wall_s']:.0f} s)", flush=True)
    logs = {part: RunLog(Path(f"benchmarks/runs/vit_{part}") / "results.jsonl", key=log.key) for part in PARTS}
    logs[args.part] = RunLog(out / "results.jsonl", key=log.key)  # read again: another runner may have added rows
    report(logs)
    raise_failures(failed)


def record_given_teacher(part: str, ckpt: Path, log: RunLog) -> None:
    """The teacher row of a ``--teacher-ckpt`` trained by a kdkit run, read from the
    ``results.json`` beside it (once), so the report names the teacher every row distilled.

    The log's rows all distilled the teacher recorded first: a given teacher whose own run
    measured another test accuracy or parameter count is refused (its rows would sit in one
    table with rows of another teacher), e.g. one retrained on a machine where it came out
    different, or on more data."""
    results = ckpt.parent / "results.json"
    if not results.exists():
        return
    teacher = json.loads(results.read_text()).get("teacher")
    recorded = log.done.get((part, "teacher", 0))
    if recorded is not None:
        if teacher and any(abs(float(teacher[k]) - float(recorded[k])) > 1e-6 for k in ("test/acc", "params")
                           if k in teacher and k in recorded):
            raise SystemExit(
                f"--teacher-ckpt {ckpt}: its run measured test/acc {teacher.get('test/acc')} with "
                f"{teacher.get('params')} parameters, but this log's rows distilled a teacher of test/acc "
                f"{recorded.get('test/acc')} with {recorded.get('params')} parameters ({log.path}): give that "
                "teacher, or --out a new folder for rows of this one")
        return
    if teacher:
        machines = RunLog(ckpt.parent.parent / "results.jsonl", key=lambda row: row.get("method"), archive=False).done
        trained_on = machines.get("teacher", {}).get("machine")
        log.record({"part": part, "method": "teacher", "seed": 0, **teacher, "teacher_ckpt": str(ckpt),
                    **({"machine": trained_on} if trained_on else {})})


def train_teacher(args, common: list[str], out: Path, log: RunLog) -> str:
    """The part's teacher, trained once into ``<out>/teacher/teacher.pt`` (its row recorded)."""
    import torch

    from kdkit.compose import compose
    from kdkit.pipeline import run

    path = out / "teacher" / "teacher.pt"
    if (args.part, "teacher", 0) not in log.done or not path.exists():
        torch.set_num_threads(args.threads)
        over = [*common, "stages.baseline=false", "stages.student=false", f"teacher.max_epochs={args.teacher_epochs}"]
        res = run(compose(over, output_dir=str(path.parent)))["teacher"]
        log.record({"part": args.part, "method": "teacher", "seed": 0, **res, "machine": machine(),
                    "command": command()})
    return str(path)


def best(log: RunLog, part: str, methods: list[str], k: int) -> list[str]:
    """The ``k`` distillers other than plain KD with the highest seed-0 test accuracy (KD always
    gets its seeds, so counting it here would queue it twice and give the best two one row)."""
    ran = [m for m in methods if m != "kd" and not m.startswith("baseline") and (part, m, 0) in log.done]
    return sorted(ran, key=lambda m: -log.done[(part, m, 0)]["test/acc"])[:k]


def report(logs: dict[str, RunLog]) -> None:
    """``vit.md`` from every part's runs so far (``logs``: part -> its RunLog) and the step times."""
    lines = [header("Vision transformers on CIFAR-10"), ""]
    for part, (experiment, table) in PARTS.items():
        rows = [r for (p, _, _), r in logs[part].done.items() if p == part]
        if not rows:
            continue
        by_method: dict[str, list[dict]] = {}
        for row in sorted(rows, key=lambda r: r["seed"]):
            by_method.setdefault(row["method"], []).append(row)
        teacher = by_method.pop("teacher", [None])[0]
        base = {r["seed"]: r["test/acc"] for r in by_method.get("baseline", [])}
        lines += [f"## `{experiment}` on every shared training image", ""]
        if teacher:
            given = f" (`{teacher['teacher_ckpt']}`, given by `--teacher-ckpt`)" if "teacher_ckpt" in teacher else ""
            lines.append(f"Teacher{given}: {teacher['test/acc'] * 100:.2f}% test accuracy, {teacher['params']:,} "
                         f"parameters, {teacher['fit_seconds']:.0f} s of training{cpu_of(teacher)}.\n")
        else:
            lines.append("Teacher: the checkpoint given by `--teacher-ckpt` (not trained by this benchmark).\n")
        lines += restored_note(rows)
        ran = dict.fromkeys(r["command"] for r in rows if "command" in r)
        if ran:  # the epochs and overrides every row ran with
            lines += ["Rows measured by: " + "; ".join(f"`{c}`" for c in ran) + ".", ""]
        lines.append("Train times are wall seconds of one-thread runs on a shared 2-core machine (other runs "
                     "alongside, and any time a run was paused), counted by the fit that finished the run: a run "
                     "resumed from its checkpoint counts only its last part. "
                     "They are no speed comparison: see the step times below for that.\n")
        lines.append(PAIRED_DELTA_NOTE + "\n")
        lines += ["| row | overrides | seeds | test acc (%) | Δ vs baseline | params | train time / run (s) |",
                  "|---|---|---|---|---|---|---|"]
        for method in [m for m in table if m in by_method]:
            accs = [r["test/acc"] for r in by_method[method]]
            fit = statistics.mean(r.get("fit_seconds", 0) for r in by_method[method])
            over = ", ".join(f"`{o}`" for o in table[method]) or "(the experiment)"
            lines.append(f"| {method} | {over} | {len(accs)} | {mean_std(accs)} | "
                         f"{paired_delta(by_method[method], base) * 100:+.2f} | {by_method[method][0]['params']:,} | {fit:.0f} |")
        lines.append("")
    if not any(log.done for log in logs.values()):
        lines += ["No full-data row has finished yet: the rows run in pieces (each run resumes from its "
                  "last epoch's checkpoint), and this file lists them as they finish.", ""]
    for extra in [NOTES, LABELS, *sorted(RAW.glob("vit_steps*.md"))]:  # notes, labels, the full step table, subsets
        if extra.exists():
            lines += [extra.read_text()]
    write("vit.md", "\n".join(lines) + "\n")


def teacher_labels(args) -> None:
    """How often the teacher's argmax (DeiT's hard distillation target) equals the true label on
    the training images of ``cifar10_deit``, as stored and through the loader's crop + flip: where
    they agree, the distillation head's hard target is the label the class head already has."""
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from kdkit.checkpoints import load_weights
    from kdkit.compose import compose

    if not args.teacher_ckpt:
        raise SystemExit("labels: --teacher-ckpt is required")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the crops and flips
    cfg = compose(["experiment=cifar10_deit", "data.train_limit=null"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    teacher = load_weights(instantiate(cfg.teacher.model), args.teacher_ckpt).eval()
    mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.std).view(1, -1, 1, 1)
    lines = ["## How often the teacher's hard label is the true label", "",
             f"`python benchmarks/vit.py labels --teacher-ckpt {args.teacher_ckpt}`: the teacher's argmax on the "
             f"training images of `cifar10_deit` ({machine()}, {dt.date.today()}).", "",
             "| view | images | argmax = label (%) | mean top-1 probability |", "|---|---|---|---|"]
    for view, dataset in (("as stored", dm.plain_train_set), ("loader's crop + flip", dm.train_set)):
        agree, top1, n = 0, 0.0, 0
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=500):
                probs = teacher((batch["image"] - mean) / std).softmax(-1)
                agree += (probs.argmax(1) == batch["label"]).sum().item()
                top1 += probs.max(1).values.sum().item()
                n += len(batch["label"])
        lines.append(f"| {view} | {n} | {100 * agree / n:.2f} | {top1 / n:.3f} |")
    LABELS.parent.mkdir(parents=True, exist_ok=True)
    LABELS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def endless(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def step_times(args) -> None:
    """Median time of one training step (drawing the batch from the row's own train loader,
    teacher forward, student forward/backward, optimizer step) of every ``cnn`` row, relative to
    KD's: the rows take turns, a few steps each, so machine noise hits them alike. The loader is
    in the step because the ``*_strong_aug`` rows differ only there (RandAugment, erasing, Mixup /
    CutMix); rows with the same data config share one loader."""
    import torch
    from hydra.utils import instantiate

    from kdkit.compose import compose
    from kdkit.pipeline import make_task
    from kdkit.student_init import make_student
    from kdkit.teachers import make_distillers

    torch.set_num_threads(args.threads)
    chosen = [m for m in args.methods.split(",") if m] if args.methods else None
    rows = ["kd", *[m for m in chosen if m != "kd"]] if chosen else TIMED
    unknown = sorted(set(rows) - set(TIMED))
    if unknown:
        raise SystemExit(f"steps: unknown or untimed rows {unknown}; rows: {', '.join(TIMED)}")
    from omegaconf import OmegaConf

    tasks, optimizers, loaders, batches = {}, {}, {}, {}
    for method in rows:
        cfg = compose(["experiment=cifar10_deit", *CNN_METHODS[method]])
        data_key = OmegaConf.to_yaml(cfg.data)
        if data_key not in loaders:
            dm = instantiate(cfg.data)
            dm.prepare_data()
            dm.setup("fit")
            loaders[data_key] = (dm, endless(dm.train_dataloader()))
        dm, batches[method] = loaders[data_key]
        teacher = instantiate(cfg.teacher.model)
        task = make_task(cfg, student=make_student(cfg), teachers={"teacher": teacher},
                         distillers=make_distillers(cfg), teacher_cfgs={"teacher": cfg.teacher}, probe=True)
        task.build(dm.example_batch(), dm.num_train_samples, dm.num_classes)
        tasks[method], optimizers[method] = task, task.optimizer_factory(task.param_groups())
    times: dict[str, list[float]] = {m: [] for m in rows}
    for rnd in range(args.rounds):
        for method in rows:
            task, opt = tasks[method], optimizers[method]
            for step in range(3):
                start = time.perf_counter()
                losses, _ = task.losses(next(batches[method]))
                torch.stack([v.float() for v in losses.values()]).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if rnd > 0:  # the first round warms up every row
                    times[method].append(time.perf_counter() - start)
    kd = statistics.median(times["kd"])
    subset = f" --methods {args.methods}" if chosen else ""
    lines = [f"## Time per training step relative to KD (`cnn` rows{': ' + ', '.join(rows[1:]) if chosen else ''})", "",
             f"`python benchmarks/vit.py steps --threads {args.threads} --rounds {args.rounds}{subset}`: batch 128 "
             "drawn from the row's own train loader (in the step's time), resnet20 teacher -> "
             f"vit_tiny(_distilled), {len(times['kd'])} timed steps per row taken in turns of 3; "
             f"{machine()}, {dt.date.today()}; 1-minute load average at the end {os.getloadavg()[0]:.1f} "
             "(other processes on the cores slow every row alike, since the rows take turns).", "",
             "| row | median step (ms) | vs KD |", "|---|---|---|"]
    lines += [f"| {m} | {statistics.median(t) * 1000:.0f} | {statistics.median(t) / kd:.2f}x |" for m, t in times.items()]
    path = RAW / f"vit_steps_{'_'.join(rows[1:])}.md" if chosen else STEPS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
