"""Data chosen and shaped by the teacher on CIFAR-10 (issue #18): unlabelled transfer data,
teacher budgets, teacher-scored batch selection, disagreement-driven augmentation; the same
transfer data and batch selection on CIFAR-10 image-caption pairs (CLIP).

Every vision row trains the resnet8 student of ``cifar10_transfer`` with KD from one resnet20
teacher trained on every label (trained once here, or given by ``--teacher-ckpt``, e.g. the
teacher of a default ``kdkit-train experiment=cifar10_transfer`` run); every CLIP row the student
of ``cifar10_clip`` with its CRD + ICL from that experiment's teacher, trained once on every
caption (``SETTINGS``). Resumable: every finished run is a line
of ``<out>/results.jsonl``; rerun the same command to continue, ``--report-only`` to rewrite
``benchmarks/results/teacher_data.md`` from what has finished.

    python benchmarks/teacher_data.py transfer --teacher-ckpt <run>/teacher.pt --jobs 2
    python benchmarks/teacher_data.py transfer_share --jobs 2 --seeds 1
    python benchmarks/teacher_data.py budget   --teacher-ckpt <run>/teacher.pt --jobs 2
    python benchmarks/teacher_data.py select   --teacher-ckpt <run>/teacher.pt --jobs 2
    python benchmarks/teacher_data.py augment  --teacher-ckpt <run>/teacher.pt --jobs 2
    python benchmarks/teacher_data.py clip_transfer --jobs 2
    python benchmarks/teacher_data.py clip_select   --jobs 2

Parts (rows; 3 seeds for ``transfer`` and for the best row of the other parts, 1 for the rest):

- ``transfer`` (a): 2,000 labels + the other training images without labels, KD where there is
  no label; vs the 2,000 labels alone (the student alone, and KD on them); vs every label (KD).
- ``transfer_share`` (a, continued): ``transfer_kd`` against the same run with 32 labelled rows
  in every batch of 128 (``data.labeled_per_batch=32``, a labelled stream apart from the
  unlabelled one), both taught by one teacher.
- ``budget`` (b): the transfer setting where only 10% / 30% / 100% of the samples ever get a
  teacher forward, spent at random or uncertainty-first (the student's margin) or on the
  student's flip disagreement (``selection=[teacher_budget]``).
- ``select`` (c): every label, KD; the top half of a 2x super-batch by learnability or by
  teacher-student disagreement vs uniform batches, at equal student steps (the super-batch rows
  run twice the epochs of the uniform row, which has twice the steps per epoch) and at equal
  wall time (the uniform row given the epochs the selection row's time would buy).
- ``augment`` (d): every label, KD; the crop+flip candidate (of 4) with the largest
  teacher-student divergence vs the standard random crop+flip; and a learned affine augmentor
  trained to raise that divergence (``selection=[learned_augment]``, HARD-style) on top of
  crop+flip; and the same through a VAE's latent (``selection=[vae_augment]``, HARD's VAE variant).
- ``clip_transfer`` (a, CLIP): 2,000 captioned images + the other training images without
  captions vs the 2,000 captioned alone (the student alone, and distilled on them) vs every
  caption; and with CLIP-KD's FD added (an image embedding target for every image); and with 32 /
  64 / 96 captioned pairs in every batch (``data.labeled_per_batch``).
- ``clip_select`` (c, CLIP): ``select`` on the pairs, learnability = each pair's in-batch
  contrastive loss, student minus teacher (JEST).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    RunLog,
    cpu_of,
    command,
    header,
    machine,
    mean_std,
    restored_note,
    run_all_jobs,
    write,
)

ALL_LABELS = ["data.labeled_count=null"]
TRANSFER = {
    "labeled_alone": ["stages.student=false", "stages.baseline_max_epochs=equal_steps"],
    "labeled_kd": ["data.student_view=labeled", "stages.baseline=false", "trainer.max_epochs={equal_steps}"],
    "transfer_kd": ["stages.baseline=false"],
    "all_labels_kd": [*ALL_LABELS, "stages.baseline=false"],
}
# (a) again with a fixed labelled share per batch (data.labeled_per_batch): a part of its own, so
# both rows share one teacher (the transfer part's went with its machine)
SHARE = {
    "transfer_kd": ["stages.baseline=false"],
    "transfer_kd_share32": ["stages.baseline=false", "data.labeled_per_batch=32"],
}
BUDGET = {f"budget_{int(f * 100)}_{order}": ["stages.baseline=false", "selection=[teacher_budget]",
                                              f"selection.teacher_budget.fraction={f}",
                                              f"selection.teacher_budget.order={order}"]
          for f in (0.1, 0.3, 1.0) for order in ("random", "uncertainty", "view_disagreement")
          if not (f == 1.0 and order != "random")}  # a full budget queries everything: order is moot
SUPER = ["selection=[batch_select]", "data.batch_size=256", "trainer.max_epochs={double}"]
SELECT = {
    "uniform": [*ALL_LABELS, "stages.baseline=false"],
    "select_learnability": [*ALL_LABELS, "stages.baseline=false", *SUPER, "selection.batch_select.score=learnability"],
    "select_disagreement": [*ALL_LABELS, "stages.baseline=false", *SUPER, "selection.batch_select.score=disagreement"],
    "select_random": [*ALL_LABELS, "stages.baseline=false", *SUPER, "selection.batch_select.score=random"],
    "uniform_equal_time": [*ALL_LABELS, "stages.baseline=false", "trainer.max_epochs={equal_time}"],
}
AUGMENT = {
    "crop_flip": [*ALL_LABELS, "stages.baseline=false"],
    "disagreement_aug": [*ALL_LABELS, "stages.baseline=false", "data.augment=false", "selection=[augment_select]"],
    # a learned affine augmentor trained to maximise teacher-student KL (HARD-style), on top of crop+flip
    "learned_aug": [*ALL_LABELS, "stages.baseline=false", "selection=[learned_augment]"],
    # the same objective through a VAE's latent (HARD's VAE variant); each run trains its VAE first
    "vae_aug": [*ALL_LABELS, "stages.baseline=false", "selection=[vae_augment]"],
}
CAPTIONS_2000 = ["data.labeled_count=2000"]
CLIP_TRANSFER = {
    "labeled_alone": [*CAPTIONS_2000, "stages.student=false", "stages.baseline_max_epochs=equal_steps"],
    "labeled_kd": [*CAPTIONS_2000, "data.student_view=labeled", "stages.baseline=false",
                   "trainer.max_epochs={equal_steps}"],
    "transfer_kd": [*CAPTIONS_2000, "stages.baseline=false"],
    "transfer_kd_fd": [*CAPTIONS_2000, "stages.baseline=false", "distiller=[clip_crd,clip_icl,clip_fd]"],
    "all_labels_kd": ["stages.baseline=false"],
    # diagnostic: KD on the captioned part alone in batches of 13, the captioned rows a transfer
    # batch of 128 holds (10.5%), for 5 epochs = about transfer_kd's steps and caption exposure
    "labeled_kd_b13": [*CAPTIONS_2000, "data.student_view=labeled", "stages.baseline=false", "data.batch_size=13"],
    # the remedy: a fixed captioned share per batch from a stream apart (data.labeled_per_batch)
    "transfer_kd_share32": [*CAPTIONS_2000, "stages.baseline=false", "data.labeled_per_batch=32"],
    "transfer_kd_share64": [*CAPTIONS_2000, "stages.baseline=false", "data.labeled_per_batch=64"],
    "transfer_kd_share96": [*CAPTIONS_2000, "stages.baseline=false", "data.labeled_per_batch=96"],
    "transfer_kd_fd_share64": [*CAPTIONS_2000, "stages.baseline=false", "data.labeled_per_batch=64",
                               "distiller=[clip_crd,clip_icl,clip_fd]"],
}
CLIP_SELECT = {m: [o for o in over if o not in ALL_LABELS] for m, over in SELECT.items()}
PARTS = {"transfer": TRANSFER, "transfer_share": SHARE, "budget": BUDGET, "select": SELECT, "augment": AUGMENT,
         "clip_transfer": CLIP_TRANSFER, "clip_select": CLIP_SELECT}
SEEDS_ALL = {"transfer", "transfer_share", "clip_transfer"}  # every row of these parts gets every seed


@dataclass(frozen=True)
class Setting:
    """What a part trains: its experiment, the metric a row is judged by, the default student
    and teacher epochs, and where its teacher goes under ``--out``."""

    experiment: str
    metric: str
    metric_name: str
    epochs: int
    teacher_epochs: int
    teacher_dir: str
    pair: str


NOTES = Path(__file__).resolve().parent / "teacher_data_notes.md"  # findings written by hand

VISION = Setting("cifar10_transfer", "test/acc", "test acc", 30, 30, "teacher", "resnet20 -> resnet8, KD")
CLIP = Setting("cifar10_clip", "test/zeroshot_acc", "zero-shot acc", 5, 15, "clip_teacher",
               "CLIP ViT d128 -> d64, CRD + ICL")
SETTINGS = {part: CLIP if part.startswith("clip_") else VISION for part in PARTS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--epochs", type=int, default=None,
                   help="student epochs of a uniform row (default: 30 vision, 5 CLIP)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: 30 vision, 15 CLIP")
    p.add_argument("--teacher-ckpt", default=None, help="a trained teacher.pt (else trained once here)")
    p.add_argument("--retrain-teacher", action="store_true",
                   help="train the teacher again under the next free name even when one is on record "
                        "(does the same command give the same teacher? e.g. under ATEN_CPU_CAPABILITY=avx2)")
    p.add_argument("--methods", default=None, help="comma-separated rows (default: all of the part)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each")
    p.add_argument("--threads", type=int, default=2, help="torch threads of a run when --jobs 1")
    p.add_argument("--out", default="benchmarks/runs/teacher_data")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()
    table, setting = PARTS[args.part], SETTINGS[args.part]
    args.epochs = args.epochs or setting.epochs
    args.teacher_epochs = args.teacher_epochs or setting.teacher_epochs
    methods = [m for m in (args.methods.split(",") if args.methods else table) if m]
    unknown = sorted(set(methods) - set(table))
    if unknown:
        p.error(f"unknown rows {unknown}; rows of {args.part}: {', '.join(table)}")
    out = Path(args.out)
    common = [f"experiment={setting.experiment}", "trainer.enable_progress_bar=false", "logger=csv",
              "export.programs=[]", f"trainer.max_epochs={args.epochs}", *args.extra]
    log = RunLog(out / "results.jsonl", key=lambda row: (row["part"], row["method"], row["seed"]))
    if not args.report_only:
        teacher = args.teacher_ckpt or train_teacher(args, common, out / setting.teacher_dir, log)
        for todo in (lambda: [(m, 0) for m in methods],
                     lambda: [(m, s) for s in range(1, args.seeds) for m in more_seeds(log, args.part, methods)]):
            jobs = []
            for m, s in todo():
                if (args.part, m, s) in log.done:
                    continue
                over = [*common, f"teacher.ckpt_path={teacher}", "stages.teacher=false",
                        *fill(table[m], args, log, s), f"seed={s}"]
                jobs.append((m if m != "labeled_alone" else "baseline", s, over, str(out / args.part / f"{m}_s{s}")))
            for row in run_all_jobs(jobs, args.jobs, args.threads):
                row["method"] = "labeled_alone" if row["method"] == "baseline" else row["method"]
                log.record({"part": args.part, **row, "teacher_ckpt": teacher, "command": command()})
                print(f"[teacher_data {args.part}] {row['method']} seed {row['seed']}: {setting.metric} "
                      f"{row[setting.metric]:.4f} ({row['wall_s']:.0f} s)", flush=True)
    report(log)


def fill(overrides: list[str], args, log: RunLog, seed: int) -> list[str]:
    """Overrides with their epoch placeholders resolved: ``{double}`` (twice the uniform epochs:
    equal steps with half-size batches), ``{equal_steps}`` (KD on the labels alone given the
    transfer student's steps), ``{equal_time}`` (the uniform row given the epochs the best
    selection row's training time would buy, ``equal_time_reference``)."""
    values = {"double": 2 * args.epochs}
    if any("{equal_steps}" in o for o in overrides):
        values["equal_steps"] = equal_steps_epochs(args.epochs, SETTINGS[args.part].experiment, overrides)
    if any("{equal_time}" in o for o in overrides):
        uniform = log.done.get((args.part, "uniform", 0))
        reference = equal_time_reference(log.done.values(), args.part, SETTINGS[args.part].metric)
        if not (uniform and reference):
            raise SystemExit("uniform_equal_time needs the uniform row and the selection rows first: "
                             "run them (--methods uniform,select_learnability,...), then this row")
        chosen = log.done[(args.part, reference, 0)]
        values["equal_time"] = max(1, round(args.epochs * chosen["fit_seconds"] / uniform["fit_seconds"]))
    return [o.format(**values) for o in overrides]


def equal_time_reference(rows, part: str, metric: str) -> str | None:
    """The selection row whose training time ``uniform_equal_time`` gets: the best ``select_*``
    row of seed 0 in ``part`` (None before one ran)."""
    ran = [r for r in rows if r["part"] == part and r["seed"] == 0 and r["method"].startswith("select_")]
    return max(ran, key=lambda r: r[metric])["method"] if ran else None


def equal_steps_epochs(epochs: int, experiment: str = "cifar10_transfer", overrides: list[str] = ()) -> int:
    """Epochs on the labelled view that give the transfer view's steps (from the data itself)."""
    from hydra.utils import instantiate

    from kdkit.compose import compose

    data = [o for o in overrides if o.startswith("data.labeled_")]
    dm = instantiate(compose([f"experiment={experiment}", *data]).data)
    dm.setup("fit")
    steps = {}
    for view in ("transfer", "labeled"):
        dm.use_train_view(view)
        steps[view] = max(1, dm.num_train_samples // dm.batch_size)
    return -(-epochs * steps["transfer"] // steps["labeled"])


def more_seeds(log: RunLog, part: str, methods: list[str]) -> list[str]:
    """Rows that get every seed: all of ``transfer``; elsewhere the control and the best row."""
    if part in SEEDS_ALL:
        return methods
    ran = [m for m in methods if (part, m, 0) in log.done]
    control = {"budget": "budget_100_random", "select": "uniform", "augment": "crop_flip",
               "clip_select": "uniform"}[part]
    metric = SETTINGS[part].metric
    best = sorted((m for m in ran if m != control), key=lambda m: -log.done[(part, m, 0)][metric])[:1]
    return [m for m in (control, *best) if m in ran]


def train_teacher(args, common: list[str], out: Path, log: RunLog) -> str:
    """The teacher, trained once on every label into ``<out>/teacher.pt``; its row is
    keyed by that checkpoint, which the student rows it teaches name as ``teacher_ckpt``.

    A checkpoint whose row is recorded but whose file went with its machine is trained again
    under a fresh name (``<out>_2``, ...): the rows it taught keep naming their own teacher."""
    import torch

    from kdkit.compose import compose
    from kdkit.pipeline import run
    from kdkit.run_environment import last_start

    for n in itertools.count(1):
        path = (out if n == 1 else out.with_name(f"{out.name}_{n}")) / "teacher.pt"
        recorded = ("teacher", str(path), 0) in log.done
        if recorded and path.exists() and not args.retrain_teacher:
            return str(path)
        if not recorded:
            break
    torch.set_num_threads(args.threads)
    over = [*common, "stages.baseline=false", "stages.student=false", f"teacher.max_epochs={args.teacher_epochs}"]
    res = run(compose(over, output_dir=str(path.parent)))["teacher"]
    env = last_start(path.parent)  # the run's own record: its kernel set and capping variables decide its digits
    log.record({"part": "teacher", "method": str(path), "seed": 0, **res, "machine": machine(),
                "cpu_capability": env["cpu_capability"], "variables": env["variables"], "command": command()})
    return str(path)


def report(log: RunLog) -> None:
    """``teacher_data.md``: one table per part from the runs so far."""
    lines = [header("Data chosen and shaped by the teacher (CIFAR-10: resnet20 -> resnet8, KD; CLIP on its "
                    "captions: ViT d128 -> d64, CRD + ICL)"), ""]
    lines += teachers_note(log)
    if NOTES.exists():
        lines += [NOTES.read_text()]
    commands = sorted({c for r in log.done.values() for c in ([r["command"]] if r.get("command")
                                                             else r.get("source_commands", []))})
    lines += ["Runs came from these commands (the script resumes: each records what it finished):", "",
              *[f"- `{c}`" for c in commands], ""]
    lines += restored_note(log.done.values())
    lines.append("Train times are the wall seconds of each fit, one torch thread, on a shared 2-core machine "
                 "with other runs (and tests) beside it; a run may have been paused meanwhile. They are "
                 "no speed measure: compare cost by student steps and teacher forwards.\n")
    for part, table in PARTS.items():
        rows = [r for (p, _, _), r in log.done.items() if p == part]
        if not rows:
            lines += [f"## {part}", "", "No run of this part has finished yet.", ""]
            continue
        setting = SETTINGS[part]
        epochs = sorted({epochs_of(r, setting.epochs) for r in rows})
        lines += [f"## {part}", "", f"`experiment={setting.experiment}` ({setting.pair}). Student epochs (`--epochs`; "
                  f"a row's `{{...}}` epochs derive from it): {', '.join(map(str, epochs))}.", "",
                  f"| row | overrides | seeds | {setting.metric_name} (%) | student steps | teacher forwards | train time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for method in table:
            runs = [r for r in rows if r["method"] == method]
            if not runs:
                continue
            accs = [r[setting.metric] for r in runs]
            forwards = next((runs[0][k] for k in ("selection/teacher_budget/teacher_forwards",
                                                  "selection/augment_select/teacher_forwards",
                                                  "selection/learned_augment/teacher_forwards",
                                                  "selection/vae_augment/teacher_forwards",
                                                  "selection/batch_select/rows_scored") if k in runs[0]), "-")
            over = ", ".join(f"`{o}`" for o in table[method]) or "(the experiment)"
            steps = runs[0].get("fit_steps", "-")
            lines.append(f"| {method} | {over} | {len(accs)} | {mean_std(accs)} | {steps} | {forwards} | "
                         f"{statistics.mean(r.get('fit_seconds', 0) for r in runs):.0f} |")
        lines.append("")
        if part in ("transfer", "clip_transfer"):
            lines += gap_recovered(rows, setting.metric)
        if part in ("transfer_share", "clip_transfer"):
            lines += share_reading(rows, setting.metric)
        if part in ("select", "clip_select"):
            lines += select_reading(rows, setting.metric)
        if part == "augment":
            lines += augment_cost(rows)
    write("teacher_data.md", "\n".join(lines) + "\n")


def teachers_note(log: RunLog) -> list[str]:
    """Which teacher checkpoint taught which parts, with its test accuracy where this benchmark
    trained it (a checkpoint lost with its machine is trained again, so parts may differ)."""
    trained = {r["method"]: r for (p, _, _), r in log.done.items() if p == "teacher"}
    parts: dict[str, list[str]] = {ckpt: [] for ckpt in trained}
    for (p, _, _), r in log.done.items():
        if p != "teacher" and p not in parts.setdefault(r.get("teacher_ckpt", "?"), []):
            parts[r.get("teacher_ckpt", "?")].append(p)
    lines = ["Teachers (resnet20, or the CLIP teacher of `cifar10_clip`, trained on every label by the "
             "commands below):", ""]
    for ckpt, used in parts.items():
        t = trained.get(ckpt)
        seen = f", {t['train_samples']} training images" if t and "train_samples" in t else ""
        what = (f"{score_of(t)}{seen}{cpu_of(t)}{kernels_of(t)}"
                if t else "given by `--teacher-ckpt`, not trained by this benchmark")
        lines.append(f"- `{ckpt}`: {what}; parts: {', '.join(sorted(used, key=list(PARTS).index)) or 'none yet'}.")
    if len(trained) > 1:
        lines += ["", ("A checkpoint went with its machine before a later part ran, so that part's teacher was "
                       "trained again by the same command and seed. With other kernels (torch picks them by "
                       "the CPU's instruction set: AVX2 and AVX-512 round differently), another `--threads` "
                       "(another summation order) or at a later kdkit commit that is not the same teacher: "
                       "compare rows within a part (each part names its teacher).")]
        same = same_teachers(trained)
        lines += ["", *same] if same else []
    return [*lines, ""]


def kernels_of(row: dict) -> str:
    """``", AVX2 kernels (capped: ATEN_CPU_CAPABILITY=avx2, ...)"`` from a teacher row that
    recorded its kernel set (left out where the machine line names it already); "" for rows from
    before it was recorded."""
    from kdkit.run_environment import ARITHMETIC_VARIABLES

    cap = row.get("cpu_capability")
    if not cap:
        return ""
    capped = ", ".join(f"{k}={v}" for k, v in (row.get("variables") or {}).items() if k in ARITHMETIC_VARIABLES)
    note = f" ({row['cpu_capability_note']})" if row.get("cpu_capability_note") else ""
    named = f", {cap}" in cpu_of(row)
    return ("" if named else f", {cap} kernels") + (f" (capped: {capped})" if capped else "") + note


def same_teachers(trained: dict[str, dict]) -> list[str]:
    """A line per group of retrained teachers whose test and validation scores agree to every
    digit: the retrain reproduced the teacher."""
    groups: dict[tuple, list[str]] = {}
    for ckpt, row in trained.items():
        scores = tuple(row.get(k) for k in ("test/acc", "val/acc", "test/zeroshot_acc", "val/zeroshot_acc"))
        if "val/acc" in row or "val/zeroshot_acc" in row:
            groups.setdefault(scores, []).append(ckpt)
    lines = []
    for ckpts in (c for c in groups.values() if len(c) > 1):
        where = list(dict.fromkeys(f"{cpu_of(trained[c])}{kernels_of(trained[c])}".removeprefix(", on ")
                                   for c in ckpts))
        lines.append(f"{' and '.join(f'`{c}`' for c in ckpts)}: the same test and validation accuracy to "
                     f"every digit (trained on {'; '.join(where)}): retrained by the same command, the "
                     "teacher came back the same.")
    return lines


def score_of(row: dict) -> str:
    """A teacher row's headline: test accuracy (vision) or zero-shot accuracy (CLIP)."""
    if "test/acc" in row:
        return f"{row['test/acc'] * 100:.2f}% test accuracy"
    return f"{row['test/zeroshot_acc'] * 100:.2f}% zero-shot accuracy"


def augment_cost(rows: list[dict]) -> list[str]:
    """What disagreement-driven augmentation gained over crop+flip and what it cost (mean of the
    seeds each row has); then each learned augmentation against crop+flip at the seeds both ran."""
    by = {m: [r for r in rows if r["method"] == m] for m in ("crop_flip", "disagreement_aug")}
    if not by["crop_flip"]:
        return []
    lines = []
    if by["disagreement_aug"]:
        acc = {m: statistics.mean(r["test/acc"] for r in rs) for m, rs in by.items()}
        secs = {m: statistics.mean(r["fit_seconds"] for r in rs) for m, rs in by.items()}
        k = by["disagreement_aug"][0].get("selection/augment_select/candidates", "K")
        lines.append(f"- disagreement_aug - crop_flip: {(acc['disagreement_aug'] - acc['crop_flip']) * 100:+.2f} "
                     f"points ({len(by['crop_flip'])} / {len(by['disagreement_aug'])} seeds), at the same student "
                     f"steps, {secs['disagreement_aug'] / secs['crop_flip']:.1f}x the training time and {k}x the "
                     f"teacher forwards ({k} live teacher and {k} no-grad student forwards per image to pick its "
                     "candidate).")
    control = {r["seed"]: r["test/acc"] for r in by["crop_flip"] if "seed" in r}
    for method in ("learned_aug", "vae_aug"):
        runs = [r for r in rows if r["method"] == method and r.get("seed") in control]
        if runs:
            gain = statistics.mean(r["test/acc"] - control[r["seed"]] for r in runs) * 100
            forwards = next((v for k, v in runs[0].items() if k.endswith("/teacher_forwards")), None)
            cost = f", {forwards:,} teacher forwards counted by its policy" if forwards is not None else ""
            lines.append(f"- {method} - crop_flip: {gain:+.2f} points ({len(runs)} paired seed"
                         f"{'s' if len(runs) > 1 else ''}), at the same student steps{cost}.")
    return [*lines, ""] if lines else []


def epochs_of(row: dict, default: int = 30) -> int:
    """The ``--epochs`` a row ran with: from its command (or, for a restored row, the commands it
    came from), else its setting's ``default``."""
    for cmd in [row.get("command", ""), *row.get("source_commands", [])]:
        words = cmd.replace("--epochs=", "--epochs ").split()
        if "--epochs" in words:
            return int(words[words.index("--epochs") + 1])
    return default


def gap_recovered(rows: list[dict], metric: str = "test/acc") -> list[str]:
    """How much of the gap between the labelled part alone and every label the unlabelled rest
    with teacher outputs closes (mean ``metric`` of the rows present)."""
    acc = {m: statistics.mean(r[metric] for r in rows if r["method"] == m)
           for m in {r["method"] for r in rows}}
    if not {"transfer_kd", "all_labels_kd"} <= set(acc):
        return []
    out = []
    for low in ("labeled_alone", "labeled_kd"):
        if low in acc and acc["transfer_kd"] < acc[low]:
            out.append(f"- transfer_kd is {(acc[low] - acc['transfer_kd']) * 100:.2f} points below {low}: "
                       "the unlabelled rest closed none of the gap to all_labels_kd.")
        elif low in acc and acc["all_labels_kd"] > acc[low]:
            share = (acc["transfer_kd"] - acc[low]) / (acc["all_labels_kd"] - acc[low])
            out.append(f"- From {low} to all_labels_kd: transfer_kd closes {share * 100:.0f}% of the "
                       f"{(acc['all_labels_kd'] - acc[low]) * 100:.2f}-point gap.")
    return [*out, ""] if out else []


def by_method(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """``rows`` as ``{method: {seed: row}}``."""
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r
    return by


def paired(by: dict[str, dict[int, dict]], a: str, b: str, metric: str) -> tuple[float, int]:
    """Mean ``metric`` difference ``a - b`` in points over the seeds both rows ran, and their
    count (nan, 0 when they share none)."""
    seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
    diff = statistics.mean(by[a][s][metric] - by[b][s][metric] for s in seeds) if seeds else float("nan")
    return diff * 100, len(seeds)


def seeds_word(n: int) -> str:
    return f"{n} paired seed{'s' * (n > 1)}"


def share_reading(rows: list[dict], metric: str) -> list[str]:
    """Each fixed-share row (``*_share<k>``) against the same distillers on uniform batches
    (the row's name without the suffix), and against the labelled part alone, over the seeds
    both ran."""
    by = by_method(rows)
    out = []
    for m in sorted(x for x in by if "_share" in x):
        base, k = m.rsplit("_share", 1)
        if not paired(by, m, base, metric)[1]:  # no uniform-batch row with the same distillers
            continue
        readings = [f"{diff:+.2f} points vs {b} ({seeds_word(n)})"
                    for b in (base, "labeled_alone", "labeled_kd")
                    for diff, n in [paired(by, m, b, metric)] if n]
        out.append(f"- {m} ({k} labelled rows in every batch instead of the data's share): "
                   f"{'; '.join(readings)}.")
    return [*out, ""] if out else []


def select_reading(rows: list[dict], metric: str) -> list[str]:
    """Each selection row against uniform batches at equal student steps, with its training
    time; the uniform row given the best selection row's time (equal compute), where it ran.
    A difference is taken over the seeds both rows ran (a 1-seed row against uniform's seed 0)."""
    by = by_method(rows)

    def secs(m: str) -> float:
        return statistics.mean(r.get("fit_seconds", 0) for r in by[m].values())

    if "uniform" not in by:
        return []
    out = []
    for m in sorted(x for x in by if x.startswith("select_")):
        diff, n = paired(by, m, "uniform", metric)
        out.append(f"- {m} - uniform: {diff:+.2f} points at equal student steps ({seeds_word(n)}), "
                   f"{secs(m) / secs('uniform'):.1f}x the training time.")
    best = equal_time_reference(rows, rows[0]["part"], metric)
    if "uniform_equal_time" in by and best:
        diff, n = paired(by, best, "uniform_equal_time", metric)
        out.append(f"- At equal training time (uniform_equal_time: the epochs {best}'s seed-0 time buys): "
                   f"{best} - uniform_equal_time {diff:+.2f} points ({seeds_word(n)}).")
    return [*out, ""] if out else []


if __name__ == "__main__":
    main()
