"""CLIP distillation benchmark on CIFAR-10 image-caption pairs (experiment ``cifar10_clip``).

Protocol (every knob is a flag):
  1. train the tiny CLIP teacher once (or load --teacher-ckpt) and test it,
  2. for each seed: the baseline (CLIP loss alone) and one student per distiller alone, all with
     the same epochs, init and data order,
  3. for each seed: the best combination (the two best single distillers by seed-0 validation
     zero-shot accuracy, together),
  4. write mean ± std of zero-shot accuracy and retrieval recalls to benchmarks/results/clip.md.

Runs are recorded in <out>/results.jsonl as they finish, so an interrupted benchmark resumes.
With --lock, each run holds the lock file (e.g. /work/cpu.lock on a shared box) while it runs.

    python benchmarks/clip.py --seeds 3 --lock /work/cpu.lock
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RunLog, header, mean_std, write  # noqa: E402

METHODS = ["clip_fd", "clip_icl", "clip_crd", "affinity"]
# affinity's gradient equals clip_crd's (the losses differ by the teacher's entropy, a constant):
# the automatic combination never pairs a distiller with its own duplicate.
SAME_GRADIENT = {"affinity": "clip_crd", "clip_crd": "affinity"}
METRICS = ["test/zeroshot_acc", "test/i2t_r@1", "test/t2i_r@1", "test/i2t_r@5", "test/t2i_r@5"]


@contextlib.contextmanager
def held(lock: str | None):
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cifar10_clip")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the experiment's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: the experiment's")
    p.add_argument("--teacher-ckpt", default=None, help="reuse a trained teacher (teacher.pt)")
    p.add_argument("--methods", default=",".join(METHODS), help="single distillers to compare")
    p.add_argument("--combo", default="auto",
                   help="'a+b' distillers trained together; auto: the two best singles at seed 0; none")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lock", default=None, help="file locked (flock) around each run")
    p.add_argument("--out", default="benchmarks/runs/clip")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()

    import torch

    from kdkit.compose import compose
    from kdkit.pipeline import run

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"experiment={args.experiment}", "trainer.enable_progress_bar=false", "logger=none",
              "callbacks=none", *args.extra]
    if args.epochs:
        common.append(f"trainer.max_epochs={args.epochs}")
    log = RunLog(out / "results.jsonl", key=lambda row: (row["method"], row["seed"]))
    done = log.done

    def record(row: dict) -> dict:
        log.record(row)
        shown = {k: round(v, 4) for k, v in row.items() if k in METRICS[:3]}
        print(f"[clip] {row['method']} seed {row['seed']}: {shown} ({row['wall_s']} s)", flush=True)
        return row

    teacher_ckpt = args.teacher_ckpt
    if teacher_ckpt is None:
        teacher_dir = out / "teacher"
        teacher_ckpt = str(teacher_dir / "teacher.pt")
        if ("teacher", 0) not in done or not Path(teacher_ckpt).exists():
            over = [*common, "stages.baseline=false", "stages.student=false"]
            if args.teacher_epochs:
                over.append(f"teacher.max_epochs={args.teacher_epochs}")
            start = time.time()
            with held(args.lock):
                res = run(compose(over, output_dir=str(teacher_dir)))["teacher"]
            record({"method": "teacher", "seed": 0, **res, "wall_s": round(time.time() - start, 1)})

    def student(method: str, seed: int) -> dict:
        if (method, seed) in done:
            return done[(method, seed)]
        over = [*common, f"teacher.ckpt_path={teacher_ckpt}", "stages.teacher=false", f"seed={seed}"]
        if method == "baseline":
            over.append("stages.student=false")
        else:
            over += ["stages.baseline=false", f"distiller=[{method.replace('+', ',')}]"]
        start = time.time()
        with held(args.lock):
            res = run(compose(over, output_dir=str(out / f"{method}_s{seed}")))
        stage = "baseline" if method == "baseline" else "student"
        return record({"method": method, "seed": seed, **res[stage], "wall_s": round(time.time() - start, 1)})

    methods = [m for m in args.methods.split(",") if m]
    for seed in range(args.seeds):
        for method in ["baseline", *methods]:
            student(method, seed)
        combo = args.combo
        if combo == "auto":
            # chosen on the held-out validation images (test only where a run has no val/)
            ranked = sorted(methods, key=lambda m: -done[(m, 0)].get(
                "val/zeroshot_acc", done[(m, 0)]["test/zeroshot_acc"]))
            picked = []
            for m in ranked:
                if SAME_GRADIENT.get(m) not in picked and len(picked) < 2:
                    picked.append(m)
            combo = "+".join(picked) if len(picked) == 2 else "none"
        if combo != "none":
            student(combo, seed)
    report(args, done)


def report(args, done: dict) -> None:
    teacher = done.get(("teacher", 0))
    by_method: dict[str, list[dict]] = {}
    for (method, _seed), row in sorted(done.items(), key=lambda kv: kv[0][1]):
        if method != "teacher":
            by_method.setdefault(method, []).append(row)
    base = statistics.mean(r["test/zeroshot_acc"] for r in by_method["baseline"])
    lines = [header("CLIP distillation benchmark (CIFAR-10 image-caption pairs)"), "",
             f"Experiment `{args.experiment}` ({' '.join(args.extra) or 'no extra overrides'}). "
             "Metrics on the 10,000 CIFAR-10 test images (%): zero-shot accuracy with the 10 class "
             "names x 18 CLIP prompt templates; class-level retrieval Recall@k (a hit = a caption / "
             "image of the query's class among the k nearest). Every student of a seed starts from the "
             "same init and data order; distillers use their `conf/distiller` defaults.", ""]
    if teacher:
        lines.append(f"Teacher (`{args.experiment}` teacher, trained once, seed 0): zero-shot "
                     f"{teacher['test/zeroshot_acc'] * 100:.2f}%, i2t R@1 {teacher['test/i2t_r@1'] * 100:.2f}%, "
                     f"t2i R@1 {teacher['test/t2i_r@1'] * 100:.2f}%, {teacher['params']:,} parameters "
                     f"({teacher['params_image']:,} image tower), {teacher['images_per_s']:,.0f} images/s; "
                     f"trained in {teacher.get('wall_s', 0):.0f} s.\n")
    lines += ["| student | seeds | zero-shot acc | Δ zero-shot | i2t R@1 | t2i R@1 | i2t R@5 | t2i R@5 "
              "| train s / run |", "|---|---|---|---|---|---|---|---|---|"]
    for method in ["baseline", *[m for m in by_method if m != "baseline"]]:
        rows = by_method.get(method, [])
        if not rows:
            continue
        zs = [r["test/zeroshot_acc"] for r in rows]
        cells = [mean_std([r[m] for r in rows]) for m in METRICS[1:]]
        fit = statistics.mean(r.get("fit_seconds", 0) for r in rows)
        lines.append(f"| {method} | {len(rows)} | {mean_std(zs)} | {(statistics.mean(zs) - base) * 100:+.2f} | "
                     + " | ".join(cells) + f" | {fit:.0f} |")
    combos = [m for m in by_method if "+" in m]
    if combos:
        lines += ["", f"Combination{'s' if len(combos) > 1 else ''}: {', '.join(combos)} (with "
                  "`--combo auto`, the two single distillers with the best seed-0 validation "
                  "zero-shot accuracy, on 1,000 held-out training images; affinity and clip_crd "
                  "have the same gradient, so they are never paired)."]
    row = next(iter(by_method["baseline"]))
    lines += ["", f"Student: {row['params']:,} parameters ({row['params_image']:,} image tower), "
              f"{row['images_per_s']:,.0f} images/s and {row['texts_per_s']:,.0f} texts/s "
              "(batch of 256, one CPU thread)."]
    write("clip.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
