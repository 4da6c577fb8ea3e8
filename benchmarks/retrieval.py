"""Dense-retrieval benchmark: BEIR SciFact test (300 queries, 5,183 passages), CPU.

Every run goes through the stage runner (``kdkit.pipeline.run``) with ``experiment=scifact_minilm``
and the overrides of its configuration below:

  1. the teacher, all-MiniLM-L6-v2, is evaluated (must reproduce its MTEB nDCG@10, 0.645 ± 0.005);
     its corpus embeddings are cached and reused as the asymmetric index and as distillation targets;
  2. students sliced from the teacher's layers are distilled for a fixed number of steps (chosen to
     take about the stated minutes here) and evaluated symmetrically (student queries / student
     corpus) and asymmetrically (student queries / teacher corpus); encode throughput of student
     and teacher is measured side by side on the same 64 passages (256 tokens, batch 32).

What the students see: corpus passages (unlabeled) and the 809 train queries; the tuple
distillers also the 919 train qrels pairs with teacher-mined negatives. Never test queries or
test qrels. Writes benchmarks/results/retrieval.md.

    flock /work/cpu.lock python benchmarks/retrieval.py                    # everything
    flock /work/cpu.lock python benchmarks/retrieval.py --configs main     # the headline student
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import header, write  # noqa: E402

TUPLES = ["data.stream=tuples", "data.batch_size=16"]
# name -> (description, overrides on top of experiment=scifact_minilm, training steps, ~minutes).
# Steps are set from measured speeds here (1 thread: ~2.0 s per 32-text step for 2 layers at 128
# tokens, ~1.0 s for 1 layer, ~6 s per 16-tuple step of 96 texts), so a config trains ~its minutes.
CONFIGS = {
    "main": ("2 layers [0, 5], embed (1 - cos)", ["student.model.layers=[0,5]"], 600, 20),
    "one_layer": ("1 layer [5], embed (1 - cos)", ["student.model.layers=[5]"], 400, 7),
    "embed": ("2 layers, embed alone", ["student.model.layers=[0,5]"], 60, 2),
    "rkd": ("2 layers, RKD on text embeddings alone", ["distiller=[rkd]"], 60, 2),
    "margin_mse": ("2 layers, Margin-MSE alone",
                   ["distiller=[margin_mse]", "distiller.margin_mse.weight=100", *TUPLES], 20, 2),
    "listwise": ("2 layers, listwise KL alone", ["distiller=[listwise]", *TUPLES], 20, 2),
    "embed_listwise": ("2 layers, embed + listwise", ["distiller=[embed,listwise]", "data.stream=both",
                                                     "data.batch_size=16", "data.num_negatives=2"], 24, 2),
}
SHORT = ("embed", "rkd", "margin_mse", "listwise", "embed_listwise")


def run_config(name: str, overrides: list[str], steps: int, minutes: float, out: Path, teacher: bool,
               extra: list[str]) -> dict:
    from kdkit.compose import compose
    from kdkit.pipeline import run

    cfg = compose(["experiment=scifact_minilm", f"stages.teacher={str(teacher).lower()}",
                   "callbacks=none", "trainer.enable_progress_bar=false", "trainer.max_epochs=100",
                   f"+trainer.max_steps={steps}",
                   # a guard only: stop at 1.5x the planned time if the machine is much slower
                   f"+trainer.max_time=00:00:{int(minutes * 1.5):02d}:00", *overrides, *extra],
                  output_dir=str(out / name))
    start = time.perf_counter()
    results = run(cfg)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    (out / name / "benchmark.json").write_text(json.dumps(results, indent=2))
    return results


def row(label: str, r: dict, steps: str, teacher_rate: float | None) -> str:
    def f(key, scale=1.0, fmt="{:.3f}"):
        return fmt.format(r[key] * scale) if key in r else "-"

    rate = r.get("passages_per_s")
    speed = r.get("speedup") or (rate / teacher_rate if rate and teacher_rate else None)
    return (f"| {label} | {r.get('layers', '-')} | {r.get('params', 0) / 1e6:.1f}M | {steps} | "
            f"{f('fit_seconds', 1 / 60, '{:.1f}')} | {f('test/ndcg@10')} | {f('test/asym/ndcg@10')} | "
            f"{f('test/recall@100')} | {f('test/mrr@10')} | {f('passages_per_s', 1, '{:.1f}')} | "
            f"{'-' if speed is None else f'{speed:.2f}x'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/runs/retrieval")
    p.add_argument("--results", default="retrieval.md", help="file name under benchmarks/results")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    done = sorted(p.parent.name for p in out.glob("*/benchmark.json"))
    for name in names:
        _, overrides, steps, minutes = CONFIGS[name]
        print(f"== {name}: {steps} steps (~{minutes} min) {overrides}", flush=True)
        # the teacher is evaluated once per output folder (its corpus encoding is cached anyway)
        first = not any(json.loads((out / d / "benchmark.json").read_text()).get("teacher") for d in done)
        run_config(name, overrides, steps, minutes, out, teacher=first, extra=args.extra)
        done.append(name)
    write(args.results, report(out, args.out))


def report(out: Path, out_arg: str) -> str:
    """The markdown table over every configuration run so far in ``out``."""
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/benchmark.json"))}
    teacher = next((r["teacher"] for r in results.values() if "teacher" in r), {})
    lines = [header("Dense retrieval: SciFact (BEIR), all-MiniLM-L6-v2 teacher"), ""]
    lines += ["| model | layers | params | steps | train min | nDCG@10 | asym nDCG@10 | R@100 | MRR@10 | "
              "passages/s | speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(row("teacher all-MiniLM-L6-v2", teacher, "-", None))
    for name in CONFIGS:
        if name in results:
            desc, _, steps, _ = CONFIGS[name]
            lines.append(row(f"{name}: {desc}", results[name]["student"], str(steps),
                             teacher.get("passages_per_s")))
    missing = [n for n in CONFIGS if n not in results]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)} (`python benchmarks/retrieval.py --configs "
                      f"{','.join(missing)}`)."]
    lines += ["", f"Raw results per configuration: `{out_arg}/<config>/benchmark.json`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
