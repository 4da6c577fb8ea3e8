"""GNN-to-MLP benchmark: Cora and CiteSeer, public split, transductive and inductive.

For every dataset, setting and seed, through the stage runner (``kdkit.pipeline.run``):
  1. each teacher (GCN, GraphSAGE) is trained once and tested,
  2. the MLP baseline is trained once (cross-entropy on the labelled nodes),
  3. one MLP per (teacher, method) is distilled from that teacher's saved weights:
     glnn (KD on soft labels of all nodes), ffg2m (low + high frequency), hidden (GLNN + hidden
     representation distillation through an adapter).
Accuracy is test accuracy at the best validation epoch (the held-out test nodes in the
inductive setting); latency is the per-call time of the fastest of 20 timed blocks, on the
whole graph and on a batch of 256 new (test) nodes, for which a GNN gathers its 2-hop
neighbourhood and an MLP reads only the nodes' features. Writes mean ± std over seeds to
benchmarks/results/gnn.md.

    flock /work/cpu.lock python benchmarks/gnn.py            # all of it, one CPU thread
    python benchmarks/gnn.py --datasets cora --settings transductive --seeds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RunLog, header, mean_std, write  # noqa: E402

EXPERIMENTS = {"cora": "cora_glnn", "citeseer": "citeseer_glnn"}
QUIET = ["trainer.enable_progress_bar=false", "logger=none", "callbacks=none"]
TEACHERS = {"gcn": "GCN", "sage": "SAGE", "gat": "GAT"}
# Overrides on top of the experiment (which is GLNN itself: distiller=[glnn], the core KD at
# T = 1 on all nodes, lambda = 0).
METHODS = {
    "glnn": [],
    "ffg2m": ["distiller=[ffg2m]", "task.task_loss_weight=0.4", "distiller.ffg2m.weight=0.6"],
    "hidden": ["distiller=[glnn,hidden]", "distiller.hidden.weight=1.0", "distiller.hidden.loss=cosine"],
}
LABELS = {"glnn": "GLNN (KD, all nodes)", "ffg2m": "FF-G2M (low + high freq.)",
          "hidden": "GLNN + hidden rep. (adapter)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="cora,citeseer")
    p.add_argument("--settings", default="transductive,inductive")
    p.add_argument("--teachers", default="gcn,sage")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/runs/gnn")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    p.add_argument("--results", default="gnn.md", help="file name under benchmarks/results")
    p.add_argument("--side-by-side", type=int, default=10, metavar="ROUNDS",
                   help="time seed 0's teacher and MLP alternately this many rounds (0: skip)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the runs recorded in --out (missing cells: '-')")
    args = p.parse_args()

    import lightning as L
    import torch

    from kdkit.compose import compose
    from kdkit.pipeline import run

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "results.jsonl", key=lambda row: tuple(row["key"]))
    done = log.done

    def stage(key: tuple, overrides: list[str], seed: int, wanted: list[str]) -> None:
        """Run the pipeline once unless every wanted stage of ``key`` is already recorded."""
        if args.report_only or all((*key, s) in done for s in wanted):
            return
        L.seed_everything(seed)  # the teacher stage is seeded too (its init and dropout)
        start = time.perf_counter()
        directory = out.joinpath(*map(str, key))
        results = run(compose(overrides, output_dir=str(directory)))
        seconds = time.perf_counter() - start
        for name in wanted:
            log.record({"key": [*key, name], **results[name], "run_seconds": round(seconds, 1)})

    for dataset in args.datasets.split(","):
        for setting in args.settings.split(","):
            for seed in range(args.seeds):
                common = [f"experiment={EXPERIMENTS[dataset]}", f"data.setting={setting}",
                          f"seed={seed}", *QUIET, *args.extra]
                for i, teacher in enumerate(args.teachers.split(",")):
                    # teacher (+ baseline with the first teacher) + GLNN in one pipeline run
                    key = (dataset, setting, seed, teacher)
                    wanted = ["teacher", "student"] + (["baseline"] if i == 0 else [])
                    stage((*key, "glnn"), [*common, f"teacher={teacher}",
                                           f"stages.baseline={'true' if i == 0 else 'false'}"],
                          seed, wanted)
                    ckpt = out.joinpath(*map(str, key), "glnn", "teacher.pt")
                    for method in args.methods.split(","):
                        if method == "glnn":
                            continue
                        stage((*key, method), [*common, f"teacher={teacher}", f"teacher.ckpt_path={ckpt}",
                                               "stages.teacher=false", "stages.baseline=false",
                                               *METHODS[method]], seed, ["student"])
    side = {}
    if args.side_by_side:  # the teacher and its MLP timed alternately, in this one process
        for dataset in args.datasets.split(","):
            for teacher in args.teachers.split(","):
                side[(dataset, teacher)] = side_by_side_latency(out, dataset, teacher, args.side_by_side)
    write(args.results, report(done, args) + side_by_side_report(side, args.side_by_side))


def side_by_side_latency(out: Path, dataset: str, teacher: str, rounds: int) -> dict | None:
    """Inductive-batch latency of seed 0's teacher and distilled MLP (transductive GLNN run),
    timed alternately ``rounds`` times in one process so both see the same machine load."""
    import torch
    from hydra.utils import instantiate

    from kdkit.checkpoints import load_weights
    from kdkit.compose import compose
    from kdkit.report import latency_ms
    from kdkit.tasks.node import inductive_forward, inductive_query

    run_dir = out / dataset / "transductive" / "0" / teacher / "glnn"
    if not (run_dir / "export" / "student.pt").exists():
        return None
    cfg = compose([f"experiment={EXPERIMENTS[dataset]}", f"teacher={teacher}"], output_dir=str(run_dir))
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    batch = dm.example_batch(n=cfg.report.latency_batch_size)
    query = inductive_query(batch)
    models = {"gnn": instantiate(cfg.teacher.model), "mlp": instantiate(cfg.student.model)}
    load_weights(models["gnn"], run_dir / "teacher.pt")
    load_weights(models["mlp"], run_dir / "export" / "student.pt")
    times: dict[str, list[float]] = {"gnn": [], "mlp": []}
    with torch.inference_mode():  # as inference_report and a deployed model run
        for _ in range(rounds):
            for name, model in models.items():
                model.eval()
                times[name].append(latency_ms(inductive_forward, model, batch["x"], batch["edge_index"],
                                              query, blocks=3))
    ratios = [g / m for g, m in zip(times["gnn"], times["mlp"])]
    return {"gnn_ms": statistics.median(times["gnn"]), "mlp_ms": statistics.median(times["mlp"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "nodes": int(query.numel())}


def side_by_side_report(side: dict, rounds: int) -> str:
    rows = {k: v for k, v in side.items() if v}
    if not rows:
        return ""
    lines = ["", f"Side by side: seed 0's teacher and its GLNN MLP (transductive run), inductive batch, "
             f"timed alternately in one process ({rounds} rounds of 3 blocks each; median and range "
             "of the per-round ratio). This is the speed-up figure to quote; the table above times "
             "teacher and student in different runs.", "",
             "| dataset | teacher | GNN ms | MLP ms | speed-up (median) | range | target >= 10x |",
             "|---|---|---|---|---|---|---|"]
    for (dataset, teacher), r in rows.items():
        lines.append(f"| {dataset} | {TEACHERS[teacher]} | {r['gnn_ms']:.3f} | {r['mlp_ms']:.3f} | "
                     f"{r['ratio']:.1f}x | {r['ratio_min']:.1f}-{r['ratio_max']:.1f}x | "
                     f"{'met' if r['ratio'] >= 10 else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def _rows(done: dict, dataset: str, setting: str, teacher: str, method: str, stage: str) -> list[dict]:
    return [row for key, row in done.items()
            if key[:2] == (dataset, setting) and key[3] == teacher and key[4] == method and key[5] == stage]


def report(done: dict, args) -> str:
    import torch

    datasets, settings = args.datasets.split(","), args.settings.split(",")
    teachers, methods = args.teachers.split(","), args.methods.split(",")
    columns = [(d, s) for d in datasets for s in settings]
    lines = [header("GNN-to-MLP distillation: Cora and CiteSeer (Planetoid public split)")]
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    lines += [f"- `uname -a`: {uname}", f"- cores: {os.cpu_count()}; torch {torch.__version__}, "
              f"{args.threads} thread(s); Python {platform.python_version()}",
              f"- seeds: {args.seeds} (model init, dropout and, inductive, the held-out draw)", ""]
    lines += ["Test accuracy (%) at the best validation epoch, mean ± std over seeds. Inductive: "
              "20% of the test nodes and their edges are hidden from teacher and student during "
              "training; the column is accuracy on those held-out nodes (GLNN's protocol).", ""]
    head = "| model | " + " | ".join(f"{d} {s[:5]}." for d, s in columns) + " |"
    lines += [head, "|" + "---|" * (len(columns) + 1)]

    def acc_row(label: str, teacher: str, method: str, stage: str) -> str:
        cells = [mean_std([r["test/acc"] for r in _rows(done, d, s, teacher, method, stage)])
                 for d, s in columns]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines.append(acc_row("MLP baseline", teachers[0], "glnn", "baseline"))
    for teacher in teachers:
        lines.append(acc_row(f"**{TEACHERS[teacher]} teacher**", teacher, "glnn", "teacher"))
        for method in methods:
            lines.append(acc_row(f"{TEACHERS[teacher]} → MLP: {LABELS[method]}", teacher, method, "student"))
    lines += ["", "Latency (ms per call, fastest of 20 timed blocks, 1 CPU thread) of the teacher "
              "and the distilled MLP, and the MLP's speed-up. *inductive batch*: 256 new test "
              "nodes; the GNN first "
              "gathers their 2-hop neighbourhood (`k_hop_subgraph`, nodes fetched in brackets), the "
              "MLP reads only their features. Transductive runs, mean over seeds.", "",
              "| dataset | teacher | GNN full graph | MLP full graph | GNN inductive batch "
              "| MLP inductive batch | speed-up (inductive) | speed-up (full) |",
              "|---|---|---|---|---|---|---|---|"]
    setting = "transductive" if "transductive" in settings else settings[0]
    for d in datasets:
        for teacher in teachers:
            t = _rows(done, d, setting, teacher, "glnn", "teacher")
            s = _rows(done, d, setting, teacher, "glnn", "student")
            if not t or not s:
                continue

            def mean(rows, key):
                return statistics.mean(r[key] for r in rows)

            lines.append(
                f"| {d} | {TEACHERS[teacher]} | {mean(t, 'latency_full_ms'):.2f} | "
                f"{mean(s, 'latency_full_ms'):.2f} | {mean(t, 'latency_inductive_ms'):.2f} "
                f"({mean(t, 'inductive_fetched_nodes'):.0f} nodes) | {mean(s, 'latency_inductive_ms'):.3f} | "
                f"{mean(t, 'latency_inductive_ms') / mean(s, 'latency_inductive_ms'):.1f}x | "
                f"{mean(t, 'latency_full_ms') / mean(s, 'latency_full_ms'):.1f}x |")
    params = [(teacher, _rows(done, datasets[0], setting, teacher, "glnn", stage))
              for teacher in teachers for stage in ("teacher", "student")]
    sizes = ", ".join(f"{TEACHERS[t]} {'teacher' if i % 2 == 0 else 'MLP'} {rows[0]['params']:,}"
                      for i, (t, rows) in enumerate(params) if rows)
    seconds = sum(r.get("run_seconds", 0) for r in done.values() if r["key"][-1] == "student")
    lines += ["", f"Parameters ({datasets[0]}): {sizes}.", "",
              f"Total pipeline time: {seconds / 60:.1f} min of runs.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
