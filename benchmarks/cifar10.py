"""CIFAR-10 distillation benchmark: one teacher, then every vision distiller at the same budget.

Protocol (all knobs are flags; defaults fit a 2-core CPU in about two hours):
  1. train the teacher once (or load --teacher-ckpt),
  2. train the baseline and one student per method with seed 0, the same epochs and init,
  3. repeat baseline, KD (and --more-seeds) with more seeds, queued behind step 2 so no worker
     idles, then the best method of seed 0,
  4. write mean ± std of final test accuracy to benchmarks/results/cifar10.md.

    python benchmarks/cifar10.py --experiment cifar10_resnet56_resnet8 --epochs 30 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    PAIRED_DELTA_NOTE, RunLog, command, cpu_of, epoch_means, header, machine, mean_std, paired_delta, raise_failures,
    run_all_jobs, write)

METHODS = ["kd", "dkd", "dist", "fitnet", "at", "rkd", "sp", "crd",
           # issue #16: the peers' classic distillers and the seed papers' logit methods
           "pkt", "vid", "cc", "ab", "ft", "fsp", "nst", "ofd", "reviewkd", "logit_std", "ctkd", "mlkd",
           "pld", "sinkd", "dhkd", "lelp", "msdcrd"]
# A method "a+b" runs distiller=[a,b] (feature methods combined with KD, as mdistiller reports them):
#   python benchmarks/cifar10.py --methods kd+fitnet,kd+at,kd+reviewkd ...


def method_overrides(method: str, epochs: int, steps_per_epoch: int) -> list[str]:
    """Per-method settings scaled to the short CPU schedule (written into the report); a
    combination ``a+b`` takes each part's."""
    if "+" in method:
        return [o for part in method.split("+") for o in method_overrides(part, epochs, steps_per_epoch)]
    if method == "dkd":  # mdistiller ramps DKD in over the first 1/12 of training (20 of 240 epochs)
        return [f"distiller.dkd.warmup_steps={max(1, epochs * steps_per_epoch // 12)}"]
    if method == "reviewkd":  # mdistiller: over the first 20 of 240 epochs, as DKD
        return [f"distiller.reviewkd.warmup_steps={max(1, epochs * steps_per_epoch // 12)}"]
    if method in ("ab", "fsp"):  # RepDistiller's init stage: 30 of 240 epochs
        return [f"distiller.{method}.epochs={max(1, epochs // 8)}"]
    if method == "ctkd":  # the temperature curriculum: 10 of 240 epochs
        return [f"distiller.ctkd.curriculum_epochs={max(1, epochs // 24)}"]
    if method == "crd":  # 16384 negatives of 50k in the paper; 4096 of 9k here keeps a step cheap
        return ["distiller.crd.nce_k=4096"]
    return []


def best_method(done: dict, methods: list[str]) -> str | None:
    """The distiller with the highest seed-0 test accuracy among those run."""
    ran = [m for m in methods if (m, 0) in done]
    return max(ran, key=lambda m: done[(m, 0)]["test/acc"]) if ran else None


def check_reproduced(before: dict | None, now: dict, out: Path, ckpt: Path) -> None:
    """Student rows recorded in an earlier session (their committed copy) were distilled from the
    teacher of ``before``; a teacher trained again here (its checkpoint went with its machine) may
    serve them only if it is the same teacher. Seeded, on the same CPU kind it is, to every digit;
    on another CPU kind (other fp32 kernels) it is not, and mixing the two would compare students
    of different teachers: set the new checkpoint aside (a resumed run would take it) and stop."""
    keys = ("test/acc", "val/acc")
    if before is None or all(before.get(k) == now.get(k) for k in keys):
        return
    ckpt.rename(ckpt.with_name(ckpt.name + ".not-reproduced"))
    raise SystemExit(
        f"[cifar10] the teacher trained again here scores {[now.get(k) for k in keys]} (test, val acc), "
        f"not the {[before.get(k) for k in keys]} of the teacher whose students {out}'s log already holds "
        f"(recorded on: {before.get('machine', 'an unrecorded machine')}). Different CPU kinds train different "
        "fp32 teachers: run with another --out (a fresh log) or on the machine kind that recorded them.")


