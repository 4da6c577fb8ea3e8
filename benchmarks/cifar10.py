"""CIFAR-10 distillation benchmark: one teacher, then every vision distiller at the same budget.

Protocol (all knobs are flags; defaults fit a 2-core CPU in about two hours):
  1. train the teacher once (or load --teacher-ckpt),
  2. train the baseline and one student per method with seed 0, the same epochs and init,
  3. repeat baseline, KD and the best method with more seeds,
  4. write mean ± std of final test accuracy to benchmarks/results/cifar10.md.

    python benchmarks/cifar10.py --experiment cifar10_resnet56_resnet8 --epochs 30 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import header, mean_std, write  # noqa: E402

METHODS = ["kd", "dkd", "dist", "fitnet", "at", "rkd", "sp", "crd"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cifar10_resnet56_resnet8")
    p.add_argument("--epochs", type=int, default=30, help="student epochs (baseline and every method)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: the experiment's")
    p.add_argument("--teacher-ckpt", default=None, help="reuse a trained teacher (teacher.pt)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="seeds for baseline, KD and the best method")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/runs/cifar10")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()

    import torch

    from kdkit.compose import compose
    from kdkit.pipeline import run

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = [f"experiment={args.experiment}", "trainer.enable_progress_bar=false", "logger=csv",
              *args.extra]
    cache = out / "results.jsonl"
    done = {}
    if cache.exists():  # the benchmark itself resumes: finished runs are read back
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            done[(row["method"], row["seed"])] = row

    def record(row: dict) -> None:
        done[(row["method"], row["seed"])] = row
        with cache.open("a") as f:
            f.write(json.dumps(row) + "\n")

    teacher_ckpt = args.teacher_ckpt
    if teacher_ckpt is None:
        teacher_dir = out / "teacher"
        teacher_ckpt = str(teacher_dir / "teacher.pt")
        if ("teacher", 0) not in done or not Path(teacher_ckpt).exists():
            over = [*common, "stages.baseline=false", "stages.student=false"]
            if args.teacher_epochs:
                over.append(f"teacher.max_epochs={args.teacher_epochs}")
            res = run(compose(over, output_dir=str(teacher_dir)))["teacher"]
            record({"method": "teacher", "seed": 0, **res})

    def student(method: str, seed: int) -> dict:
        if (method, seed) in done:
            return done[(method, seed)]
        over = [*common, f"teacher.ckpt_path={teacher_ckpt}", "stages.teacher=false",
                f"trainer.max_epochs={args.epochs}", f"seed={seed}"]
        if method == "baseline":
            over += ["stages.student=false"]
        else:
            over += ["stages.baseline=false", f"distiller=[{method}]"]
        start = time.time()
        res = run(compose(over, output_dir=str(out / f"{method}_s{seed}")))
        row = {"method": method, "seed": seed, **res["baseline" if method == "baseline" else "student"],
               "wall_s": round(time.time() - start, 1)}
        record(row)
        print(f"[cifar10] {method} seed {seed}: test/acc {row['test/acc']:.4f}", flush=True)
        return row

    methods = [m for m in args.methods.split(",") if m]
    for method in ["baseline", *methods]:
        student(method, 0)
    best = max(methods, key=lambda m: done[(m, 0)]["test/acc"]) if methods else None
    for seed in range(1, args.seeds):
        for method in dict.fromkeys(["baseline", "kd", best]):
            if method and (method == "baseline" or method in methods):
                student(method, seed)
    report(args, done, best)


def report(args, done: dict, best: str | None) -> None:
    teacher = done.get(("teacher", 0))
    by_method: dict[str, list[dict]] = {}
    for (method, _seed), row in sorted(done.items(), key=lambda kv: kv[0][1]):
        if method != "teacher":
            by_method.setdefault(method, []).append(row)
    base = statistics.mean(r["test/acc"] for r in by_method.get("baseline", [{"test/acc": 0}]))
    lines = [header("CIFAR-10 distillation benchmark"), "",
             f"Experiment `{args.experiment}`, student epochs {args.epochs}; final-epoch test accuracy "
             "on the 10,000 CIFAR-10 test images (%). Same init and data order for every student of a seed.",
             ""]
    if teacher:
        lines.append(f"Teacher: {teacher['test/acc'] * 100:.2f}% test accuracy, {teacher['params']:,} parameters.\n")
    lines += ["| method | seeds | test acc (%) | Δ vs baseline | params | train time / run (s) |",
              "|---|---|---|---|---|---|"]
    order = ["baseline", *[m for m in by_method if m != "baseline"]]
    for method in order:
        rows = by_method.get(method, [])
        if not rows:
            continue
        accs = [r["test/acc"] for r in rows]
        delta = (statistics.mean(accs) - base) * 100
        fit = statistics.mean(r.get("fit_seconds", 0) for r in rows)
        lines.append(f"| {method} | {len(rows)} | {mean_std(accs)} | {delta:+.2f} | "
                     f"{rows[0]['params']:,} | {fit:.0f} |")
    lines += ["", f"Best single method at seed 0: `{best}`."]
    write("cifar10.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
