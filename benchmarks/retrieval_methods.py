"""Retrieval distillers side by side at equal training time: SciFact test nDCG@10, CPU.

Every row distils all-MiniLM-L6-v2 into the same 2-layer student (its layers [0, 5]) with one
method alone, for the same wall-clock training time (``--minutes``), then evaluates it exactly
as ``benchmarks/retrieval.py`` does (300 test queries against the 5,183 passages at 256 tokens,
exact search, ranx; "asym": student queries against the teacher's corpus index; passages/s of the
student beside the teacher's, measured alternately).

Equal time, not equal steps: methods differ in the texts a step encodes (a tuple step reads a
query, its positive and 4 hard negatives; ``lead`` also runs the teacher live). The benchmark
first clocks every row (``StepClock``: the mean of ``--probe-steps`` training steps after 3
warm-up steps, in the real pipeline, on the real data), then trains each for
``minutes * 60 / step`` steps, so its warm-up + cosine schedule ends when its time does (a
2x ``max_time`` guard stops a row on a slowed machine). The table shows the steps and the
measured train minutes. The teacher's one-off tables (its corpus/text embeddings and the MaxSim
scores) are cached before the clock starts and are not training time.

Rows (descriptions in ``CONFIGS``): text-stream methods on the recipe of
``experiment=scifact_minilm_sentences`` (targets at 128 tokens, two sentences per passage, batches
grouped by length, dropout 0); tuple methods on the same recipe with ``data.stream=tuples`` (the
919 train qrels pairs, 4 negatives the teacher mined from its ranks 3-30, batch 16); the scorer
rows read the MaxSim scorer of ``experiment=scifact_minilm_scorer``. Students never see a test
query or a test qrel. Finished rows are kept in ``<out>/log.jsonl``: an interrupted run resumes.

    flock /work/cpu.lock python benchmarks/retrieval_methods.py --jobs 2             # every row, ~2.5 h
    python benchmarks/retrieval_methods.py --configs embed,distilcse --minutes 5     # a subset
    python benchmarks/retrieval_methods.py --configs ""                              # the table only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RunLog, command, header, raw_rows, worker_pool, write  # noqa: E402

RECIPE = ["experiment=scifact_minilm_sentences"]
TUPLES = ["data.stream=tuples", "data.batch_size=16", "data.group_by_length=false"]  # grouping: text only
# experiment=scifact_minilm_scorer (bi-encoder + MaxSim teachers) with the recipe's data and student
SCORER = ["experiment=scifact_minilm_scorer", "data.target_max_length=128", "data.corpus_sentences=2",
          "student.model.dropout=0"]
# name -> (description, overrides)
CONFIGS = {
    "embed": ("embed (LEAF: 1 - cos to the teacher's embedding), text stream", RECIPE),
    "embed_mse": ("embed, MSE to the teacher's embedding (sentence-transformers' MSELoss)",
                  [*RECIPE, "distiller.embed.loss=mse"]),
    "rkd": ("RKD (distance + angle of the batch's embeddings), text stream", [*RECIPE, "distiller=[rkd]"]),
    "distilcse": ("DistilCSE / CKD (InfoNCE against the teacher's batch + 4,096 queue), text stream",
                  [*RECIPE, "distiller=[distilcse]"]),
    "margin_mse": ("Margin-MSE on bi-encoder margins, tuples",
                   [*RECIPE, *TUPLES, "distiller=[margin_mse]", "distiller.margin_mse.weight=100"]),
    "listwise": ("listwise KL over each query's group (bi-encoder), tuples",
                 [*RECIPE, *TUPLES, "distiller=[listwise]"]),
    "pairdistill": ("PairDistill pairwise KL (bi-encoder), tuples", [*RECIPE, *TUPLES, "distiller=[pairdistill]"]),
    "lead": ("LEAD layer-wise in-batch score KL (teacher live), tuples", [*RECIPE, *TUPLES, "distiller=[lead]"]),
    "margin_mse_maxsim": ("Margin-MSE on MaxSim-scorer margins, denoised negatives, tuples",
                          [*SCORER, *TUPLES, "distiller=[margin_mse]", "distiller.margin_mse.weight=100",
                           "distiller.margin_mse.teacher=maxsim", "~distiller.embed"]),
    "pairdistill_maxsim": ("PairDistill on MaxSim-scorer scores, denoised negatives, tuples",
                           [*SCORER, *TUPLES, "distiller=[pairdistill]", "distiller.pairdistill.teacher=maxsim",
                            "~distiller.embed", "~distiller.margin_mse"]),
}
# after the single-method rows: the recipe combined with the best of the others (--configs)
COMBOS = {
    "embed_distilcse": ("embed + DistilCSE, text stream", [*RECIPE, "distiller=[embed,distilcse]"]),
    "embed_margin_mse_maxsim": ("embed + Margin-MSE on MaxSim margins (scifact_minilm_scorer), both streams",
                                [*SCORER, "data.batch_size=16", "distiller.margin_mse.weight=100"]),
}
ALL = {**CONFIGS, **COMBOS}
SEED = "-seed"  # "<row>-seed<k>": the row again with seed=k (--seeds)


def overrides_of(name: str) -> list[str]:
    base, _, seed = name.partition(SEED)
    return [*ALL[base][1], f"seed={seed}"] if seed else ALL[base][1]


class Clocked(Exception):
    """Raised by ``StepClock`` to end a probe run once it has its timings."""


class StepClock(L.Callback):
    """Times ``steps`` training steps (batch end to batch end) after ``warmup`` steps, writes their
    mean to ``path`` and stops the run (``Clocked``): the per-step cost of a row in the real
    pipeline, data loading and the optimizer included."""

    def __init__(self, path: str, steps: int = 20, warmup: int = 3):
        self.path, self.steps, self.warmup = path, steps, warmup
        self.times: list[float] = []
        self.last: float | None = None

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.last is not None and batch_idx >= self.warmup:
            self.times.append(now - self.last)
        self.last = now
        if len(self.times) >= self.steps:
            Path(self.path).write_text(json.dumps({"mean_s": statistics.mean(self.times),
                                                   "median_s": statistics.median(self.times),
                                                   "steps": len(self.times)}))
            raise Clocked


def compose_row(name: str, overrides: list[str], out: Path, extra: list[str], precision: str, *more: str):
    from kdkit.compose import compose

    return compose([*overrides, "stages.teacher=false", "callbacks=none", "trainer.enable_progress_bar=false",
                    "trainer.max_epochs=1000", f"trainer.precision={precision}", *more, *extra],
                   output_dir=str(out / name))


def clock(name: str, overrides: list[str], out: Path, args) -> float:
    """Mean seconds per training step of row ``name`` (cached in ``<out>/clock/<name>.json``)."""
    from kdkit.pipeline import run

    path = out / "clock" / f"{name}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = compose_row(f"clock/{name}-run", overrides, out, args.extra, args.precision, "+trainer.max_steps=1000",
                          "+callbacks.clock._target_=benchmarks.retrieval_methods.StepClock",
                          f"+callbacks.clock.path={path}", f"+callbacks.clock.steps={args.probe_steps}")
        # the callback raises the class of the module Hydra imports (this file runs as __main__)
        from benchmarks.retrieval_methods import Clocked as ClockedByHydra

        try:
            run(cfg)
        except ClockedByHydra:
            pass
        if not path.exists():
            raise SystemExit(f"{name}: the probe ended before {args.probe_steps} timed steps")
    return json.loads(path.read_text())["mean_s"]


def train(name: str, overrides: list[str], step_s: float, out: Path, args) -> dict:
    from kdkit.pipeline import run

    steps = max(20, round(args.minutes * 60 / step_s))
    guard = int(args.minutes * 60 * 2)
    cfg = compose_row(name, overrides, out, args.extra, args.precision, f"+trainer.max_steps={steps}",
                      f"+trainer.max_time=00:{guard // 3600:02d}:{guard // 60 % 60:02d}:{guard % 60:02d}",
                      "ckpt_path=last")
    start = time.perf_counter()
    student = run(cfg)["student"]
    return {"name": name, "command": command(), "steps": steps, "clock_step_s": round(step_s, 3),
            "wall_s": round(time.perf_counter() - start, 1), **student}


def run_row(job: tuple) -> dict:
    """Clock and train one row in this process with ``threads`` torch threads (top level: spawnable)."""
    import torch

    name, overrides, out, args = job
    torch.set_num_threads(args.threads)
    base = name.partition(SEED)[0]  # another seed of a row steps as often as the row
    return train(name, overrides, clock(base, ALL[base][1], out, args), out, args)


def report(log: RunLog, args) -> str:
    lines = [header("Retrieval distillers at equal training time: SciFact nDCG@10"), ""]
    lines += ["| method | steps | train min | nDCG@10 | asym nDCG@10 | R@100 | MRR@10 | passages/s (vs teacher) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, (desc, _) in ALL.items():
        r = log.done.get(name)
        if r is None:
            continue
        speed = f"{r['passages_per_s']:.1f} ({r['speedup']:.2f}x)" if "speedup" in r else "-"
        lines.append(f"| {name}: {desc} | {r['steps']} | {r['fit_seconds'] / 60:.1f} | {r['test/ndcg@10']:.3f} | "
                     f"{r.get('test/asym/ndcg@10', float('nan')):.3f} | {r['test/recall@100']:.3f} | "
                     f"{r['test/mrr@10']:.3f} | {speed} |")
    spread = []
    for name in ALL:
        runs = [r for key, r in log.done.items() if key == name or key.startswith(name + SEED)]
        if len(runs) > 1:
            for r in runs[1:]:
                lines.append(f"| {r['name']}: as {name}, another seed | {r['steps']} | {r['fit_seconds'] / 60:.1f} | "
                             f"{r['test/ndcg@10']:.3f} | {r.get('test/asym/ndcg@10', float('nan')):.3f} | "
                             f"{r['test/recall@100']:.3f} | {r['test/mrr@10']:.3f} | - |")
            values = [r["test/ndcg@10"] for r in runs]
            spread.append(f"{name} over {len(runs)} seeds: nDCG@10 {statistics.mean(values):.3f} ± "
                          f"{statistics.stdev(values):.3f} (mean ± std)")
    if spread:
        lines += [""] + [f"- {line}" for line in spread]
    fidelity = Path(args.out) / "export_check.json"
    if fidelity.exists():
        check = json.loads(fidelity.read_text())
        worst = max(m["diff"] for m in check["metrics"].values())
        lines += ["", f"Export fidelity (`--export-check {check['row']}`): `SentenceTransformer(export)` alone, "
                      f"its own `encode`, exact search: " + ", ".join(
                          f"{k} {m['export']:.4f} (run {m['run']:.4f})" for k, m in check["metrics"].items())
                  + f"; largest difference {worst:.1e}."]
    missing = [n for n in ALL if n not in log.done]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)} (`python benchmarks/retrieval_methods.py --configs "
                      f"{','.join(missing)} --minutes {args.minutes:g}`)."]
    commands = dict.fromkeys(r["command"] for r in log.done.values() if "command" in r)
    if len(commands) > 1:
        lines += ["", "The log's rows come from these runs, in order: " + "; ".join(f"`{c}`" for c in commands) + "."]
    probes = sorted({json.loads(f.read_text())["steps"] for f in (Path(args.out) / "clock").glob("*.json")})
    probe = "/".join(map(str, probes)) or str(args.probe_steps)
    lines += ["", PROTOCOL.format(minutes=args.minutes, precision=args.precision, raw=raw_rows(args.out), probe=probe)]
    return "\n".join(lines) + "\n"


PROTOCOL = """Protocol. Each row: `kdkit-train` with the row's overrides (`CONFIGS` in
benchmarks/retrieval_methods.py), the 2-layer student sliced from the teacher's layers [0, 5],
AdamW peak lr 5e-4 with 5% warm-up and cosine decay over the row's steps, trainer.precision={precision},
one torch thread per row. Steps = {minutes:g} min / the row's mean step time, clocked first in the
same pipeline ({probe} steps after 3 warm-up); "train min" is the measured fit time. Text rows train on the
5,183 corpus passages, 2 sentences cut from each and the 809 train queries; tuple rows on the 919 train
qrels pairs with 4 teacher-mined negatives (ranks 3-30 of the bi-encoder's ranking; scorer rows drop
those MaxSim scores above the positive, RocketQA-style). Evaluation: 300 test queries, the whole
corpus at 256 tokens, exact search. passages/s: the student's encode rate on 64 passages beside the
teacher's (queries per second scale the same way: one encoder, shorter texts). {raw}