def steps_per_epoch(common: list[str]) -> int:
    """Training batches per epoch of the benchmark's data (DKD's warm-up is set from it)."""
    from hydra.utils import instantiate

    from kdkit.compose import compose

    dm = instantiate(compose(common).data)
    dm.prepare_data()
    dm.setup("fit")
    return len(dm.train_dataloader())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cifar10_resnet56_resnet8")
    p.add_argument("--epochs", type=int, default=30, help="student epochs (baseline and every method)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: the experiment's")
    p.add_argument("--teacher-ckpt", default=None, help="reuse a trained teacher (teacher.pt)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="seeds for baseline, KD and the best method")
    p.add_argument("--all-seeds", action="store_true", help="run every method with --seeds seeds")
    p.add_argument("--more-seeds", default="dkd,crd,reviewkd",
                   help="methods that also get --seeds seeds, besides baseline, KD and the best one")
    p.add_argument("--report-only", action="store_true", help="rewrite cifar10.md from the runs so far")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the teacher run")
    p.add_argument("--jobs", type=int, default=1,
                   help="student runs in parallel, one torch thread each (2 on a 2-core box)")
    p.add_argument("--out", default="benchmarks/runs/cifar10")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    p.add_argument("--notes", default=None,
                   help="findings appended to the report (default: benchmarks/<out folder>_notes.md if it exists)")
    args = p.parse_args()

    import torch

    from kdkit.compose import compose
    from kdkit.pipeline import run

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = [f"experiment={args.experiment}", "trainer.enable_progress_bar=false", "logger=csv",
              *args.extra]
    log = RunLog(out / "results.jsonl", key=lambda row: (row["method"], row["seed"]))
    done, record = log.done, log.record

    args.steps_per_epoch = steps_per_epoch(common)
    methods = [m for m in args.methods.split(",") if m]
    if args.report_only:
        return report(args, done)

    teacher_ckpt = args.teacher_ckpt
    if teacher_ckpt is None:
        teacher_dir = out / "teacher"
        teacher_ckpt = str(teacher_dir / "teacher.pt")
        if ("teacher", 0) not in done or not Path(teacher_ckpt).exists():
            over = [*common, "stages.baseline=false", "stages.student=false"]
            if args.teacher_epochs:
                over.append(f"teacher.max_epochs={args.teacher_epochs}")
            res = run(compose(over, output_dir=str(teacher_dir)))["teacher"]
            check_reproduced(done.get(("teacher", 0)), res, out, Path(teacher_ckpt))
            record({"method": "teacher", "seed": 0, **res, "machine": machine(), "command": command(),
                    "train_loss_by_epoch": epoch_means(teacher_dir / "logs" / "teacher" / "metrics.csv")})

    def overrides(method: str, seed: int) -> list[str]:
        over = [*common, f"teacher.ckpt_path={teacher_ckpt}", "stages.teacher=false",
                f"trainer.max_epochs={args.epochs}", f"seed={seed}"]
        if method == "baseline":
            return over + ["stages.student=false"]
        return over + ["stages.baseline=false", f"distiller=[{method.replace('+', ',')}]",
                       *method_overrides(method, args.epochs, args.steps_per_epoch)]

    failed: list[str] = []  # runs that failed: the other rows and the report go on, then they are raised

    def run_all(todo: list[tuple[str, int]]) -> None:
        jobs = [(m, s, overrides(m, s), str(out / f"{m}_s{s}")) for m, s in dict.fromkeys(todo) if (m, s) not in done]
        for row in run_all_jobs(jobs, args.jobs, args.threads, failed):  # recorded as each finishes: resumable
            record({**row, "command": command()})
            print(f"[cifar10] {row['method']} seed {row['seed']}: test/acc {row['test/acc']:.4f} "
                  f"({row['wall_s']:.0f} s)", flush=True)

    def repeats(ms: list[str | None]) -> list[tuple[str, int]]:
        ms = [m for m in dict.fromkeys(ms) if m and (m == "baseline" or m in methods)]
        return [(m, seed) for seed in range(1, args.seeds) for m in ms]

    # the repeats known before seed 0 finishes queue behind it, so a worker freed by a short row
    # takes one instead of idling until the slowest seed 0 has named the best method
    known = ["baseline", *methods] if args.all_seeds else ["baseline", "kd", *args.more_seeds.split(",")]
    run_all([(m, 0) for m in ["baseline", *methods]] + repeats(known))
    run_all(repeats([best_method(done, methods)]))
    report(args, done)
    raise_failures(failed)


def report(args, done: dict) -> None:
    teacher = done.get(("teacher", 0))
    by_method: dict[str, list[dict]] = {}
    for (method, _seed), row in sorted(done.items(), key=lambda kv: kv[0][1]):
        if method != "teacher":
            by_method.setdefault(method, []).append(row)
    base = {r["seed"]: r["test/acc"] for r in by_method.get("baseline", [])}
    lines = [header("CIFAR-10 distillation benchmark"), "",
             f"Experiment `{args.experiment}`, student epochs {args.epochs}; final-epoch test accuracy "
             "on the 10,000 CIFAR-10 test images (%). Same init and data order for every student of a seed.",
             ""]
    if teacher:
        epochs = f", {args.teacher_epochs} epochs" if args.teacher_epochs else " (the experiment's epochs)"
        val = f" (val {teacher['val/acc'] * 100:.2f}%)" if "val/acc" in teacher else ""
        lines.append(f"Teacher{epochs}: {teacher['test/acc'] * 100:.2f}% test accuracy{val}, "
                     f"{teacher['params']:,} parameters{cpu_of(teacher)}.\n")
    tuned = {m: method_overrides(m, args.epochs, args.steps_per_epoch) for m in by_method}
    lines += [f"Per-method overrides: `{m}`: {', '.join(f'`{o}`' for o in over)}."
              for m, over in tuned.items() if over]
    ran = dict.fromkeys(r["command"] for r in done.values() if "command" in r)
    if ran:  # the header names the command that wrote this file, maybe --report-only
        lines += ["Rows measured by: " + "; ".join(f"`{c}`" for c in ran) + ".", ""]
    if args.extra:
        lines.append(f"Overrides of every student run: {', '.join(f'`{o}`' for o in args.extra)}.")
    lines += ["Every other hyper-parameter is the distiller's yaml default (the papers' CIFAR values).", ""]
    lines += [PAIRED_DELTA_NOTE, ""]
    lines += ["Train loss: the mean training loss of the last epoch (task loss plus every distiller's "
              "weighted loss, so compare it within a row), and its change over the last tenth of the "
              "epochs: near 0 when the student has reached its floor.", ""]
    lines += ["| method | seeds | test acc (%) | Δ vs baseline | train loss, last epoch (Δ last tenth) | params | "
              "train time / run (s) |", "|---|---|---|---|---|---|---|"]
    order = ["baseline", *[m for m in by_method if m != "baseline"]]
    for method in order:
        rows = by_method.get(method, [])
        if not rows:
            continue
        accs = [r["test/acc"] for r in rows]
        delta = paired_delta(rows, base) * 100
        fit = statistics.mean(r.get("fit_seconds", 0) for r in rows)
        lines.append(f"| {method} | {len(rows)} | {mean_std(accs)} | {delta:+.2f} | {convergence(rows)} | "
                     f"{rows[0]['params']:,} | {fit:.0f} |")
    # over every single method recorded, not only this run's --methods
    lines += ["", f"Best single method at seed 0: `{best_method(done, METHODS)}`.", ""]
    notes = Path(args.notes or f"benchmarks/{Path(args.out).name}_notes.md")
    if notes.exists():
        lines += ["## Reading the table", "", notes.read_text().strip(), ""]
    name = "cifar10.md" if Path(args.out).name == "cifar10" else f"{Path(args.out).name}.md"
    write(name, "\n".join(lines))


def convergence(rows: list[dict]) -> str:
    """Mean last-epoch train loss over a method's seeds and its change over the last tenth of
    the epochs, from each row's ``train_loss_by_epoch``; "-" for rows recorded without it."""
    curves = [r["train_loss_by_epoch"] for r in rows if len(r.get("train_loss_by_epoch") or []) >= 2]
    if not curves:
        return "-"
    tail = [max(1, len(c) // 10) for c in curves]
    last = statistics.mean(c[-1] for c in curves)
    change = statistics.mean(c[-1] - c[-1 - t] for c, t in zip(curves, tail))
    return f"{last:.3f} ({change:+.3f})"


if __name__ == "__main__":
    main()
