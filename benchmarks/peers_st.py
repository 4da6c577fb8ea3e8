"""kdkit side by side with sentence-transformers: embedding distillation on BEIR SciFact.

Both sides get the same work (issue #17): a student sliced from all-MiniLM-L6-v2's layers [0, 5]
(``kdkit.models.text.from_teacher_layers``, built once; sentence-transformers loads the same
weights from kdkit's export of that untrained student), the same texts (kdkit's ``text``
stream: the 5,183 corpus passages and 809 train queries, read at 128 tokens), the same targets
(the teacher's embeddings of those texts at 128 tokens, encoded once by
``kdkit.tasks.retrieval_table.build_teacher_table`` and read from its on-disk cache by both),
batches of 32 (remainder dropped), AdamW (lr 5e-4, weight decay 0.01), 5% linear warm-up then
cosine decay, no gradient clipping, fp32, and the same loss: the mean squared error to the
teacher's embedding, ``mean_{i,d} (s_id - t_id)^2``.

- kdkit: ``RetrievalTask`` with ``Embed(loss="mse", weight=1/D)`` (kdkit's mse sums over the D
  dimensions; the weight makes it sentence-transformers' per-element mean) in the ``Trainer``
  that ``kdkit-train`` builds, minus logging and saving (``benchmarks/overhead.py``).
- sentence-transformers: its documented model-distillation recipe: ``SentenceTransformerTrainer``
  with ``losses.MSELoss`` on a ``datasets.Dataset`` of ``(text, label = teacher embedding)``,
  ``SentenceTransformerTrainingArguments`` set to the same optimiser and schedule. Two defaults
  of the transformers Trainer differ from kdkit's and stay (each side runs as its users get it):
  its AdamW is torch's fused kernel (``optim="adamw_torch_fused"``; kdkit's retrieval config
  asks for it too, ``task.optimizer.fused: true``, since this benchmark found torch's CPU default,
  one tensor at a time, ~90 ms slower per step: ``--single-tensor`` measures that default), and
  it leaves biases and LayerNorm weights out of weight decay.

Step time (``--quick``): the two run in one process, one torch thread, in two Python threads that
take turns (never both at once): ``--block`` kdkit steps, then ``--block`` sentence-transformers
steps, and so on. A step is the time from the end of the side's previous step (or its resumption
after the other side's block) to the end of this one: data fetch, tokenisation, forward, backward,
optimiser and schedule. The ratio is the median over block pairs of (mean kdkit step / mean
sentence-transformers step). When kdkit is slower, ``cProfile`` runs each side alone. After
training, each student is scored on SciFact test (300 queries, the whole corpus at 256 tokens)
with its own tool's ``encode`` and an exact search (``kdkit.retrieval_metrics``).

``--equal-time`` (~45 min on 2 cores in fp32; ``peers.md``, section "equal training time"): kdkit's recipe
``experiment=scifact_minilm_sentences`` through ``kdkit.pipeline.run``, then the best
sentence-transformers recipe built here for the same texts (passages, queries and 2 sentences per
passage), targets, loss (1 - cos: ``EmbedDistillLoss(distance_metric="cosine")``), dropout 0,
batches grouped by length (a batch-sampler callable, its documented extension point) and precision,
trained for as many steps as fit kdkit's measured training time (its step time measured first).

    python benchmarks/peers.py st --quick
    python benchmarks/peers.py st --equal-time --threads 2 --precision bf16-mixed

Last line (``--quick``): ``st_step_ratio=X`` = kdkit step / sentence-transformers step.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib.metadata as md
import os
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import RESULTS, header  # noqa: E402
from benchmarks.overhead import make_trainer  # noqa: E402
from benchmarks.peers import ProfileFrom, block_ratios, profile_report  # noqa: E402
from kdkit.datamodules.beir import BEIRDataModule  # noqa: E402
from kdkit.distillers.embed import Embed  # noqa: E402
from kdkit.models.text import from_teacher_layers, sentence_encoder  # noqa: E402
from kdkit.models.text_layers import set_dropout  # noqa: E402
from kdkit.optim import warmup_cosine  # noqa: E402
from kdkit.retrieval_metrics import retrieval_metrics  # noqa: E402
from kdkit.tasks.retrieval import RetrievalTask  # noqa: E402
from kdkit.tasks.retrieval_table import build_teacher_table  # noqa: E402

LAYERS, LR, WD, WARMUP, BATCH, TRAIN_LEN, TARGET_LEN = (0, 5), 5e-4, 0.01, 0.05, 32, 128, 128
SIDES = ("kdkit", "st")


# ---------------------------------------------------------------- shared work


def shared_work(args, sentences: int = 0, group_by_length: bool = False):
    """The datamodule (text stream), the teacher, its table (cached) and the untrained student."""
    dm = BEIRDataModule(name="scifact", data_dir=args.data_dir, cache_dir=args.cache_dir, stream="text",
                        batch_size=BATCH, max_length=TRAIN_LEN, target_max_length=TARGET_LEN,
                        corpus_sentences=sentences, group_by_length=group_by_length, seed=0)
    dm.setup("fit")
    teacher = sentence_encoder()
    table = build_teacher_table(teacher, dm.static_pool())  # encoded once, then read from the cache
    torch.manual_seed(0)
    student = from_teacher_layers(None, list(LAYERS))  # max length 256 (the teacher's): evaluation
    return dm, teacher, table, student


def st_model(student, folder: Path, dropout: float | None = None):
    """The same weights as sentence-transformers' model: kdkit's export of ``student``, loaded."""
    from sentence_transformers import SentenceTransformer

    student.save_pretrained(folder)
    model = SentenceTransformer(str(folder), device="cpu")
    if dropout is not None:
        set_dropout(model[0].auto_model, dropout)  # kdkit's student.model.dropout
    probe = ["Vitamin D deficiency is linked to bone loss.", "A short query"]
    gap = (torch.from_numpy(model.encode(probe)) - student.encode(probe)).abs().max().item()
    if gap > 1e-5:
        raise SystemExit(f"the sentence-transformers copy differs from kdkit's student by {gap:.2e}")
    model.max_seq_length = TRAIN_LEN  # training length (kdkit's data.max_length); 256 to evaluate
    return model


def st_dataset(dm, table):
    """kdkit's text stream as sentence-transformers' distillation dataset: (text, label = target)."""
    from datasets import Dataset

    stream = dm.train_set
    rows = table.rows[torch.as_tensor(stream.pool if stream.pool is not None else range(len(stream)))]
    return Dataset.from_dict({"text": list(stream.texts), "label": rows.tolist()})


def kdkit_task(student, teacher, loss: str = "mse", fused: bool = True) -> RetrievalTask:
    """As ``experiment=scifact_minilm`` builds it (``task.optimizer.fused: true``: torch's fused
    AdamW kernel, which the transformers Trainer picks too); ``fused=False``: torch's own default
    on the CPU, one tensor at a time."""
    weight = 1.0 / student.dim if loss == "mse" else 1.0  # sum over D -> mean over D (MSELoss)
    extra = {"fused": bool(fused)}
    return RetrievalTask(student, teacher, distillers={"embed": Embed(weight=weight, loss=loss)},
                         optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=WD, **extra),
                         scheduler=partial(warmup_cosine, warmup_frac=WARMUP))


def st_trainer(model, dataset, steps: int, out: str, callbacks=(), loss: str = "mse", bf16: bool = False,
               batch_sampler=None):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss, MSELoss

    extra = {"batch_sampler": batch_sampler} if batch_sampler is not None else {}
    args = SentenceTransformerTrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR, weight_decay=WD,
        lr_scheduler_type="cosine", warmup_steps=int(WARMUP * steps),  # kdkit: int(warmup_frac * total)
        max_grad_norm=0.0,  # kdkit's trainer clips nothing (gradient_clip_val: null)
        dataloader_drop_last=True, seed=0, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=True, bf16=bf16, **extra)
    objective = MSELoss(model) if loss == "mse" else EmbedDistillLoss(model, distance_metric="cosine")
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=objective,
                                      callbacks=list(callbacks))


@torch.no_grad()
def test_metrics(dm, encode) -> dict:
    """SciFact test metrics of ``encode(texts) -> [N, D]``: the whole corpus, exact search."""
    docs, query_ids, qrels = dm.eval_layout("test")
    queries = encode([dm.data.queries[q] for q in query_ids])
    return retrieval_metrics(queries, encode(dm.data.doc_texts), query_ids, docs, qrels)


def st_encoder(model, max_length: int = 256):
    def encode(texts):
        model.max_seq_length = max_length
        return torch.from_numpy(model.encode(list(texts)))
    return encode


# ------------------------------------------------------------------ timing


class Turns:
    """Two training loops in two threads of one process, taking turns by blocks of steps (one
    runs while the other waits), timing each step of each side.

    A side's step time runs from the end of its previous step, or from its resumption, to the end
    of this step, so the other side's block never counts. Both sides wait for each other before
    their first step: their start-up (data loaders, optimisers) is not timed.
    """

    def __init__(self, block: int):
        self.block = block
        self.cond = threading.Condition()
        self.ready = threading.Barrier(2)
        self.turn, self.finished = SIDES[0], set()
        self.times: dict[str, list[float]] = {s: [] for s in SIDES}
        self.mark: dict[str, float] = {}

    def begin(self, side: str) -> None:
        self.ready.wait()
        with self.cond:
            self.cond.wait_for(lambda: self.turn == side or self._other(side) in self.finished)
        self.mark[side] = time.perf_counter()

    def step_end(self, side: str) -> None:
        self.times[side].append(time.perf_counter() - self.mark[side])
        if len(self.times[side]) % self.block == 0:
            with self.cond:
                other = self._other(side)
                if other not in self.finished:
                    self.turn = other
                    self.cond.notify_all()
                    self.cond.wait_for(lambda: self.turn == side or other in self.finished)
        self.mark[side] = time.perf_counter()

    def end(self, side: str) -> None:
        with self.cond:
            self.finished.add(side)
            self.turn = self._other(side)
            self.cond.notify_all()
        self.ready.abort()  # a side that failed before its first step must not hold the other

    @staticmethod
    def _other(side: str) -> str:
        return SIDES[1 - SIDES.index(side)]


class KdkitTurn(L.Callback):
    def __init__(self, turns: Turns):
        self.turns = turns

    def on_train_start(self, trainer, task):
        self.turns.begin("kdkit")

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
        self.turns.step_end("kdkit")


def st_turn(turns: Turns):
    from transformers import TrainerCallback

    class StTurn(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            turns.begin("st")

        def on_step_end(self, args, state, control, **kwargs):
            turns.step_end("st")

    return StTurn()


def st_profile_from(prof: cProfile.Profile, warm: int):
    from transformers import TrainerCallback

    class ProfileSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warm:
                prof.enable()

        def on_train_end(self, args, state, control, **kwargs):
            prof.disable()

    return ProfileSteps()


def profile_sides(dm, teacher, table, student, steps: int, tmp: Path, warm: int = 3, fused: bool = False) -> str:
    """cProfile of each side alone for ``steps`` steady-state steps: where the time goes."""
    out = []
    prof = cProfile.Profile()
    make_trainer(max_steps=warm + steps, callbacks=[ProfileFrom(prof, warm)]).fit(
        kdkit_task(copy.deepcopy(student), teacher, fused=fused), datamodule=dm)
    out.append(profile_report(prof, "kdkit", steps, r"kdkit|lightning"))
    prof = cProfile.Profile()
    model = st_model(copy.deepcopy(student), tmp / "profile-init")
    st_trainer(model, st_dataset(dm, table), warm + steps, str(tmp / "profile-st"),
               [st_profile_from(prof, warm)]).train()
    out.append(profile_report(prof, "sentence-transformers", steps, r"sentence_transformers|transformers|accelerate"))
    return "\n".join(out)


def versions() -> str:
    return ", ".join(f"{p} {md.version(p)}" for p in ("torch", "lightning", "transformers", "sentence-transformers",
                                                      "datasets", "accelerate"))


def step_time(args) -> float:
    dm, teacher, table, student = shared_work(args)
    steps = args.rounds * args.block
    with tempfile.TemporaryDirectory(prefix="kdkit-peers-st-") as tmp:
        tmp = Path(tmp)
        model = st_model(copy.deepcopy(student), tmp / "init")
        turns = Turns(args.block)
        trainer_st = st_trainer(model, st_dataset(dm, table), steps, str(tmp / "st"), [st_turn(turns)])
        failure: list[BaseException] = []

        def run_st():
            try:
                trainer_st.train()
            except BaseException as exc:  # re-raised in the main thread
                failure.append(exc)
            finally:
                turns.end("st")

        thread = threading.Thread(target=run_st, name="sentence-transformers", daemon=True)
        task = kdkit_task(copy.deepcopy(student), teacher, fused=args.fused)
        thread.start()
        try:
            make_trainer(max_steps=steps, callbacks=[KdkitTurn(turns)]).fit(task, datamodule=dm)
        finally:
            turns.end("kdkit")
            thread.join()
        if failure:
            raise failure[0]
        kd, st = (turns.times[s][args.warmup * args.block:] for s in SIDES)
        ratios = block_ratios(turns.times["kdkit"], turns.times["st"], args.block, args.warmup)
        ratio = statistics.median(ratios)
        print(f"trained {len(turns.times['kdkit'])} + {len(turns.times['st'])} steps; evaluating", flush=True)
        scores = {"kdkit": test_metrics(dm, task.student.encode), "st": test_metrics(dm, st_encoder(model))}
        lines = [
            f"- versions: {versions()}",
            f"- work: all-MiniLM-L6-v2 layers {list(LAYERS)} -> 2-layer student (one init; sentence-transformers "
            f"loads kdkit's export of it), SciFact text stream ({len(dm.train_set)} texts: corpus passages + train "
            f"queries) at {TRAIN_LEN} tokens, teacher targets at {TARGET_LEN} tokens (one cached table), "
            f"batch {BATCH}, "
            f"MSE to the teacher embedding, AdamW lr {LR} wd {WD}, {WARMUP:.0%} warm-up + cosine over {steps} steps, "
            f"no clipping, fp32; {torch.get_num_threads()} thread(s)",
            f"- timing: {len(ratios)} alternating block pairs of {args.block} steps after {args.warmup} warm-up "
            f"pairs ({len(kd)} + {len(st)} timed steps)",
            "- optimiser kernels: sentence-transformers' Trainer uses torch's fused AdamW by default; kdkit's "
            + ("retrieval config too (`task.optimizer.fused: true`)" if args.fused else
               "AdamW here with `fused=false` (`--single-tensor`: torch's CPU default, one tensor at a time)"),
            "",
            "| side | median step (ms) | mean (ms) | min (ms) | SciFact test nDCG@10 | R@100 |",
            "|---|---|---|---|---|---|",
        ]
        kd_label = "kdkit (Lightning, RetrievalTask + embed mse" + (")" if args.fused else ", single-tensor AdamW)")
        for side, label, times in (("kdkit", kd_label, kd),
                                   ("st", "sentence-transformers (SentenceTransformerTrainer + MSELoss)", st)):
            lines.append(f"| {label} | {1e3 * statistics.median(times):.0f} | {1e3 * statistics.fmean(times):.0f} | "
                         f"{1e3 * min(times):.0f} | {scores[side]['ndcg@10']:.4f} | {scores[side]['recall@100']:.4f} |")
        lines += ["", f"Ratio kdkit / sentence-transformers, median over block pairs: **{ratio:.3f}** "
                      f"(block ratios min {min(ratios):.3f}, max {max(ratios):.3f}; gap of medians "
                      f"{1e3 * (statistics.median(kd) - statistics.median(st)):+.1f} ms/step). nDCG@10 after "
                      f"{steps} steps each: each tool's own encode at 256 tokens, exact search; the two differ "
                      "in batch order and dropout draws, not in the work."]
        if ratio > 1.0 + args.profile_above or args.profile:
            lines += ["", "### Where the time goes (cProfile, each side alone)", "",
                      profile_sides(dm, teacher, table, student, args.profile_steps, tmp, fused=args.fused)]
    print("\n".join(lines))
    title = "kdkit vs sentence-transformers: step time (SciFact distillation)"
    title += "" if args.fused else ", kdkit single-tensor AdamW"
    write_section(args.out, "step" if args.fused else "step-single-tensor", "#" + header(title)
                  + "\n".join(lines) + "\n\n" + EQUAL_TIME_NOTE)
    return ratio


EQUAL_TIME_NOTE = ("Equal training time, kdkit's best recipe against the best sentence-transformers recipe built "
                   "for the same work: the section \"equal training time\" "
                   "(`python benchmarks/peers.py st --equal-time --threads 2`, ~50 min on 2 cores; "
                   "add `--precision bf16-mixed` on AMX CPUs).\n")


# -------------------------------------------------------------- equal time


def grouped_batches(lengths):
    """A sentence-transformers ``batch_sampler`` callable: kdkit's length-grouped batches
    (``LengthGroupedBatchSampler`` over a per-epoch shuffle) for its trainer."""
    from kdkit.datamodules.length_grouping import LengthGroupedBatchSampler
    from kdkit.sampling import EpochShuffleSampler

    def build(dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        return LengthGroupedBatchSampler(EpochShuffleSampler(dataset, seed=seed), batch_size, drop_last,
                                         lengths=lengths, seed=seed)
    return build


def equal_time(args) -> float:
    from kdkit.compose import compose
    from kdkit.pipeline import run

    # first: the teacher's table (sentences included) into the cache, so kdkit's measured training
    # time reads it as a repeated run does instead of encoding 10k sentences inside its fit
    dm, _, table, student = shared_work(args, sentences=2, group_by_length=True)
    out = Path(args.runs) / "kdkit_recipe"
    over = ["experiment=scifact_minilm_sentences", "stages.teacher=false", "callbacks=none",
            "trainer.enable_progress_bar=false", f"trainer.precision={args.precision}",
            f"paths.cache_dir={args.cache_dir}", *([f"data.data_dir={args.data_dir}"] if args.data_dir else []),
            *args.kdkit_extra]
    start = time.perf_counter()
    kd = run(compose(over, output_dir=str(out)))["student"]
    kd_wall = time.perf_counter() - start
    budget = float(kd["fit_seconds"])
    lengths = [len(ids) for ids in student.tokenizer(list(dm.train_set.texts), truncation=True,
                                                     max_length=TRAIN_LEN)["input_ids"]]
    bf16 = args.precision.startswith("bf16")
    dataset = st_dataset(dm, table)
    with tempfile.TemporaryDirectory(prefix="kdkit-peers-st-") as tmp:
        tmp = Path(tmp)
        # the step time of this recipe, measured on a throwaway copy, sets the step count
        probe = Turns(10**9)  # one side only: never hands over
        probe.ready, probe.turn = threading.Barrier(1), "st"
        st_trainer(st_model(copy.deepcopy(student), tmp / "probe", dropout=0.0), dataset, args.calibrate_steps,
                   str(tmp / "probe-st"), [st_turn(probe)], loss="cosine", bf16=bf16,
                   batch_sampler=grouped_batches(lengths)).train()
        per_step = statistics.fmean(probe.times["st"][3:])  # a mean: grouped batches vary in length
        steps = max(1, int(budget / per_step))
        model = st_model(copy.deepcopy(student), tmp / "init", dropout=0.0)
        start = time.perf_counter()
        st_trainer(model, dataset, steps, str(tmp / "st"), loss="cosine", bf16=bf16,
                   batch_sampler=grouped_batches(lengths)).train()
        st_fit = time.perf_counter() - start
        st_scores = test_metrics(dm, st_encoder(model))
    lines = [
        f"- versions: {versions()}; {torch.get_num_threads()} thread(s), precision {args.precision}",
        "- work: SciFact passages + train queries + 2 sentences per passage at 128 tokens, teacher targets at "
        "128 tokens, 1 - cos, dropout 0, batches of 32 grouped by length, AdamW lr 5e-4, 5% warm-up + cosine",
        f"- sentence-transformers steps: {steps} = kdkit's training time / its measured step time "
        f"({per_step:.3f} s, mean of {args.calibrate_steps - 3} steps)",
        "",
        "| side | steps | train time (min) | SciFact test nDCG@10 | R@100 |",
        "|---|---|---|---|---|",
        f"| kdkit `experiment=scifact_minilm_sentences` | {kd.get('fit_steps', '-')} | {budget / 60:.1f} | "
        f"{kd['test/ndcg@10']:.4f} | {kd['test/recall@100']:.4f} |",
        f"| sentence-transformers, same recipe | {steps} | {st_fit / 60:.1f} | {st_scores['ndcg@10']:.4f} | "
        f"{st_scores['recall@100']:.4f} |",
        "", f"kdkit stage wall time (setup, training, evaluation, export): {kd_wall / 60:.1f} min.",
    ]
    print("\n".join(lines))
    write_section(args.out, "equal-time", "#" + header("kdkit vs sentence-transformers: equal training time")
                  + "\n".join(lines) + "\n")
    return st_fit / budget


# ------------------------------------------------------------- results file


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- sentence-transformers {key}: begin -->", f"<!-- sentence-transformers {key}: end -->"


def write_section(name: str, key: str, text: str) -> Path:
    """Put ``text`` into ``benchmarks/results/<name>`` between the section ``key``'s markers,
    replacing that section if there is one, else appending it (the file's other sections stay)."""
    path = RESULTS / name
    old = path.read_text() if path.exists() else ""
    begin, end = _markers(key)
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):].lstrip("\n")
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "") + block
    path.write_text(new)
    print(f"wrote {path}")
    return path


