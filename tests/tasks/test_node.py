import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch_geometric.data import Data
from torch_geometric.nn import GCN

from kdkit.callbacks import KeepBestWeights
from kdkit.datamodules.graph import GraphDataModule
from kdkit.distillers.ffg2m import FFG2M
from kdkit.distillers.hidden import HiddenRep
from kdkit.distillers.kd import KD
from kdkit.models.gnn import GNN, NodeMLP
from kdkit.outputs import Outputs
from kdkit.tasks.node import NodeTask, inductive_forward, needs_graph, rows


def two_cliques(n: int = 16, features: int = 6, seed: int = 0) -> list[Data]:
    """Two dense communities, class = community, noisy features shifted by the class; every
    mask holds both classes (train 2 + 2, val 3 + 3, test 3 + 3)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) >= n // 2).long()
    same = y[:, None] == y[None, :]
    adj = (same & (torch.rand(n, n, generator=g) < 0.5)) | (~same & (torch.rand(n, n, generator=g) < 0.05))
    adj = (adj | adj.T) & ~torch.eye(n, dtype=torch.bool)
    x = torch.randn(n, features, generator=g) + y[:, None].float()
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    for c in (0, 1):
        nodes = (y == c).nonzero().view(-1)[torch.randperm(n // 2, generator=g)]
        masks[0][nodes[:2]] = True
        masks[1][nodes[2:5]] = True
        masks[2][nodes[5:]] = True
    return [Data(x=x, edge_index=adj.nonzero().T, y=y, train_mask=masks[0], val_mask=masks[1],
                 test_mask=masks[2])]


def datamodule(**kwargs) -> GraphDataModule:
    dm = GraphDataModule(two_cliques(), normalize_features=False, **kwargs)
    dm.setup()
    return dm


def task(student, teacher=None, distillers=None, lr=0.01, **kwargs) -> NodeTask:
    return NodeTask(student, teacher, distillers=distillers, num_classes=2,
                    optimizer=partial(torch.optim.Adam, lr=lr), **kwargs)


def trainer(epochs: int) -> L.Trainer:
    # full-batch: one step per epoch; log_every_n_steps=1 as in the node experiments (the task
    # logs its loss terms on Lightning's logging steps only)
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     log_every_n_steps=1)


def test_needs_graph_follows_the_model_not_the_role():
    assert needs_graph(GNN("gcn", 6, 8, 2)) and not needs_graph(NodeMLP(6, 8, 2))
    assert needs_graph(GCN(6, 8, 2))  # PyG model without the flag: forward takes edge_index
    assert not needs_graph(nn.Linear(6, 2))
    batch = datamodule().example_batch()
    gnn = GNN("gcn", 6, 8, 2)
    t = task(gnn)  # the teacher-training stage passes the GNN as the student
    out = t.student_outputs(batch)
    assert out.logits.shape == (16, 2) and out.embedding.shape == (16, 8)
    cut = dict(batch, edge_index=batch["edge_index"][:, :0])
    gnn.eval()
    assert not torch.allclose(t.student_outputs(batch).logits, t.student_outputs(cut).logits)


def test_task_loss_is_cross_entropy_on_train_nodes_only():
    batch = datamodule().example_batch()
    logits = torch.randn(16, 2)
    t = task(NodeMLP(6, 8, 2))
    expected = 0.0
    train = batch["train_mask"].nonzero().view(-1).tolist()
    for i in train:
        z = logits[i].tolist()
        expected -= z[batch["y"][i]] - math.log(sum(math.exp(v) for v in z))
    got = t.task_loss(Outputs(logits=logits), batch)
    assert got.item() == pytest.approx(expected / len(train), rel=1e-5)


def test_lambda_applies_only_with_distillers():
    teacher = GNN("gcn", 6, 8, 2)
    assert task(NodeMLP(6, 8, 2), task_loss_weight=0.0).task_loss_weight == 1.0
    with_kd = task(NodeMLP(6, 8, 2), teacher, {"kd": KD(temperature=1.0)}, task_loss_weight=0.0)
    assert with_kd.task_loss_weight == 0.0
    batch = datamodule().example_batch()
    with_kd.build(batch)
    losses, _ = with_kd.losses(batch)
    assert set(losses) == {"kd"}  # GLNN lambda = 0: soft labels on every node, no CE


def test_accuracy_on_masks_and_observed_test_nodes():
    dm = datamodule(setting="inductive", inductive_rate=0.5)
    batch = dm.example_batch()
    t = task(NodeMLP(6, 8, 2))
    logits = torch.zeros(16, 2)
    logits[torch.arange(16), batch["y"]] = 1.0  # all correct ...
    wrong = batch["test_mask"].nonzero().view(-1)[:1]
    logits[wrong] = logits[wrong].flip(1)  # ... but one held-out test node
    t.update_metrics("test", Outputs(logits=logits), batch)
    metrics = t.compute_metrics("test")
    held = int(batch["test_mask"].sum())
    assert metrics["acc"].item() == pytest.approx((held - 1) / held)
    assert metrics["acc_observed"].item() == 1.0
    val = dm.batches["val"]  # the observed graph: 16 - 3 held-out nodes
    t.update_metrics("val", Outputs(logits=torch.zeros(13, 2)), val)
    val_metrics = t.compute_metrics("val")
    assert set(val_metrics) == {"acc"}
    assert val_metrics["acc"].item() == pytest.approx(float((val["y"][val["val_mask"]] == 0).float().mean()))


class CountingGNN(GNN):
    calls = 0

    def forward(self, x, edge_index):
        CountingGNN.calls += 1
        return super().forward(x, edge_index)


def test_teacher_runs_once_per_graph():
    batch = datamodule().example_batch()
    CountingGNN.calls = 0
    t = task(NodeMLP(6, 8, 2), CountingGNN("gcn", 6, 8, 2), {"kd": KD(temperature=1.0)})
    t.build(batch)
    for _ in range(3):
        t.losses(batch)
    assert CountingGNN.calls == 1
    t.losses(dict(batch, edge_index=batch["edge_index"][:, 1:]))  # another graph: recompute
    assert CountingGNN.calls == 2
    no_memo = task(NodeMLP(6, 8, 2), CountingGNN("gcn", 6, 8, 2), {"kd": KD()}, memoize_teacher=False)
    no_memo.build(batch)
    no_memo.losses(batch)
    no_memo.losses(batch)
    assert CountingGNN.calls == 5


class Snapshots(L.Callback):
    """Student weights at every validation and the val/acc they scored."""

    def __init__(self):
        self.states, self.accs = [], []

    def on_validation_epoch_end(self, trainer, module):
        self.states.append(copy.deepcopy(module.student.state_dict()))

    def on_train_epoch_end(self, trainer, module):
        self.accs.append(float(trainer.callback_metrics["val/acc"]))


def test_best_validation_weights_are_restored():
    torch.manual_seed(0)
    dm = datamodule()
    t = task(NodeMLP(6, 8, 2, dropout=0.5), lr=0.05, callbacks={"keep_best": KeepBestWeights("val/acc")})
    snaps = Snapshots()
    tr = L.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   callbacks=[snaps])
    tr.fit(t, datamodule=dm)
    best = max(range(len(snaps.accs)), key=lambda i: (snaps.accs[i], i))  # last of the ties
    assert len(set(snaps.accs)) > 1  # the check below means something
    for k, v in t.student.state_dict().items():
        torch.testing.assert_close(v, snaps.states[best][k])
    metrics = tr.validate(t, datamodule=dm, verbose=False)[0]
    assert metrics["val/acc"] == pytest.approx(max(snaps.accs))
    assert t.fit_summary() == {"val/acc_selected": pytest.approx(max(snaps.accs))}


def test_distillation_trains_student_and_adapters_never_the_teacher():
    torch.manual_seed(0)
    dm = datamodule(setting="inductive", inductive_rate=0.5)
    teacher = GNN("sage", 6, 12, 2)
    trainer(20).fit(task(teacher), datamodule=dm)  # the teacher stage
    frozen_before = copy.deepcopy(teacher.state_dict())
    student = NodeMLP(6, 8, 2)
    distillers = {"kd": KD(temperature=1.0), "ffg2m": FFG2M(), "hidden": HiddenRep(loss="cosine")}
    t = task(student, teacher, distillers, task_loss_weight=0.5)
    start = copy.deepcopy(student.state_dict())
    tr = trainer(5)
    tr.fit(t, datamodule=dm)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, frozen_before[k])
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())
    assert t.distillers["hidden"].adapter.weight.shape == (12, 8)
    logged = set(tr.callback_metrics)
    assert {"train/loss/task", "train/loss/kd", "train/loss/ffg2m/low", "train/loss/ffg2m/high",
            "train/loss/hidden"} <= logged
    assert not any(k.startswith("teacher") for k in t.state_dict())
    metrics = tr.test(t, datamodule=dm, verbose=False)[0]
    assert {"test/acc", "test/acc_observed"} <= set(metrics)


def test_inductive_forward_reads_only_the_k_hop_neighbourhood():
    torch.manual_seed(0)
    batch = datamodule().example_batch()
    query = torch.tensor([0, 5])
    sage = GNN("sage", 6, 8, 2).eval()  # mean aggregation: exact on the k-hop subgraph
    full = sage(batch["x"], batch["edge_index"])[query]
    out, fetched = inductive_forward(sage, batch["x"], batch["edge_index"], query)
    torch.testing.assert_close(out, full)
    # nodes within 2 hops of the query, by breadth-first search
    frontier, seen = set(query.tolist()), set(query.tolist())
    src, dst = batch["edge_index"].tolist()
    for _ in range(2):
        frontier = {s for s, d in zip(src, dst) if d in frontier} - seen
        seen |= frontier
    assert fetched == len(seen)
    mlp = NodeMLP(6, 8, 2).eval()
    out, fetched = inductive_forward(mlp, batch["x"], batch["edge_index"], query)
    torch.testing.assert_close(out, mlp(batch["x"])[query])
    assert fetched == 2
    sparse = batch["x"].to_sparse_csr()  # the same with sparse CSR features
    torch.testing.assert_close(inductive_forward(sage, sparse, batch["edge_index"], query)[0], full)
    torch.testing.assert_close(inductive_forward(mlp, sparse, batch["edge_index"], query)[0], out)


def test_rows_of_sparse_csr_features():
    x = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0], [0.0, 0.0, 0.0], [4.0, 5.0, 6.0]])
    index = torch.tensor([3, 0, 2, 3, 1])
    torch.testing.assert_close(rows(x.to_sparse_csr(), index).to_dense(), x[index])
    torch.testing.assert_close(rows(x, index), x[index])


def test_inference_report():
    dm = datamodule()
    for model, fetched_more in ((GNN("gcn", 6, 8, 2), True), (NodeMLP(6, 8, 2), False)):
        t = task(model, latency_repeats=3)
        report = t.inference_report(dm.example_batch(n=3))
        assert report["params"] == sum(p.numel() for p in model.parameters())
        assert report["latency_full_ms"] > 0 and report["latency_inductive_ms"] > 0
        assert report["inductive_nodes"] == 3
        assert (report["inductive_fetched_nodes"] > 3) == fetched_more
        assert model.training  # the report leaves the mode as it found it


def test_sp_relation_distillation_reuses_the_core_distiller_over_all_node_pairs():
    from kdkit.distillers.sp import SP, sp_loss

    torch.manual_seed(0)
    batch = datamodule().example_batch()
    student, teacher = NodeMLP(6, 8, 2), GNN("gcn", 6, 12, 2)
    t = task(student, teacher, {"sp": SP(weight=1.0)}, task_loss_weight=0.0)
    t.build(batch)
    losses, s = t.losses(batch)
    teacher.eval()
    expected = sp_loss(s.embedding, t.teacher_outputs(batch).embedding)
    torch.testing.assert_close(losses["sp"], expected)  # one 16 x 16 Gram matrix per model
    losses["sp"].backward()
    assert student.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_the_node_config_keeps_the_best_student_epoch():
    from hydra.utils import instantiate

    from kdkit.compose import compose

    cfg = compose(["experiment=cora_glnn"])
    t = instantiate(cfg.task, num_classes=2)(student=NodeMLP(6, 8, 2))
    (keep,) = t.task_callbacks
    assert isinstance(keep, KeepBestWeights)
    assert (keep.monitor, keep.mode, keep.teacher_stage) == ("val/acc", "max", False)
    assert "channels_last" not in cfg.task and "select_best" not in cfg.task


@pytest.mark.parametrize("experiment", ["cora_glnn", pytest.param("citeseer_glnn", marks=pytest.mark.slow)])
def test_experiments_run_every_stage_on_the_real_graph(experiment, compose_run, data_dir):
    # with the core teacher-output cache (the graph is static); NodeTask defers to it
    cfg, results = compose_run(f"experiment={experiment}", "teacher.cache=true")
    assert cfg.distiller.glnn.temperature == 1.0 and cfg.task.task_loss_weight == 0.0
    assert set(results) == {"teacher", "baseline", "student"}
    for stage in results.values():
        assert 0.0 <= stage["test/acc"] <= 1.0
        assert stage["latency_inductive_ms"] > 0 and stage["inductive_nodes"] == 8
    # the GNN reads a 2-hop neighbourhood, the MLPs only the 8 query nodes
    assert results["teacher"]["inductive_fetched_nodes"] > 8
    assert results["student"]["inductive_fetched_nodes"] == 8
    # the task's KeepBestWeights: the students report their kept weights' score, the teacher none
    assert "val/acc_selected" in results["student"] and "val/acc_selected" in results["baseline"]
    assert "val/acc_selected" not in results["teacher"]


def test_the_teacher_stage_keeps_its_last_weights_by_default():
    torch.manual_seed(0)
    dm = datamodule()
    gnn = GNN("gcn", 6, 8, 2)
    keep = KeepBestWeights("val/acc")  # teacher_stage=False, as conf/task/node.yaml
    t = task(gnn, lr=0.05, callbacks=[keep])
    t.student_role = "teacher"  # what the runner sets while it trains the teacher
    snaps = Snapshots()
    tr = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   callbacks=[snaps])
    tr.fit(t, datamodule=dm)
    for k, v in gnn.state_dict().items():  # the weights of the last epoch
        torch.testing.assert_close(v, snaps.states[-1][k])
    assert keep.best_state is None and t.fit_summary() == {}  # no best epoch was even recorded
