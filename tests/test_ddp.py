"""DDP with a frozen teacher, on 2 CPU processes (gloo), through Lightning and the CLI.

In process: two ranks started here (``LOCAL_RANK`` set, so Lightning's ``ddp`` strategy does not
relaunch pytest) train a task with the shipped ``trainer=ddp`` config and test it:
the teacher is outside DDP, an adapter used on every other step does not trip the
unused-parameter check, and metrics over an eval set of odd size equal the 1-process ones.
Slow: ``kdkit-train trainer=ddp trainer.devices=2`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

from kdkit.cache import build_teacher_cache
from kdkit.compose import compose
from kdkit.distillers.base import Distiller
from kdkit.distillers.fitnet import FitNet
from kdkit.distillers.kd import KD
from kdkit.distributed import FixedShardSampler, eval_sampler
from kdkit.tasks.classification import ClassificationTask
from tests.conftest import SMOKE
from tests.helpers import BNNet, TinyNet
from tests.test_cache import TinyImages, cache_cfg

WORLD = 2
N_TRAIN, N_EVAL = 32, 25  # an odd eval set: a padded sampler would score 26 samples


class EvalShardedImages(TinyImages):
    """TinyImages whose eval loaders use ``kdkit.distributed.eval_sampler`` (``padded=True``:
    Lightning's default sampler, which repeats samples to even out the shards)."""

    def __init__(self, padded: bool = False, **kwargs):
        super().__init__(n=N_TRAIN, n_eval=N_EVAL, **kwargs)
        self.padded = padded

    def _eval_loader(self):
        self.setup()
        sampler = None if self.padded else eval_sampler(self.test_set)
        return DataLoader(self.test_set, batch_size=4, sampler=sampler)

    def val_dataloader(self):
        return self._eval_loader()

    def test_dataloader(self):
        return self._eval_loader()


class AlternateAdapter(Distiller):
    """Regresses teacher logits from student logits through its adapter on odd calls only (as a
    term switched on by a schedule would): the adapter has no gradient on every other step."""

    def __init__(self):
        super().__init__(weight=0.1)
        self.calls = 0

    def build(self, student, teacher, context):
        self.proj = nn.Linear(student.logits.shape[1], teacher.logits.shape[1])

    def forward(self, student, teacher, batch):
        self.calls += 1
        s = self.proj(student.logits) if self.calls % 2 else student.logits
        return {"loss": F.mse_loss(s, teacher.logits)}


class Probe(L.Callback):
    """Records, on each rank, what DDP wraps and what each rank evaluates."""

    def __init__(self):
        self.facts = {"test_samples": 0}

    def on_train_start(self, trainer, task):
        ddp = trainer.strategy.model
        synced = {p.data_ptr() for p in ddp.parameters()} | {b.data_ptr() for b in ddp.buffers()}
        teacher = [x for t in task.teachers.values() for x in [*t.model.parameters(), *t.model.buffers()]]
        self.facts.update(
            wrapper=type(ddp).__name__,
            teacher_tensors_in_ddp=sum(t.data_ptr() in synced for t in teacher),
            ddp_parameters=sorted(n for n, _ in ddp.module.named_parameters()),
        )

    def on_test_batch_end(self, trainer, task, outputs, batch, batch_idx, dataloader_idx=0):
        self.facts["test_samples"] += len(batch["index"])


def make_task(teacher, cache=None):
    torch.manual_seed(0)
    distillers = {"kd": KD(temperature=2.0), "alternate": AlternateAdapter(),
                  "fitnet": FitNet(weight=1.0, student_feature="conv", teacher_feature="conv")}
    return ClassificationTask(TinyNet(width=4), teacher, distillers=distillers, num_classes=3,
                              mean=(0.5,), std=(0.25,), teacher_cache=cache,
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def shipped_ddp_trainer(callbacks, **overrides):
    """``trainer=ddp`` exactly as kdkit-train builds it, on the CPU."""
    cfg = compose(["trainer=ddp", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"])
    return instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=callbacks,
                       **overrides)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank),
                      NODE_RANK="0", WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    torch.manual_seed(1)
    teacher = BNNet(width=8)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = make_task(teacher)
    probe = Probe()
    shipped_ddp_trainer([probe], max_epochs=2, limit_val_batches=0).fit(task, datamodule=EvalShardedImages())
    facts = dict(probe.facts)
    after = teacher.state_dict()
    facts["teacher_unchanged"] = all(torch.equal(v, after[k]) for k, v in teacher_before.items())
    facts["alternate_calls"] = task.distillers["alternate"].calls
    student = torch.cat([p.detach().flatten() for p in task.student.parameters()])
    everyone = [torch.empty_like(student) for _ in range(WORLD)]
    dist.all_gather(everyone, student)
    facts["students_equal_across_ranks"] = all(torch.equal(everyone[0], s) for s in everyone)
    for padded in (False, True):
        probe = Probe()
        metrics = shipped_ddp_trainer([probe]).test(task, datamodule=EvalShardedImages(padded=padded),
                                                    verbose=False)[0]
        facts[f"padded={padded}"] = {"acc": metrics["test/acc"], "samples": probe.facts["test_samples"]}
    if rank == 0:
        torch.save(task.student.state_dict(), Path(out) / "student.pt")
    for name in ("reshuffled", "fixed"):
        teacher = TinyNet(width=8)
        calls = []
        teacher.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        datamodule = EvalShardedImages()
        cache = build_teacher_cache(cache_cfg(Path(out) / name, cache="disk"), teacher, datamodule)
        datamodule.fixed_shards = name == "fixed"  # reshuffled: Lightning's DistributedSampler
        task = make_task(teacher, cache)
        shipped_ddp_trainer([], max_epochs=3, limit_val_batches=0).fit(task, datamodule=datamodule)
        facts[f"cache_{name}"] = {"forwards": len(calls), "hits": cache.hits, "path": str(cache.path),
                                  "rows": cache._rows.filled.nonzero()[0].tolist()}
    facts["two_teachers"] = two_teachers_under_ddp()
    facts["batch_select"] = batch_select_under_ddp()
    facts["labeled_share"] = labeled_share_under_ddp()
    facts["teacher_budget"] = teacher_budget_under_ddp(Path(out))
    facts["crd_banks"] = crd_banks_under_ddp()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(facts))


def two_teachers_under_ddp() -> dict:
    """Two frozen teachers (an ensemble over both, KD on one): both outside DDP, both unchanged."""
    from kdkit.distillers.ensemble_kd import EnsembleKD

    torch.manual_seed(2)
    teachers = {"a": BNNet(width=8), "b": BNNet(width=6)}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in teachers.items()}
    task = ClassificationTask(TinyNet(width=4), teachers=teachers,
                              distillers={"ens": EnsembleKD(), "kd": KD(temperature=2.0).reading("b")},
                              num_classes=3, mean=(0.5,), std=(0.25,),
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    probe = Probe()
    shipped_ddp_trainer([probe], max_epochs=2, limit_val_batches=0).fit(task, datamodule=EvalShardedImages())
    student = torch.cat([p.detach().flatten() for p in task.student.parameters()])
    everyone = [torch.empty_like(student) for _ in range(WORLD)]
    dist.all_gather(everyone, student)
    return {"teacher_tensors_in_ddp": probe.facts["teacher_tensors_in_ddp"],
            "ddp_parameters": probe.facts["ddp_parameters"],
            "unchanged": all(torch.equal(v, teachers[n].state_dict()[k]) for n, s in before.items()
                             for k, v in s.items()),
            "students_equal_across_ranks": all(torch.equal(everyone[0], s) for s in everyone)}


def crd_banks_under_ddp() -> dict:
    """CRD under DDP, each rank building its banks from its own random state: what DDP syncs,
    and the banks of every rank after training."""
    from kdkit.distillers.crd import CRD

    class Buffers(L.Callback):
        def on_train_start(self, trainer, task):
            self.ddp_buffers = {b.data_ptr() for b in trainer.strategy.model.modules_buffers}
            crd = task.distillers["crd"]
            self.banks = {n: getattr(crd, n).data_ptr() for n in ("memory_s", "memory_t", "z")}
            self.ignored = list(task._ddp_params_and_buffers_to_ignore)
            self.at_start = crd.memory_s.clone()

    rank = dist.get_rank()
    torch.manual_seed(4)
    task = ClassificationTask(BNNet(width=4), BNNet(width=8), distillers={"crd": CRD(feat_dim=4, nce_k=8)},
                              num_classes=3, mean=(0.5,), std=(0.25,),
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    torch.manual_seed(100 + rank)  # the banks are drawn in setup(): a different draw on each rank
    probe = Buffers()
    shipped_ddp_trainer([probe], max_epochs=2, limit_val_batches=0).fit(task, datamodule=EvalShardedImages())
    crd = task.distillers["crd"]
    banks = torch.cat([crd.memory_s.flatten(), crd.memory_t.flatten(), crd.z])
    everyone = [torch.empty_like(banks) for _ in range(WORLD)]
    dist.all_gather(everyone, banks)
    return {"ignored": probe.ignored, "banks_synced_by_ddp": sorted(n for n, p in probe.banks.items()
                                                                      if p in probe.ddp_buffers),
            "ddp_buffer_count": len(probe.ddp_buffers),
            "banks_equal_across_ranks": all(torch.equal(everyone[0], b) for b in everyone),
            "banks_moved": not torch.equal(probe.at_start, crd.memory_s)}


def batch_select_task(policy) -> ClassificationTask:
    torch.manual_seed(3)
    return ClassificationTask(TinyNet(width=4), BNNet(width=8), distillers={"kd": KD()}, num_classes=3,
                              mean=(0.5,), std=(0.25,), selection={"batch_select": policy},
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def batch_select_under_ddp() -> dict:
    """Teacher-scored batch selection with global scores: the rows each rank trained on."""
    from kdkit.selection.batch_select import BatchSelect

    class Recorded(BatchSelect):
        def plan(self, task, plan):
            planned = super().plan(task, plan)
            self.seen = [*getattr(self, "seen", []), plan.batch["index"].tolist()]
            self.kept = [*getattr(self, "kept", []), planned.batch["index"].tolist()]
            return planned

    policy = Recorded(keep=0.5, score="learnability")
    task = batch_select_task(policy)
    shipped_ddp_trainer([], max_epochs=1, limit_val_batches=0).fit(task, datamodule=EvalShardedImages())
    student = torch.cat([p.detach().flatten() for p in task.student.parameters()])
    everyone = [torch.empty_like(student) for _ in range(WORLD)]
    dist.all_gather(everyone, student)
    summary = {k.rsplit("/", 1)[-1]: v for k, v in task.fit_summary().items()}
    return {"seen": policy.seen, "kept": policy.kept, "summary": summary,
            "students_equal_across_ranks": all(torch.equal(everyone[0], s) for s in everyone)}


class BatchRecorder(L.Callback):
    """The rows (``index``) and labels of every training batch a rank trains on."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, task, batch, batch_idx):
        self.batches.append({"index": batch["index"].tolist(), "label": batch["label"].tolist()})


def labeled_share_under_ddp() -> dict:
    """Transfer digits with 4 labelled rows per batch of 16, trained through Lightning's DDP: the
    sampler Lightning kept and the batches each rank trained on."""
    from kdkit.datamodules.digits import DigitsDataModule

    dm = DigitsDataModule(labeled_count=100, labeled_per_batch=4, batch_size=16, seed=5)
    dm.setup("fit")
    dm.use_train_view("transfer")
    torch.manual_seed(4)
    task = ClassificationTask(TinyNet(width=4, num_classes=10), TinyNet(width=8, num_classes=10),
                              distillers={"kd": KD()}, num_classes=10, mean=(0.5,), std=(0.25,),
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    recorder = BatchRecorder()
    trainer = shipped_ddp_trainer([recorder], max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    return {"sampler": type(trainer.train_dataloader.sampler).__name__, "batches": recorder.batches,
            "hidden": [bool(h) for h in dm.plain_train_view.hidden]}


class TeacherRows(L.Callback):
    """Rows this rank's teacher ran on during training steps (``count`` is its forward hook)."""

    def __init__(self):
        self.rows, self.on = 0, False

    def count(self, module, inputs, output):
        self.rows += output.shape[0] if self.on else 0

    def on_train_batch_start(self, *args):
        self.on = True

    def on_train_batch_end(self, *args):
        self.on = False


def budget_data():
    from kdkit.datamodules.digits import DigitsDataModule

    dm = DigitsDataModule(labeled_fraction=0.2, batch_size=32, seed=5)
    dm.setup("fit")
    dm.use_train_view("transfer")
    return dm


def budget_task(policy=None, rows: TeacherRows | None = None) -> ClassificationTask:
    from kdkit.selection.teacher_budget import TeacherBudget

    torch.manual_seed(6)
    student, teacher = TinyNet(width=4, num_classes=10), TinyNet(width=8, num_classes=10)
    if rows is not None:
        teacher.register_forward_hook(rows.count)
    return ClassificationTask(student, teacher,
                              distillers={"kd": KD()}, num_classes=10, mean=(0.5,), std=(0.25,),
                              selection={"teacher_budget": policy or TeacherBudget()},
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def teacher_budget_under_ddp(out: Path) -> dict:
    """A 30% teacher budget bought in two rounds (random, then the student's uncertainty) under
    DDP: what each rank bought and ranked by, its teacher's rows, the job's reported count, and a
    checkpoint; rank 0 keeps the student weights the second round ranked with."""
    from kdkit.selection.teacher_budget import TeacherBudget

    class Recorded(TeacherBudget):
        def scores(self, task, pool, first_round):
            scores = super().scores(task, pool, first_round)
            if not first_round:
                self.ranked, self.before = scores.tolist(), self.bought.tolist()
                self.weights = {k: v.detach().clone() for k, v in task.student.state_dict().items()}
            return scores

    policy, rows = Recorded(fraction=0.3, order="uncertainty", rounds=2), TeacherRows()
    task = budget_task(policy, rows)
    trainer = shipped_ddp_trainer([rows], max_epochs=2, limit_val_batches=0)
    trainer.fit(task, datamodule=budget_data())
    trainer.save_checkpoint(out / "budget.ckpt")  # every rank takes part, rank 0 writes
    if dist.get_rank() == 0:
        torch.save(policy.weights, out / "budget_student.pt")
    summary = task.fit_summary()
    return {"bought": policy.bought.tolist(), "before": policy.before, "ranked": policy.ranked,
            "teacher_rows": rows.rows, "teacher_forwards": summary["selection/teacher_budget/teacher_forwards"],
            "samples_bought": summary["selection/teacher_budget/samples_bought"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)], out


@pytest.mark.ddp
def test_teacher_is_outside_ddp_and_adapters_train(ranks):
    facts, _ = ranks
    for rank in facts:
        assert rank["wrapper"] == "DistributedDataParallel"
        assert rank["teacher_tensors_in_ddp"] == 0  # no teacher parameter or buffer is synced
        params = rank["ddp_parameters"]
        assert not any(n.startswith("teacher") or "_teacher" in n for n in params)
        assert {"distillers.alternate.proj.weight", "distillers.fitnet.adapter.conv.weight"} <= set(params)
        assert rank["teacher_unchanged"]  # weights and BN statistics untouched by training
        assert rank["alternate_calls"] == 4  # 2 epochs x 2 steps per rank: unused on steps 2, 4
        assert rank["students_equal_across_ranks"]  # gradients were synchronised


@pytest.mark.ddp
def test_several_teachers_stay_outside_ddp_and_frozen(ranks):
    facts, _ = ranks
    for rank in facts:
        two = rank["two_teachers"]
        assert two["teacher_tensors_in_ddp"] == 0 and two["unchanged"] and two["students_equal_across_ranks"]
        assert all(n.startswith("student.") for n in two["ddp_parameters"])  # no teacher, no adapter here


@pytest.mark.ddp
def test_eval_on_odd_set_counts_every_sample_once_and_equals_one_process(ranks):
    facts, out = ranks
    exact = [rank["padded=False"] for rank in facts]
    assert sum(r["samples"] for r in exact) == N_EVAL  # 13 + 12, nothing repeated
    assert exact[0]["acc"] == exact[1]["acc"]  # reduced over ranks
    padded = [rank["padded=True"] for rank in facts]
    assert sum(r["samples"] for r in padded) == N_EVAL + 1  # Lightning's default repeats one

    torch.manual_seed(1)
    task = make_task(BNNet(width=8))
    task.build(EvalShardedImages().example_batch(), N_TRAIN, 3)
    task.student.load_state_dict(torch.load(out / "student.pt"))
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False).test(task, datamodule=EvalShardedImages(), verbose=False)[0]
    assert exact[0]["acc"] == one["test/acc"]
    correct = round(one["test/acc"] * N_EVAL)
    assert 0 < correct < N_EVAL  # so that the repeated sample shows
    assert padded[0]["acc"] != one["test/acc"]


@pytest.mark.ddp
def test_each_rank_caches_its_shard_and_fixed_shards_fill_in_one_epoch(ranks):
    facts, out = ranks
    for rank, shard in enumerate(facts):
        fixed, reshuffled = shard["cache_fixed"], shard["cache_reshuffled"]
        assert fixed["path"].endswith(f"rank{rank}-of-{WORLD}")  # one set of files per rank
        assert fixed["rows"] == list(range(rank, N_TRAIN, WORLD))  # exactly its own shard
        # 3 epochs x 2 steps: the probe + epoch 1 run the teacher, epochs 2 and 3 read the cache
        assert (fixed["forwards"], fixed["hits"]) == (1 + 2, 4)
        # reshuffled shards: a rank meets new samples every epoch, whole batches rarely hit
        assert reshuffled["hits"] < fixed["hits"] and reshuffled["forwards"] > fixed["forwards"]
        assert len(reshuffled["rows"]) > N_TRAIN // WORLD


def test_fixed_shard_sampler_keeps_each_rank_shard():
    data = list(range(11))
    epochs = []
    for epoch in range(3):
        shards = []
        for rank in range(WORLD):
            sampler = FixedShardSampler(data, seed=5, num_replicas=WORLD, rank=rank)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert len(shards[0]) == len(shards[1]) == 6  # padded to equal length
        assert set(shards[0]) == set(range(0, 11, 2)) and set(shards[1]) == set(range(1, 11, 2)) | {0}
        epochs.append(shards[0])
    assert epochs[0] != epochs[1]  # a new order every epoch, same shard


# ---- the command line ----------------------------------------------------------------------
def run_cli(tmp_path, *overrides, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    cmd = [sys.executable, "-m", "kdkit.train", f"paths.log_dir={tmp_path}/outputs", *SMOKE, *overrides]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.ddp
def test_cli_ddp_two_processes_one_output_dir(tmp_path):
    """``kdkit-train trainer=ddp trainer.devices=2``: rank 0 writes results; ranks share the dir."""
    run_cli(tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
            "callbacks=default", "~callbacks.progress_bar")
    runs = list((tmp_path / "outputs" / "digits_demo").iterdir())
    assert len(runs) == 1, runs  # the relaunched rank wrote into rank 0's directory
    run = runs[0]
    results = json.loads((run / "results.json").read_text())
    assert list(results) == ["teacher", "baseline", "student"]
    assert all(0 <= r["test/acc"] <= 1 for r in results.values())
    assert sorted(p.name for p in (run / "checkpoints" / "student").iterdir()) == ["last.ckpt"]
    assert not list(run.glob("**/*.tmp"))
    # one metrics.csv per stage (rank 0's logger alone)
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("logs/**/metrics.csv")) == \
        [f"logs/{s}/metrics.csv" for s in ("baseline", "student", "teacher")]


@pytest.mark.slow
@pytest.mark.ddp
def test_cli_ddp_test_accuracy_equals_one_process(tmp_path):
    """The same teacher weights score the same on 1 and on 2 processes (digits test set: 359)."""
    first = tmp_path / "one"
    first.mkdir()
    run_cli(first, "stages.baseline=false", "stages.student=false", "hydra.run.dir=run")
    weights = first / "run" / "teacher.pt"
    accs = []
    for devices, where in ((1, first), (2, tmp_path / "two")):
        where.mkdir(exist_ok=True)
        run_cli(where, f"teacher.ckpt_path={weights}", "stages.baseline=false", "stages.student=false",
                "trainer=ddp", f"trainer.devices={devices}", "trainer.accelerator=cpu",
                "trainer.limit_test_batches=null", "hydra.run.dir=eval")
        accs.append(json.loads((where / "eval" / "results.json").read_text())["teacher"]["test/acc"])
    print(f"digits teacher test/acc: 1 process {accs[0]:.6f}, 2 processes {accs[1]:.6f}")
    assert accs[0] == accs[1]


@pytest.mark.ddp
def test_labeled_share_is_kept_by_lightning_and_exact_on_every_rank(ranks):
    from kdkit.datamodules.labeled_share import LabeledShareSampler
    from kdkit.labels import UNLABELED

    facts, _ = ranks
    mine = [rank["labeled_share"] for rank in facts]
    hidden = mine[0]["hidden"]
    for r, got in enumerate(mine):
        assert got["sampler"] == "LabeledShareSampler"  # not replaced by Lightning's DistributedSampler
        assert len(got["batches"]) == 6  # 2 epochs x 3 batches
        for batch in got["batches"]:
            assert sum(label != UNLABELED for label in batch["label"]) == 4
            assert all(hidden[i] == (label == UNLABELED) for i, label in zip(batch["index"], batch["label"]))
        # each epoch, rank r trains on global batches r, r + 2, ... of the one seeded order
        expected = []
        for epoch in range(2):
            sampler = LabeledShareSampler(hidden, 16, 4, seed=5, num_replicas=WORLD, rank=r)
            sampler.set_epoch(epoch)
            order = list(sampler)
            expected += [order[i * 16 : (i + 1) * 16] for i in range(3)]
        assert [b["index"] for b in got["batches"]] == expected
    assert not set(mine[0]["batches"][0]["index"]) & set(mine[1]["batches"][0]["index"])


@pytest.mark.ddp
def test_teacher_budget_buys_the_same_samples_on_every_rank_and_counts_the_whole_job(ranks):
    from kdkit.selection.teacher_budget import pool_scores

    facts, out = ranks
    mine = [rank["teacher_budget"] for rank in facts]
    n = len(mine[0]["bought"])
    assert mine[0]["bought"] == mine[1]["bought"] and sum(mine[0]["bought"]) == round(0.3 * n)
    assert mine[0]["ranked"] == mine[1]["ranked"]  # one gathered set of scores, not one per rank
    # the reported count is the whole job's: the rows both ranks' teachers ran on, in the summary
    # of every rank and in the checkpoint a resumed run would continue from
    total = sum(m["teacher_rows"] for m in mine)
    assert all(m["teacher_rows"] > 0 for m in mine)
    assert [m["teacher_forwards"] for m in mine] == [total, total]
    ckpt = torch.load(out / "budget.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["kdkit_selection"]["teacher_budget"]["teacher_forwards"] == total
    # the ranks' shared scoring equals one process scoring the whole pool with the same weights ...
    task = budget_task()
    task.student.load_state_dict(torch.load(out / "budget_student.pt"))
    pool = budget_data().plain_train_view
    single = pool_scores(task, pool, "uncertainty", 64)
    assert len(single) == n and torch.allclose(torch.tensor(mine[0]["ranked"]), single, atol=1e-6)
    # ... and the second round bought exactly the most uncertain samples the first had not
    before, ranked = torch.tensor(mine[0]["before"]), torch.tensor(mine[0]["ranked"])
    ranked[before] = float("-inf")
    wanted = round(0.3 * n) - int(before.sum())
    expected = set(torch.sort(ranked, descending=True, stable=True).indices[:wanted].tolist())
    assert expected == set(torch.tensor(mine[0]["bought"]).logical_and(~before).nonzero().flatten().tolist())


@pytest.mark.ddp
def test_batch_selection_deals_the_global_top_rows_to_the_ranks(ranks):
    from torch.utils.data import default_collate

    from kdkit.selection.base import StepPlan
    from kdkit.selection.batch_select import BatchSelect

    facts, _ = ranks
    mine = [rank["batch_select"] for rank in facts]
    assert all(m["students_equal_across_ranks"] for m in mine)
    assert mine[0]["summary"] == mine[1]["summary"]
    # the summary counts the whole job's rows: every rank's scored and kept rows
    assert mine[0]["summary"]["rows_scored"] == sum(len(b) for m in mine for b in m["seen"]) > 0
    assert mine[0]["summary"]["rows_kept"] == sum(len(b) for m in mine for b in m["kept"]) > 0
    for a, b in zip(mine[0]["kept"], mine[1]["kept"], strict=True):
        assert len(a) == len(b) > 0 and not set(a) & set(b)
    # step 0 (same weights everywhere): one process ranking the two ranks' batches together keeps
    # exactly the rows the two ranks trained on, in rank order
    data = EvalShardedImages()
    data.setup()
    union = mine[0]["seen"][0] + mine[1]["seen"][0]
    batch = default_collate([data.train_set[i] for i in union])
    task = batch_select_task(BatchSelect(keep=0.5, score="learnability"))
    task.build(batch, N_TRAIN, 3)
    single = task.selection["batch_select"].plan(task, StepPlan(batch))
    assert single.batch["index"].tolist() == mine[0]["kept"][0] + mine[1]["kept"][0]
    # and the two ranks did trade rows: some kept row came from the other rank's batch
    assert any(set(k) - set(s) for k, s in zip((m["kept"][0] for m in mine), (m["seen"][0] for m in mine)))


@pytest.mark.ddp
def test_crd_banks_stay_out_of_ddps_per_step_broadcast_and_agree_on_every_rank(ranks):
    facts, _ = ranks
    for rank in facts:
        crd = rank["crd_banks"]
        assert crd["ignored"] == ["distillers.crd.memory_s", "distillers.crd.memory_t", "distillers.crd.z"]
        assert crd["banks_synced_by_ddp"] == []  # not broadcast from rank 0 before every step
        assert crd["ddp_buffer_count"] >= 3  # the student BN statistics still are
        # each rank drew its own banks, updated them with every rank's rows, and started from rank
        # 0's (the one broadcast at fit start): identical after training
        assert crd["banks_equal_across_ranks"] and crd["banks_moved"]