What equal time means here. A text step encodes 32 texts; a tuple step 96 (16 queries, positives and 4
negatives each), so tuple rows take ~4.5x fewer steps, and `lead` runs the teacher's 6 layers live on
top (~9x fewer). The text rows also see ~16,000 distinct texts, the tuple rows 919 train queries. And
score-matching losses (Margin-MSE, listwise, PairDistill, LEAD) constrain differences of scores, not
where an embedding lies, so their students do not land in the teacher's space: their asymmetric
column (student queries against the teacher's index) is low by construction, not a failure of search.
The papers train these losses for many epochs over MS MARCO's ~500k queries; SciFact has 919."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(ALL)}")
    p.add_argument("--seeds", default="", help="comma list: also run every --configs row with these seeds")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per row")
    p.add_argument("--probe-steps", type=int, default=20, help="timed steps of a row's clock probe")
    p.add_argument("--jobs", type=int, default=1, help="rows trained at once (one torch thread each when > 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per row")
    p.add_argument("--precision", default="32-true", help="trainer.precision (bf16-mixed on AMX CPUs, GPUs)")
    p.add_argument("--out", default="benchmarks/runs/retrieval_methods")
    p.add_argument("--export-check", default="", metavar="ROW",
                   help="score ROW's exported student with sentence-transformers alone (benchmarks/export_check.py)")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every row")
    args = p.parse_args()
    names = [n for n in args.configs.split(",") if n]
    names += [f"{n}{SEED}{k}" for n in names for k in args.seeds.split(",") if k]
    unknown = [n for n in names if n.partition(SEED)[0] not in ALL]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(ALL)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "log.jsonl", key=lambda row: row["name"])
    todo = [(n, overrides_of(n), out, args) for n in names if n not in log.done]
    import torch

    torch.set_num_threads(args.threads if args.jobs == 1 else 1)
    for base in dict.fromkeys(name.partition(SEED)[0] for name, *_ in todo):
        # one at a time: also fills the teacher caches the rows share
        print(f"== clock {base}: {clock(base, ALL[base][1], out, args):.2f} s/step", flush=True)
    if args.jobs > 1:
        from concurrent.futures import as_completed

        args.threads = 1
        with worker_pool(args.jobs) as pool:
            for future in as_completed([pool.submit(run_row, job) for job in todo]):
                log.record(future.result())
                write("retrieval_methods.md", report(log, args))
    else:
        for job in todo:
            log.record(run_row(job))
            write("retrieval_methods.md", report(log, args))
    if args.export_check:
        from benchmarks.export_check import check_run

        check = {"row": args.export_check, "metrics": check_run(out / args.export_check)}
        (out / "export_check.json").write_text(json.dumps(check, indent=2))
    write("retrieval_methods.md", report(log, args))


if __name__ == "__main__":
    main()
