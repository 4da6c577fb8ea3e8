"""Hyper-parameter sweep of a GNN-to-MLP student, chosen on validation accuracy only.

For one dataset / setting / teacher, every combination of the ``--grid`` values is trained on
``--seeds`` seeds through the stage runner (the teacher of each seed is trained once, or read
from ``benchmarks/gnn.py``'s runs). Selection uses *validation* accuracy only (of the weights
each run kept): the smallest configuration within one standard error of the best mean (see
``select``); test accuracy is reported for every row but never used to choose. Writes ``benchmarks/results/gnn_sweep_<dataset>_<setting>.md``.

    python benchmarks/gnn_sweep.py --dataset cora --jobs 2 \\
        --grid student.model.dropout=0.5,0.8 student.model.input_dropout=0,0.5
    python benchmarks/gnn_sweep.py --dataset cora --base distiller=[glnn,hidden] --grid ...
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import statistics
import sys
import time
from concurrent.futures import as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RunLog, command, header, mean_std, worker_pool, write  # noqa: E402
from benchmarks.gnn import EXPERIMENTS, QUIET  # noqa: E402


def parse_grid(items: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x"]`` -> every combination as override lists: [["a=1","b=x"], ["a=2","b=x"]].
    Values holding brackets (``distiller=[glnn,hidden]``) are one value; separate such
    alternatives with ``|``."""
    axes = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--grid entries are key=v1,v2,...: got {item!r}")
        key, values = item.split("=", 1)
        sep = "|" if ("[" in values or "|" in values) else ","
        axes.append([f"{key}={v}" for v in values.split(sep)])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def teacher_ckpt(args, seed: int) -> Path:
    """The teacher of ``seed``: from benchmarks/gnn.py's runs when present, else trained here
    (seeded as gnn.py seeds it, so both scripts get the same teacher)."""
    key = (args.dataset, args.setting, str(seed), args.teacher)
    shared = Path(args.teachers_from).joinpath(*key, "glnn", "teacher.pt")
    if shared.exists():
        return shared
    directory = Path(args.out).joinpath("teachers", *key)
    ckpt = directory / "teacher.pt"
    if not ckpt.exists():
        import lightning as L

        from kdkit.compose import compose
        from kdkit.pipeline import run

        L.seed_everything(seed)
        run(compose([f"experiment={EXPERIMENTS[args.dataset]}", f"data.setting={args.setting}",
                     f"seed={seed}", f"teacher={args.teacher}", "stages.baseline=false",
                     "stages.student=false", *QUIET, *args.extra], output_dir=str(directory)))
    return ckpt


def run_student(job: dict) -> dict:
    """One distilled student (top level so that spawned workers can import it)."""
    import lightning as L
    import torch

    from kdkit.compose import compose
    from kdkit.pipeline import run

    torch.set_num_threads(job["threads"])
    L.seed_everything(job["seed"])
    start = time.perf_counter()
    results = run(compose(job["overrides"], output_dir=job["dir"]))["student"]
    return {"config": job["config"], "seed": job["seed"], "run_seconds": time.perf_counter() - start,
            # the kept weights' validation accuracy (the last epoch's when a run does not select)
            "val/acc_selected": results.get("val/acc_selected", results["val/acc"]),
            **{k: results[k] for k in ("test/acc", "params", "latency_inductive_ms")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cora", choices=sorted(EXPERIMENTS))
    p.add_argument("--setting", default="transductive")
    p.add_argument("--teacher", default="gcn")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--base", nargs="*", default=[], help="overrides shared by every configuration")
    p.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 axes (cartesian product)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for teacher and students")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs, one thread each")
    p.add_argument("--out", default="benchmarks/runs/gnn_sweep")
    p.add_argument("--teachers-from", default="benchmarks/runs/gnn")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    out = Path(args.out) / args.dataset / args.setting / args.teacher
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "results.jsonl", key=lambda row: (row["config"], row["seed"]))
    done = log.done

    configs = [" ".join([*args.base, *combo]) for combo in parse_grid(args.grid)]
    jobs = []
    for seed in range(args.seeds):
        if args.report_only:
            break
        ckpt = None
        for config in configs:
            if (config, seed) in done:
                continue
            ckpt = ckpt or teacher_ckpt(args, seed)
            overrides = [f"experiment={EXPERIMENTS[args.dataset]}", f"data.setting={args.setting}",
                         f"seed={seed}", f"teacher={args.teacher}", f"teacher.ckpt_path={ckpt}",
                         "stages.teacher=false", "stages.baseline=false", *QUIET, *args.extra,
                         *config.split()]
            # one folder per (config, seed): the runner resumes a finished stage from its folder,
            # so a folder must never be shared by two configurations
            name = hashlib.sha1(config.encode()).hexdigest()[:12]
            jobs.append({"config": config, "seed": seed, "overrides": overrides, "threads": 1,
                         "dir": str(out / "runs" / f"{name}_seed{seed}")})
    if jobs:
        with (out / "commands.txt").open("a") as f:  # the report lists every grid that fed the cache
            f.write(command() + "\n")
        print(f"{len(jobs)} runs, {args.jobs} at a time")
        with worker_pool(args.jobs) as pool:
            for i, future in enumerate(as_completed([pool.submit(run_student, j) for j in jobs])):
                row = log.record(future.result())
                print(f"[{i + 1}/{len(jobs)}] seed {row['seed']} {row['config'] or '(experiment)'}: "
                      f"val {row['val/acc_selected']:.4f} test {row['test/acc']:.4f}", flush=True)
    write(f"gnn_sweep_{args.dataset}_{args.setting}.md", report(done, args, out))


