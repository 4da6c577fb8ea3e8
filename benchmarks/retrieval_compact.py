"""Compact and Matryoshka students: SciFact test nDCG@10 at 384 / 256 / 128 / 64 dimensions, CPU.

Each embedding is cut to its first d coordinates and re-normalised (queries and corpus alike), then
searched exactly (``task.eval_dims``, ``kdkit.tasks.retrieval_dims``). Rows:

  teacher      all-MiniLM-L6-v2 truncated (not trained): what cutting a non-Matryoshka model costs,
               the figure a truncated student is held to (part ``--teacher-only``: no training);
  plain        experiment=scifact_minilm_sentences (LEAF embed only), truncated the same way;
  matryoshka   experiment=scifact_minilm_matryoshka: embed at 384 + matryoshka (similarity target)
               at 256 / 128 / 64;
  prefix       as matryoshka, target=prefix (the teacher's own first d coordinates, as
               sentence-transformers' MatryoshkaLoss around MSELoss);
  projection   as matryoshka, target=projection (a learned Linear(d, 384) per prefix, LEALLA-style);
  compact128   a 128-d student (projection_dim=128 on the 2-layer slice) distilled through a
               loss-only Linear(128, 384) (embed.project=true; HPD / LEALLA-style compact student),
               plus matryoshka at 64.

Every student uses the recipe of scifact_minilm_sentences (2 of 6 teacher layers, 128-token
inputs and targets, 2 corpus sentences per passage, length-grouped batches, no dropout) for the
same number of steps, bf16 autocast where the CPU has AMX / avx512_bf16 (``--precision``).
Finished rows are kept in ``<out>/log.jsonl``: an interrupted benchmark resumes.

    flock /work/cpu.lock python benchmarks/retrieval_compact.py --teacher-only   # ~10 CPU min, no training
    python benchmarks/retrieval_compact.py --teacher-only --teacher-length 128   # seconds with a cached corpus
    flock /work/cpu.lock python benchmarks/retrieval_compact.py                 # + 5 students, ~20 min each
    python benchmarks/retrieval_compact.py --configs ""                         # rewrite the table only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RunLog, header, raw_rows, restored_note, write  # noqa: E402

DIMS = (384, 256, 128, 64)
EVAL_DIMS = "task.eval_dims=[256,128,64]"
MATRYOSHKA = ["experiment=scifact_minilm_matryoshka"]
# name -> (description, overrides)
CONFIGS = {
    "plain": ("LEAF embed only (scifact_minilm_sentences), truncated",
              ["experiment=scifact_minilm_sentences", EVAL_DIMS]),
    "matryoshka": ("embed + matryoshka similarity at 256/128/64", MATRYOSHKA),
    "prefix": ("embed + matryoshka prefix (sentence-transformers style)",
               [*MATRYOSHKA, "distiller.matryoshka.target=prefix"]),
    "projection": ("embed + matryoshka projection (Linear(d, 384) per prefix)",
                   [*MATRYOSHKA, "distiller.matryoshka.target=projection"]),
    "compact128": ("128-d student: embed through Linear(128, 384) + matryoshka at 64",
                   [*MATRYOSHKA, "student.model.projection_dim=128", "distiller.embed.project=true",
                    "distiller.matryoshka.dims=[64]", "task.eval_dims=[64]"]),
}


def teacher_truncated(out: Path, extra: list[str], length: int | None = None) -> dict:
    """The teacher's test metrics at every width of ``DIMS``, texts at ``length`` tokens (None: its
    own 256). Its corpus embeddings come from, or go to, the data's embedding cache, so a later
    benchmark run does not encode them again."""
    from hydra.utils import instantiate

    from kdkit.compose import compose
    from kdkit.retrieval_metrics import retrieval_metrics
    from kdkit.tasks.retrieval_dims import truncated_metrics
    from kdkit.tasks.retrieval_table import static_embeddings

    cfg = compose([*MATRYOSHKA, *extra], output_dir=str(out / "teacher"))
    dm = instantiate(cfg.data)
    dm.setup("test")
    teacher = instantiate(cfg.teacher.model)
    doc_ids, query_ids, qrels = dm.eval_layout("test")
    start = time.perf_counter()
    corpus = static_embeddings(dm, teacher, "corpus", length)
    queries = teacher.encode([dm.data.queries[q] for q in query_ids], max_length=length)
    result = {f"test/{k}": v for k, v in retrieval_metrics(queries, corpus, query_ids, doc_ids, qrels).items()}
    cut = truncated_metrics(queries, corpus, query_ids, doc_ids, qrels, DIMS[1:], ("ndcg@10", "recall@100", "mrr@10"))
    result.update({f"test/{k}": v for k, v in cut.items()})
    return {"name": "teacher", "dim": teacher.dim, "max_length": length or teacher.max_length,
            "teacher_length": length, "encode_s": round(time.perf_counter() - start, 1), **result}


def train(name: str, overrides: list[str], steps: int, out: Path, precision: str, extra: list[str]) -> dict:
    from kdkit.compose import compose
    from kdkit.pipeline import run

    cfg = compose([*overrides, "stages.teacher=false", "callbacks=none", "trainer.enable_progress_bar=false",
                   "trainer.max_epochs=100", f"+trainer.max_steps={steps}", f"trainer.precision={precision}",
                   "ckpt_path=last", *extra], output_dir=str(out / name))
    start = time.perf_counter()
    student = run(cfg)["student"]
    return {"name": name, "steps": steps, "wall_s": round(time.perf_counter() - start, 1), **student}


def cell(row: dict, d: int, metric: str = "ndcg@10") -> str:
    """``metric`` of ``row`` at width ``d``: its full figure at its own width, else the cut one."""
    dim = row.get("dim")
    key = f"test/{metric}" if d == dim else f"test/{metric}@d{d}"
    return f"{row[key]:.3f}" if key in row else "-"


def steps_of(log: RunLog, default: int) -> str:
    """The training steps of the student rows present ("800", "800/2600"), else ``default``."""
    steps = sorted({r["steps"] for r in log.done.values() if r.get("steps")})
    return "/".join(map(str, steps)) or str(default)


def report(log: RunLog, out_arg: str, steps: int) -> str:
    lines = [header("Compact and Matryoshka students: SciFact nDCG@10 at truncated widths"), ""]
    lines += restored_note(log.done.values(), commands=True)
    lines += ["| model | dim | " + " | ".join(f"nDCG@10 @{d}" for d in DIMS) + " | asym nDCG@10 | train min |",
              "|---|---|" + "---|" * len(DIMS) + "---|---|"]
    t = log.done.get("teacher")
    rows = [(f"teacher all-MiniLM-L6-v2 (truncated, not trained; {t and t['max_length']} tokens)", t)]
    rows += [(f"{name}: {desc}", log.done.get(name)) for name, (desc, _) in CONFIGS.items()]
    for label, r in rows:
        if r is None:
            continue
        asym = f"{r['test/asym/ndcg@10']:.3f}" if "test/asym/ndcg@10" in r else "-"
        minutes = f"{r['fit_seconds'] / 60:.1f}" if "fit_seconds" in r else "-"
        lines.append(f"| {label} | {r.get('dim', '-')} | " + " | ".join(cell(r, d) for d in DIMS)
                     + f" | {asym} | {minutes} |")
    missing = ["teacher" if "teacher" not in log.done else None, *[n for n in CONFIGS if n not in log.done]]
    missing = [m for m in missing if m]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    lines += ["", f"Protocol. A width d keeps the first d coordinates of query and corpus embeddings and "
              f"re-normalises them; exact search over the 5,183 passages, the 300 test queries, ranx. "
              f"Students: {steps_of(log, steps)} steps each of the scifact_minilm_sentences recipe (see "
              f"benchmarks/retrieval.py), evaluated at 256 tokens; `asym` = student queries against the "
              f"teacher's full 384-d corpus index (none for the 128-d student: another space). "
              f"The teacher row reads texts at the token count in its label (`--teacher-length`; its "
              f"published nDCG@10, 0.645, is at its own 256 tokens). Encode rate: every student here is "
              f"the 2-layer [0, 5] encoder (compact128 adds one 384x128 linear layer), so it encodes at the "
              f"2-layer student's rate (retrieval.md, retrieval_methods.md); a narrower student's gain is "
              f"its index: 128 dims store and search 3x fewer numbers than 384.",
              raw_rows(out_arg)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--teacher-only", action="store_true", help="only the truncated teacher (no training)")
    p.add_argument("--teacher-length", type=int, default=None,
                   help="tokens per text of the truncated-teacher row (default: the teacher's 256)")
    p.add_argument("--steps", type=int, default=2600, help="training steps per student")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--precision", default="bf16-mixed", help="trainer.precision of the students")
    p.add_argument("--out", default="benchmarks/runs/retrieval_compact")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "log.jsonl", key=lambda row: row["name"])
    names = [] if args.teacher_only else [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    stale = log.done.get("teacher", {}).get("teacher_length", -1) != args.teacher_length
    if stale and (args.teacher_only or names):  # none yet, or at another --teacher-length
        print("== teacher: truncated evaluation", flush=True)
        log.record(teacher_truncated(out, args.extra, args.teacher_length))
    train_missing(log, {n: CONFIGS[n][1] for n in names}, args, out)
    write("retrieval_compact.md", report(log, args.out, args.steps))


def train_missing(log, configs: dict[str, list[str]], args, out: Path, after=None) -> None:
    """Train every ``configs`` entry (name -> overrides) not yet in ``log`` for ``args.steps``
    steps, recording each row as it finishes (``after()`` then, e.g. rewrite the table)."""
    for name, overrides in configs.items():
        if name in log.done:
            continue
        print(f"== {name}: {args.steps} steps", flush=True)
        log.record(train(name, overrides, args.steps, out, args.precision, args.extra))
        if after is not None:
            after()


if __name__ == "__main__":
    main()
