"""Multi-exit students: SciFact test nDCG@10 of the whole student and of each exit, CPU.

One student (experiment=scifact_minilm_exits: all-MiniLM-L6-v2 -> 3 blocks sliced from teacher
layers [0, 2, 5]) trained the same number of steps per row, then searched whole and cut after
block 0 and block 1 (``task.eval_exits``: each cut's own query and corpus embeddings, exact
search). Rows:

  embed        embed only (LEAF): exits are whatever the sliced blocks give;
  multi_exit   embed + multi_exit at the experiment's weight (0.3): exits 0 and 1 learn the
               detached top exit;
  multi_exit_w1  the same at weight 1.

Finished rows are kept in ``<out>/log.jsonl``: an interrupted benchmark resumes.

    python benchmarks/retrieval_exits.py --steps 300 --threads 1
    python benchmarks/retrieval_exits.py --configs ""          # rewrite the table only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RunLog, header, write  # noqa: E402
from benchmarks.retrieval_compact import train_missing  # noqa: E402

EXPERIMENT = "experiment=scifact_minilm_exits"
CONFIGS = {
    "embed": ("embed only", [EXPERIMENT, "distiller=[embed]"]),
    "multi_exit": ("embed + multi_exit, weight 0.3 (the experiment)", [EXPERIMENT]),
    "multi_exit_w1": ("embed + multi_exit, weight 1", [EXPERIMENT, "distiller.multi_exit.weight=1"]),
}
PARTS = ((None, "whole (3 blocks)"), ("exit1", "exit 1 (2 blocks)"), ("exit0", "exit 0 (1 block)"))


def cell(row: dict, part: str | None, metric: str = "ndcg@10") -> str:
    key = f"test/{metric}" + (f"@{part}" if part else "")
    return f"{row[key]:.3f}" if key in row else "-"


def speeds(row: dict) -> str:
    """Encode rate of the whole student and of each cut, with its ratio to the teacher's."""
    cells = []
    for part, _ in PARTS:
        rate, ratio = (row.get(f"{key}@{part}" if part else key) for key in ("passages_per_s", "speedup"))
        cells.append(f"{rate:.1f} ({ratio:.2f}x)" if rate and ratio else "-")
    return " / ".join(cells)


def report(log: RunLog, out_arg: str, steps: int, precision: str) -> str:
    lines = [header("Multi-exit students: SciFact nDCG@10 per exit"), ""]
    lines += ["| student | " + " | ".join(f"nDCG@10 {label}" for _, label in PARTS)
              + " | R@100 whole / exit1 / exit0 | passages/s whole / exit1 / exit0 (x teacher) | train min |",
              "|---|" + "---|" * len(PARTS) + "---|---|---|"]
    for name, (desc, _) in CONFIGS.items():
        row = log.done.get(name)
        if row is None:
            continue
        recall = " / ".join(cell(row, part, "recall@100") for part, _ in PARTS)
        minutes = f"{row['fit_seconds'] / 60:.1f}" if "fit_seconds" in row else "-"
        lines.append(f"| {name}: {desc} | " + " | ".join(cell(row, part) for part, _ in PARTS)
                     + f" | {recall} | {speeds(row)} | {minutes} |")
    missing = [n for n in CONFIGS if n not in log.done]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    lines += ["", f"Protocol: {steps} optimizer steps per student (batch 32 of corpus passages and train queries "
              f"at 128 tokens, AdamW 5e-4, warm-up + cosine over the steps), trainer.precision={precision}, "
              "one seed; evaluation at the student's 256 tokens, the 300 SciFact test queries against the "
              f"5,183 passages, exact search (ranx); passages/s: each model's encode rate on 64 passages, the cuts "
              f"(`cut_at_exit`, what `export_exits` ships) timed in turns with the whole student and the teacher. "
              f"Raw rows: `{out_arg}/log.jsonl`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=300, help="training steps per student")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--precision", default="32-true", help="trainer.precision of the students")
    p.add_argument("--out", default="benchmarks/runs/retrieval_exits")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "log.jsonl", key=lambda row: row["name"])
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    def table():
        write("retrieval_exits.md", report(log, args.out, args.steps, args.precision))

    train_missing(log, {n: CONFIGS[n][1] for n in names}, args, out, after=table)
    table()


if __name__ == "__main__":
    main()