def report(done: dict, args, out: Path) -> str:
    """Every configuration of the cache with all seeds run (this grid's and earlier ones)."""
    rows = []
    for config in sorted({config for config, _ in done}):
        runs = [done[(config, s)] for s in range(args.seeds) if (config, s) in done]
        if len(runs) == args.seeds:
            rows.append((statistics.mean(r["val/acc_selected"] for r in runs), config, runs))
    rows.sort(key=lambda r: -r[0])
    chosen = select(rows)
    lines = [header(f"GNN-to-MLP student sweep: {args.dataset}, {args.setting}, "
                    f"{args.teacher.upper()} teacher"),
             f"Experiment `{EXPERIMENTS[args.dataset]}` with teacher `{args.teacher}` and the "
             f"overrides of each row; {args.seeds} seeds (the same teacher per seed for every row). "
             "Rows are sorted by mean validation accuracy of the weights each run kept (best "
             "validation epoch). **Selected** (one-standard-error rule): the smallest student "
             "whose mean validation accuracy is within one standard error of the best row's; "
             "test accuracy is shown, never used to select. Latency is informational (measured "
             "while other runs shared the cores).", "",
             "Grids run into this cache (`commands.txt`):", "",
             *[f"    {c}" for c in _commands(out)], "",
             "| overrides | val acc (%) | test acc (%) | params | MLP inductive ms |",
             "|---|---|---|---|---|"]
    for _, config, runs in rows:
        mark = "**selected** " if config == chosen else ""
        lines.append(f"| {mark}`{config or '(experiment as is)'}` | "
                     f"{mean_std([r['val/acc_selected'] for r in runs])} | "
                     f"{mean_std([r['test/acc'] for r in runs])} | {runs[0]['params']:,} | "
                     f"{statistics.mean(r['latency_inductive_ms'] for r in runs):.3f} |")
    seconds = sum(r["run_seconds"] for _, _, runs in rows for r in runs)
    lines += ["", f"{len(rows)} configurations x {args.seeds} seeds; {seconds / 60:.1f} min of runs.", ""]
    partial = sorted({c for c, _ in done} - {c for _, c, _ in rows})
    if partial:  # stopped before all seeds ran: not eligible for selection
        lines += ["Stopped before all seeds ran (not eligible), mean val acc over the seeds run:", ""]
        for config in partial:
            vals = [r["val/acc_selected"] for (c, _), r in done.items() if c == config]
            lines.append(f"- `{config}`: {mean_std(vals)} ({len(vals)} seed(s))")
        lines.append("")
    return "\n".join(lines)


def _commands(out: Path) -> list[str]:
    path = out / "commands.txt"
    return list(dict.fromkeys(path.read_text().splitlines())) if path.exists() else []


def select(rows: list[tuple[float, str, list[dict]]]) -> str | None:
    """One-standard-error rule (Breiman et al. 1984): among configurations whose mean validation
    accuracy is within one standard error of the best mean, the one with the fewest parameters
    (then the higher validation accuracy)."""
    if not rows:
        return None
    best_vals = [r["val/acc_selected"] for r in rows[0][2]]
    se = statistics.stdev(best_vals) / len(best_vals) ** 0.5 if len(best_vals) > 1 else 0.0
    near = [r for r in rows if r[0] >= rows[0][0] - se]
    return min(near, key=lambda r: (r[2][0]["params"], -r[0]))[1]


if __name__ == "__main__":
    main()
