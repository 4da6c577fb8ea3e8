"""Multi-exit students: SciFact test nDCG@10 of the whole student and of each exit, CPU.

One student (experiment=scifact_minilm_exits: all-MiniLM-L6-v2 -> 3 blocks sliced from teacher
layers [0, 2, 5]) trained the same number of steps per row, then searched whole and cut after
block 0 and block 1 (``task.eval_exits``: each cut's own query and corpus embeddings, exact
search). Rows:

  embed        embed only (LEAF): exits are whatever the sliced blocks give;
  multi_exit   embed + multi_exit at the experiment's weight (0.3): exits 0 and 1 learn the
               detached top exit;
  multi_exit_w1  the same at weight 1.

Beside them, at the depth of each cut: dedicated students of today's layouts trained the same steps
with embed alone (``two_layer``: teacher layers [0, 5]; ``one_layer``: [5], as in
benchmarks/retrieval.py), and the teacher itself cut after its first 3 / 2 / 1 layers without
training (``cut_at_exit`` on the teacher: the cheapest way to a shallower encoder).

Finished rows are kept in ``<out>/log.jsonl``: an interrupted benchmark resumes.

    python benchmarks/retrieval_exits.py --steps 300 --threads 2
    python benchmarks/retrieval_exits.py --configs ""          # rewrite the table only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RunLog, header, raw_rows, write  # noqa: E402
from benchmarks.retrieval_compact import train_missing  # noqa: E402

EXPERIMENT = "experiment=scifact_minilm_exits"
DEDICATED = [EXPERIMENT, "distiller=[embed]", "task.eval_exits=[]", "task.export_exits=[]"]
# name -> (description, overrides, blocks of the whole model)
CONFIGS = {
    "embed": ("embed only", [EXPERIMENT, "distiller=[embed]"], 3),
    "multi_exit": ("embed + multi_exit, weight 0.3 (the experiment)", [EXPERIMENT], 3),
    "multi_exit_w1": ("embed + multi_exit, weight 1", [EXPERIMENT, "distiller.multi_exit.weight=1"], 3),
    "two_layer": ("dedicated 2-block student, teacher layers [0, 5], embed only",
                  [*DEDICATED, "student.model.layers=[0,5]"], 2),
    "one_layer": ("dedicated 1-block student, teacher layer [5], embed only",
                  [*DEDICATED, "student.model.layers=[5]"], 1),
}
TEACHER_CUT = "teacher_cut"
DEPTHS = (3, 2, 1)  # table columns: blocks of the model searched
LABELS = {3: "3 blocks (whole)", 2: "2 blocks (exit 1)", 1: "1 block (exit 0)"}


def blocks_of(row: dict) -> int:
    return 3 if row["name"] == TEACHER_CUT else CONFIGS[row["name"]][2]


def key_at(row: dict, depth: int, key: str) -> str:
    """``row``'s key of ``key`` for the model cut to ``depth`` blocks: the whole model's at its
    own depth, ``<key>@exit<depth - 1>`` below it."""
    return key if depth == blocks_of(row) else f"{key}@exit{depth - 1}"


def cell(row: dict, depth: int, metric: str = "ndcg@10") -> str:
    value = row.get(key_at(row, depth, f"test/{metric}")) if depth <= blocks_of(row) else None
    return f"{value:.3f}" if value is not None else "-"


def speeds(row: dict) -> str:
    """Encode rate of the model at each depth, with its ratio to the teacher's."""
    cells = []
    for depth in DEPTHS:
        rate, ratio = ((row.get(key_at(row, depth, key)) if depth <= blocks_of(row) else None)
                       for key in ("passages_per_s", "speedup"))
        cells.append(f"{rate:.1f} ({ratio:.2f}x)" if rate and ratio else "-")
    return " / ".join(cells)


def teacher_cut(out: Path, extra: list[str]) -> dict:
    """The teacher cut after its first 3, 2 and 1 layers, not trained: test metrics keyed like a
    3-block student row (whole, ``@exit1``, ``@exit0``), texts at the teacher's 256 tokens."""
    import torch
    from hydra.utils import instantiate

    from kdkit.compose import compose
    from kdkit.models.text_layers import cut_at_exit
    from kdkit.retrieval_metrics import retrieval_metrics

    cfg = compose([EXPERIMENT, *extra], output_dir=str(out / TEACHER_CUT))
    dm = instantiate(cfg.data)
    dm.setup("test")
    teacher = instantiate(cfg.teacher.model)
    doc_ids, query_ids, qrels = dm.eval_layout("test")
    row = {"name": TEACHER_CUT, "teacher_layers": teacher.num_layers}
    for depth in DEPTHS:
        model = cut_at_exit(teacher, depth - 1)
        with torch.inference_mode():
            corpus = model.encode(list(dm.data.doc_texts), progress=True, desc=f"teacher, {depth} layers")
            queries = model.encode([dm.data.queries[q] for q in query_ids])
        for name, value in retrieval_metrics(queries, corpus, query_ids, doc_ids, qrels).items():
            row[key_at(row, depth, f"test/{name}")] = value
    return row


def report(log: RunLog, out_arg: str, steps: int, precision: str) -> str:
    lines = [header("Multi-exit students: SciFact nDCG@10 per exit"), ""]
    lines += ["| model | " + " | ".join(f"nDCG@10 {LABELS[d]}" for d in DEPTHS)
              + " | R@100 at 3 / 2 / 1 blocks | passages/s at 3 / 2 / 1 blocks (x teacher) | train min |",
              "|---|" + "---|" * len(DEPTHS) + "---|---|---|"]
    rows = [(f"teacher all-MiniLM-L6-v2 cut after 3 / 2 / 1 of its {log.done[TEACHER_CUT]['teacher_layers']} "
             "layers (not trained)", log.done[TEACHER_CUT])] if TEACHER_CUT in log.done else []
    rows += [(f"{name}: {desc}", log.done[name]) for name, (desc, *_) in CONFIGS.items() if name in log.done]
    for label, row in rows:
        recall = " / ".join(cell(row, d, "recall@100") for d in DEPTHS)
        minutes = f"{row['fit_seconds'] / 60:.1f}" if "fit_seconds" in row else "-"
        lines.append(f"| {label} | " + " | ".join(cell(row, d) for d in DEPTHS)
                     + f" | {recall} | {speeds(row)} | {minutes} |")
    missing = [n for n in [TEACHER_CUT, *CONFIGS] if n not in log.done]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    lines += ["", f"Protocol: {steps} optimizer steps per student (batch 32 of corpus passages and train queries "
              f"at 128 tokens, AdamW 5e-4, warm-up + cosine over the steps), trainer.precision={precision}, "
              "one seed; evaluation at the student's 256 tokens, the 300 SciFact test queries against the "
              "5,183 passages, exact search (ranx). A 3-block student's 2- and 1-block figures are its cuts "
              "(`cut_at_exit`, what `export_exits` ships); a dedicated student's sit at its own depth; the "
              "teacher row cuts the pretrained teacher the same way, untrained. passages/s: each model's encode "
              "rate on 64 passages, timed in turns with the teacher (a cut runs the same blocks as a dedicated "
              "student of its depth).",
              raw_rows(out_arg)]
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

    if names and TEACHER_CUT not in log.done:
        print("== teacher cut after 3 / 2 / 1 layers", flush=True)
        log.record(teacher_cut(out, args.extra))
        table()
    train_missing(log, {n: CONFIGS[n][1] for n in names}, args, out, after=table)
    table()


if __name__ == "__main__":
    main()