def kept_sections(name: str) -> str:
    """The sentence-transformers sections of ``benchmarks/results/<name>``, for a script that
    rewrites the rest of the file (``peers.py``'s torchdistill part)."""
    import re

    path = RESULTS / name
    old = path.read_text() if path.exists() else ""
    begin, end = (re.escape(m).replace("KEY", r"\S+") for m in _markers("KEY"))
    return "".join(f"\n{m.group(0)}\n" for m in re.finditer(f"{begin}.*?{end}", old, flags=re.S))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="step time (the default mode)")
    p.add_argument("--equal-time", action="store_true", help="best recipes at equal training time instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=16, help="alternating block pairs")
    p.add_argument("--block", type=int, default=4, help="steps per block")
    p.add_argument("--warmup", type=int, default=2, help="block pairs left out at the start")
    p.add_argument("--profile", action="store_true", help="profile even when kdkit is not slower")
    p.add_argument("--profile-above", type=float, default=0.02, help="profile when the ratio exceeds 1 + this")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--single-tensor", action="store_true",
                   help="kdkit's AdamW with fused=false (torch's CPU default; kdkit's config and the Trainer fuse)")
    p.add_argument("--precision", default="32-true", help="--equal-time: kdkit's trainer.precision")
    p.add_argument("--calibrate-steps", type=int, default=60, help="--equal-time: timed ST steps")
    p.add_argument("--runs", default="benchmarks/runs/peers_st", help="--equal-time: kdkit's run folder")
    p.add_argument("--kdkit-extra", nargs="*", default=[], help="--equal-time: more Hydra overrides for kdkit's run")
    p.add_argument("--data-dir", default=os.environ.get("KDKIT_DATA_DIR"))
    p.add_argument("--cache-dir", default=os.environ.get("KDKIT_CACHE_DIR", os.path.expanduser("~/.cache/kdkit")))
    p.add_argument("--out", default="peers.md")
    args = p.parse_args(argv)
    args.fused = not args.single_tensor
    torch.set_num_threads(args.threads)
    if args.equal_time:
        print(f"st_time_ratio={equal_time(args):.3f}")
    else:
        print(f"st_step_ratio={step_time(args):.3f}")


if __name__ == "__main__":
    main()
