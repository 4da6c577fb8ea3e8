"""Export fidelity of a retrieval run: does the exported student, loaded by sentence-transformers
alone, score the test metrics the run reported?

A run folder of ``kdkit-train`` (or ``benchmarks/retrieval.py``) holds ``config.yaml`` (the
resolved config), ``results.json`` (each stage's metrics) and ``export/`` (the student as a
sentence-transformers folder). This script rebuilds the run's data from its config, loads
``export/`` with ``sentence_transformers.SentenceTransformer``, encodes the test queries and the
whole corpus with its ``encode``, searches exactly (``kdkit.retrieval_metrics``) and compares
with ``results.json``. An fp32 run should agree to ~1e-6; a bf16-autocast run evaluated its
student in bf16, so the fp32 export may differ by the rounding of a few near-tied ranks.

    python benchmarks/export_check.py benchmarks/runs/retrieval/main [more run folders]

Prints one line per metric and ``export_max_abs_diff=X`` (over the metrics and folders) last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def check_run(run_dir, stage: str = "student", metrics=METRICS) -> dict[str, dict[str, float]]:
    """``{metric: {"run": from results.json, "export": from the export, "diff": |run - export|}}``."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from sentence_transformers import SentenceTransformer

    from kdkit.errors import KdkitError
    from kdkit.retrieval_metrics import retrieval_metrics

    run_dir = Path(run_dir)
    missing = [p for p in ("config.yaml", "results.json", "export") if not (run_dir / p).exists()]
    if missing:
        raise KdkitError(f"{run_dir} is not a finished retrieval run folder: no {', '.join(missing)}")
    results = json.loads((run_dir / "results.json").read_text())
    if stage not in results:
        raise KdkitError(f"{run_dir}/results.json has no stage {stage!r} (stages: {', '.join(results)})")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    dm = instantiate(cfg.data)
    dm.setup("test")
    model = SentenceTransformer(str(run_dir / "export"), device="cpu")
    if cfg.data.get("eval_max_length"):  # the run evaluated at this length, not the student's own
        model.max_seq_length = int(cfg.data.eval_max_length)
    docs, query_ids, qrels = dm.eval_layout("test")
    queries = torch.from_numpy(model.encode([dm.data.queries[q] for q in query_ids]))
    corpus = torch.from_numpy(model.encode(list(dm.data.doc_texts)))
    got = retrieval_metrics(queries, corpus, query_ids, docs, qrels, list(metrics),
                            cfg.task.get("search_backend", "torch"))
    out = {}
    for name in metrics:
        reported = float(results[stage][f"test/{name}"])
        out[name] = {"run": reported, "export": float(got[name]), "diff": abs(reported - float(got[name]))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (config.yaml, results.json, export/)")
    p.add_argument("--stage", default="student")
    args = p.parse_args()
    worst = 0.0
    for run in args.runs:
        for name, r in check_run(run, args.stage).items():
            print(f"{run}: test/{name} run {r['run']:.6f}, export via sentence-transformers {r['export']:.6f}, "
                  f"|diff| {r['diff']:.2e}")
            worst = max(worst, r["diff"])
    print(f"export_max_abs_diff={worst:.3e}")


if __name__ == "__main__":
    main()
