"""Several teachers: every combination of GNN teachers on Cora/CiteSeer, two CIFAR-10 teachers,
born-again generations and a CLIP teacher; writes benchmarks/results/multi_teacher.md.

Parts (each resumable from ``<out>/results.jsonl``; run them in any order, ``--report-only``
rewrites the markdown from what has run):

- ``graph``: per dataset and seed, one run trains the GCN, SAGE and GAT teachers, the MLP
  baseline and the ensemble of all three; every other combination, CA-MKD and ensemble + UNIC
  then reuse those teachers' weights (``teachers.<name>.ckpt_path``) with the same student init.
- ``cifar``: two teachers (resnet20, wrn_16_2) trained once (seed 0), then per seed the resnet8
  baseline, KD from each teacher alone and the ensemble of both.
- ``born_again``: resnet8 generations 1..K (``stages.generations=K``), generation 1 taught by
  the resnet20 teacher, seed 0.
- ``ban``: born-again networks as in the paper: generation 0 is resnet8 on labels alone, then
  resnet8 generations 1..K, each taught by the one before, seed 0.
- ``clip``: a CLIP teacher (``--clip-teacher``: the ``teacher.pt`` of a ``cifar10_clip``
  teacher stage) teaching resnet8 through its zero-shot head, vs the baseline of the same seed.

    OMP_NUM_THREADS=1 KDKIT_DATA_DIR=../shared/data python benchmarks/multi_teacher.py --part graph --seeds 5
    OMP_NUM_THREADS=1 KDKIT_DATA_DIR=../shared/data python benchmarks/multi_teacher.py --part cifar --seeds 3
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

from _common import RunLog, header, mean_std, write

GNN_TEACHERS = ("gcn", "sage", "gat")
QUIET = ["trainer.enable_progress_bar=false", "logger=csv", "callbacks=none"]


def combos() -> list[tuple[str, ...]]:
    return [c for k in (1, 2, 3) for c in itertools.combinations(GNN_TEACHERS, k)]


def done(log: RunLog, key: tuple) -> bool:
    """Whether ``key`` ran, re-reading the log: parts may run in parallel processes."""
    fresh = RunLog(log.path, log.key)
    log.done.update(fresh.done)
    return key in log.done


def run_one(over: list[str], out: Path) -> dict:
    from kdkit.compose import compose
    from kdkit.pipeline import run

    start = time.time()
    res = run(compose(over, output_dir=str(out)))
    res["_wall_s"] = round(time.time() - start, 1)
    return res


# ---- graph ------------------------------------------------------------------------------------
def graph(args, log: RunLog) -> None:
    for dataset in args.datasets.split(","):
        for seed in range(args.seeds):
            base = Path(args.out) / dataset / f"seed{seed}"
            common = [f"experiment={dataset}_multi_teacher", f"seed={seed}", *QUIET, *args.extra]
            all_three = [*common, "distiller.ensemble_kd.teachers=null"]  # whatever the default combination
            key = ("graph", dataset, seed, "ensemble", "gcn+sage+gat")
            if not done(log, key):
                res = run_one(all_three, base / "all")
                for name in GNN_TEACHERS:
                    log.record(row("graph", dataset, seed, "teacher", name, res[f"teacher/{name}"]))
                log.record(row("graph", dataset, seed, "baseline", "-", res["baseline"]))
                log.record(row("graph", dataset, seed, "ensemble", "gcn+sage+gat", res["student"]))
            weights = [f"teachers.{n}.ckpt_path={base / 'all' / f'teacher-{n}.pt'}" for n in GNN_TEACHERS]
            reuse = [*common, *weights, "stages.teacher=false", "stages.baseline=false"]
            jobs = {("ensemble", "+".join(c)): [f"distiller.ensemble_kd.teachers=[{','.join(c)}]"]
                    for c in combos() if len(c) < 3}
            jobs[("ca_mkd", "gcn+sage+gat")] = [
                "distiller=[ca_mkd]", "distiller.ca_mkd.temperature=1.0", "distiller.ca_mkd.label_key=y",
                "distiller.ca_mkd.mask_key=train_mask"]
            jobs[("ensemble+unic", "gcn+sage+gat")] = ["distiller=[ensemble_kd,unic]", "distiller.ensemble_kd.teachers=null",
                                                       "distiller.ensemble_kd.temperature=1.0"]
            for (method, teachers), over in jobs.items():
                if done(log, ("graph", dataset, seed, method, teachers)):
                    continue
                res = run_one([*reuse, *over], base / f"{method}-{teachers}")
                log.record(row("graph", dataset, seed, method, teachers, res["student"]))
                print(f"[graph] {dataset} seed {seed} {method} {teachers}: "
                      f"{res['student']['test/acc']:.4f}", flush=True)


def row(part: str, dataset: str, seed: int, method: str, teachers: str, res: dict) -> dict:
    keep = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"part": part, "dataset": dataset, "seed": seed, "method": method, "teachers": teachers, **keep}


# ---- CIFAR-10 ---------------------------------------------------------------------------------
def cifar(args, log: RunLog) -> None:
    out = Path(args.out) / "cifar10"
    common = ["experiment=cifar10_two_teachers", *QUIET, f"trainer.max_epochs={args.epochs}", *args.extra]
    if not done(log, ("cifar", "cifar10", 0, "teachers", "r20+wrn")):
        res = run_one([*common, "stages.baseline=false", "stages.student=false",
                       f"teachers.r20.max_epochs={args.teacher_epochs}",
                       f"teachers.wrn.max_epochs={args.teacher_epochs}"], out / "teachers")
        for name in ("r20", "wrn"):
            log.record(row("cifar", "cifar10", 0, "teacher", name, res[f"teacher/{name}"]))
        log.record(row("cifar", "cifar10", 0, "teachers", "r20+wrn", {}))
    weights = [f"teachers.{n}.ckpt_path={out / 'teachers' / f'teacher-{n}.pt'}" for n in ("r20", "wrn")]
    for seed in range(args.seeds):
        reuse = [*common, *weights, f"seed={seed}", "stages.teacher=false"]
        jobs = {("baseline", "-"): ["stages.student=false"],
                ("kd", "r20"): ["stages.baseline=false", "distiller.ensemble_kd.teachers=[r20]"],
                ("kd", "wrn"): ["stages.baseline=false", "distiller.ensemble_kd.teachers=[wrn]"],
                ("ensemble", "r20+wrn"): ["stages.baseline=false"]}
        for (method, teachers), over in jobs.items():
            if done(log, ("cifar", "cifar10", seed, method, teachers)):
                continue
            res = run_one([*reuse, *over], out / f"{method}-{teachers}-s{seed}")
            stage = "baseline" if method == "baseline" else "student"
            log.record(row("cifar", "cifar10", seed, method, teachers, res[stage]))
            print(f"[cifar] seed {seed} {method} {teachers}: {res[stage]['test/acc']:.4f}", flush=True)


def born_again(args, log: RunLog) -> None:
    out = Path(args.out) / "born_again"
    if done(log, ("born_again", "cifar10", 0, "gen1", "-")):
        return
    res = run_one(["experiment=cifar10_two_teachers", *QUIET, f"trainer.max_epochs={args.epochs}",
                   "~teachers.wrn", f"teachers.r20.ckpt_path={Path(args.out) / 'cifar10' / 'teachers' / 'teacher-r20.pt'}",
                   "stages.teacher=false", f"stages.generations={args.generations}", *args.extra], out)
    log.record(row("born_again", "cifar10", 0, "baseline", "-", res["baseline"]))
    log.record(row("born_again", "cifar10", 0, "gen1", "-", res["student"]))
    for k in range(2, args.generations + 1):
        log.record(row("born_again", "cifar10", 0, f"gen{k}", "-", res[f"student/gen{k}"]))


def ban(args, log: RunLog) -> None:
    """Born-again networks as in the paper: generation 0 is resnet8 trained on labels alone (the
    teacher stage; its init differs from the baseline's, which this part skips), generations
    1..K are resnet8 students, each taught by the one before."""
    out = Path(args.out) / "ban"
    if done(log, ("ban", "cifar10", 0, "gen1", "-")):
        return
    res = run_one(["experiment=cifar10_two_teachers", *QUIET, f"trainer.max_epochs={args.epochs}",
                   "~teachers.wrn", "teachers.r20.model._target_=kdkit.models.cifar_resnet.resnet8",
                   f"teachers.r20.max_epochs={args.epochs}", "stages.baseline=false",
                   f"stages.generations={args.generations}", *args.extra], out)
    log.record(row("ban", "cifar10", 0, "gen0 (labels only)", "-", res["teacher/r20"]))
    log.record(row("ban", "cifar10", 0, "gen1", "-", res["student"]))
    for k in range(2, args.generations + 1):
        log.record(row("ban", "cifar10", 0, f"gen{k}", "-", res[f"student/gen{k}"]))


def ensemble_check(args, log: RunLog) -> None:
    """The two CIFAR teachers and their ensemble as classifiers on the test set: accuracy, and
    the mean top-class probability of the soft targets at the distillation temperature."""
    import torch
    from hydra.utils import instantiate

    from kdkit.checkpoints import load_weights
    from kdkit.compose import compose
    from kdkit.tasks.image_inputs import _channel_stat

    if done(log, ("ensemble_check", "cifar10", 0, "ensemble", "r20+wrn")):
        return
    cfg = compose(["experiment=cifar10_two_teachers", *args.extra])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("test")
    mean, std = _channel_stat(cfg.data.mean), _channel_stat(cfg.data.std)
    probs, labels = {}, []
    for name in ("r20", "wrn"):
        model = instantiate(cfg.teachers[name].model)
        load_weights(model, Path(args.out) / "cifar10" / "teachers" / f"teacher-{name}.pt")
        model.eval()
        chunks = []
        with torch.no_grad():
            for batch in dm.test_dataloader():
                chunks.append(model((batch["image"] - mean) / std).float())
                if name == "r20":
                    labels.append(batch["label"])
        probs[name] = torch.cat(chunks)
    y = torch.cat(labels)
    T = float(cfg.distiller.ensemble_kd.temperature)
    soft = {n: torch.softmax(z / T, 1) for n, z in probs.items()}
    soft["r20+wrn"] = (soft["r20"] + soft["wrn"]) / 2
    plain = {n: torch.softmax(z, 1) for n, z in probs.items()}
    plain["r20+wrn"] = (plain["r20"] + plain["wrn"]) / 2
    agree = (probs["r20"].argmax(1) == probs["wrn"].argmax(1)).float().mean().item()
    for name in ("r20", "wrn", "r20+wrn"):
        log.record({"part": "ensemble_check", "dataset": "cifar10", "seed": 0,
                    "method": "ensemble" if "+" in name else "teacher", "teachers": name,
                    "test/acc": (plain[name].argmax(1) == y).float().mean().item(),
                    "top_prob_at_T": soft[name].max(1).values.mean().item(), "agreement": agree})


def clip(args, log: RunLog) -> None:
    if not args.clip_teacher:
        raise SystemExit("--part clip needs --clip-teacher <teacher.pt of a cifar10_clip teacher stage>")
    out = Path(args.out) / "clip"
    for seed in range(args.clip_seeds):
        if done(log, ("clip", "cifar10", seed, "clip", "zero-shot")):
            continue
        res = run_one(["experiment=cifar10_clip_teacher", *QUIET, f"trainer.max_epochs={args.epochs}",
                       f"seed={seed}", f"teachers.clip.ckpt_path={args.clip_teacher}", *args.extra],
                      out / f"s{seed}")
        log.record(row("clip", "cifar10", seed, "teacher", "clip", res["teacher/clip"]))
        log.record(row("clip", "cifar10", seed, "baseline", "-", res["baseline"]))
        log.record(row("clip", "cifar10", seed, "clip", "zero-shot", res["student"]))


# ---- report -----------------------------------------------------------------------------------
def values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float))]


def report(args, log: RunLog) -> None:
    rows = list(RunLog(log.path, log.key).done.values())  # what every parallel part recorded
    text = [header("Several teachers"), ""]
    graph_rows = [r for r in rows if r["part"] == "graph"]
    for dataset in sorted({r["dataset"] for r in graph_rows}):
        mine = [r for r in graph_rows if r["dataset"] == dataset]
        seeds = len({r["seed"] for r in mine})
        text += [f"## {dataset}: GCN + SAGE + GAT teachers -> MLP ({seeds} seeds)", "",
                 "Test accuracy (%) of the weights kept at the best validation epoch (students) or the "
                 "last epoch (teachers), mean ± std over seeds; `val` is the validation accuracy the "
                 "default was chosen on. `ensemble` of one teacher is GLNN's KD (T = 1); "
                 "same student init per seed.", "",
                 "| model | teachers | seeds | val acc (%) | test acc (%) |", "|---|---|---|---|---|"]
        groups: dict = {}
        for r in mine:
            groups.setdefault((r["method"], r["teachers"]), []).append(r)
        order = sorted(groups, key=lambda k: ({"teacher": 0, "baseline": 1}.get(k[0], 2), k[1].count("+"), k))
        best = max((k for k in groups if k[0] not in ("teacher", "baseline")),
                   key=lambda k: statistics.mean(values(groups[k], "val/acc_selected") or [0]), default=None)
        for k in order:
            g = groups[k]
            val = mean_std(values(g, "val/acc_selected") or values(g, "val/acc"))
            name = f"**{k[0]}**" if k == best else k[0]
            text.append(f"| {name} | {k[1]} | {len(g)} | {val} | {mean_std(values(g, 'test/acc'))} |")
        text += ["", f"Best on validation: **{best[0]} ({best[1]})**." if best else "", ""]
    for part, title in (("cifar", "CIFAR-10: two teachers -> resnet8"),
                        ("born_again", "CIFAR-10: generations of resnet8, generation 1 taught by resnet20 (seed 0)"),
                        ("ban", "CIFAR-10: born-again networks (generation 0: resnet8 on labels alone; seed 0)"),
                        ("clip", "CIFAR-10: a CLIP teacher (zero-shot head) -> resnet8")):
        mine = [r for r in rows if r["part"] == part and r["method"] != "teachers"]
        order = {"teacher": 0, "baseline": 1}
        mine.sort(key=lambda r: (order.get(r["method"], 2), r["method"], r["teachers"], r["seed"]))
        if not mine:
            continue
        text += [f"## {title}", "", "| model | teachers | seeds | test acc (%) | params |", "|---|---|---|---|---|"]
        groups = {}
        for r in mine:
            groups.setdefault((r["method"], r["teachers"]), []).append(r)
        for k, g in groups.items():
            params = g[0].get("params", "-")
            text.append(f"| {k[0]} | {k[1]} | {len(g)} | {mean_std(values(g, 'test/acc'))} | "
                        f"{params:,} |" if isinstance(params, int) else f"| {k[0]} | {k[1]} | {len(g)} | "
                        f"{mean_std(values(g, 'test/acc'))} | - |")
        text.append("")
    check = [r for r in rows if r["part"] == "ensemble_check"]
    if check:
        text += ["## CIFAR-10: the two teachers and their ensemble as classifiers", "",
                 f"Test set, fp32 (`--part ensemble_check`); the teachers agree on "
                 f"{check[0]['agreement'] * 100:.1f}% of the test images. `top prob at T`: mean largest "
                 "probability of the soft targets the student sees (T = 4).", "",
                 "| model | test acc (%) | top prob at T |", "|---|---|---|"]
        text += [f"| {r['teachers']} | {r['test/acc'] * 100:.2f} | {r['top_prob_at_T']:.3f} |" for r in check]
        text.append("")
    if args.notes and Path(args.notes).exists():
        text += ["## How the runs were made, and findings", "", Path(args.notes).read_text().strip(), ""]
    write("multi_teacher.md", "\n".join(text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["graph", "cifar", "born_again", "ban", "ensemble_check", "clip"], action="append", default=[])
    p.add_argument("--datasets", default="cora,citeseer")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10, help="CIFAR student epochs")
    p.add_argument("--teacher-epochs", type=int, default=15, help="CIFAR teacher epochs")
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--clip-teacher", default=None)
    p.add_argument("--clip-seeds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/runs/multi_teacher")
    p.add_argument("--notes", default="benchmarks/multi_teacher_notes.md", help="findings appended to the report")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    log = RunLog(Path(args.out) / "results.jsonl",
                 key=lambda r: (r["part"], r["dataset"], r["seed"], r["method"], r["teachers"]))
    if not args.report_only:
        for part in args.part:
            {"graph": graph, "cifar": cifar, "born_again": born_again, "ban": ban, "ensemble_check": ensemble_check,
             "clip": clip}[part](args, log)
    report(args, log)


if __name__ == "__main__":
    main()
