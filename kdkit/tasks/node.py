"""Node classification on one graph: GNN teacher, graph-free MLP student (GNN-to-MLP)."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.tasks.base import DistillationTask
from kdkit.teacher_source import MemoizedTeacher, TeacherSource


def needs_graph(model: nn.Module) -> bool:
    """Whether ``model`` is called as ``model(x, edge_index)`` (a GNN) or ``model(x)`` (an MLP).

    kdkit's models say so with a ``needs_graph`` attribute; any other model (e.g. PyG's
    ``torch_geometric.nn.GCN``) is a GNN when its ``forward`` takes ``edge_index``. The model's
    type decides, not the role: the teacher-training stage passes the GNN as the student.
    """
    flag = getattr(model, "needs_graph", None)
    if flag is not None:
        return bool(flag)
    return "edge_index" in inspect.signature(model.forward).parameters


def num_hops(model: nn.Module) -> int:
    """Hops of neighbourhood one prediction reads: ``num_hops`` or the message-passing layers."""
    hops = getattr(model, "num_hops", None)
    if hops is not None:
        return int(hops)
    from torch_geometric.nn import MessagePassing

    return sum(isinstance(m, MessagePassing) for m in model.modules())


class NodeTask(DistillationTask):
    """Semi-supervised node classification, the GNN-to-MLP distillation setting of GLNN
    (Zhang et al. 2022), FF-G2M (Wu et al. 2023) and NOSMOG (Tian et al. 2023).

    A batch is a whole graph (see ``kdkit.datamodules.graph.GraphDataModule``). A GNN reads
    ``x`` and ``edge_index``, an MLP only ``x`` (see ``needs_graph``). ``Outputs`` hold every
    node of the batch: ``logits`` [N, C] and ``embedding`` [N, D] (the output of the model's
    ``embedding_module``), so distillers work on all nodes, labelled or not, as GLNN does; the
    task's cross-entropy reads the ``train_mask`` nodes only:

        L = lambda * CE(student on labelled nodes) + sum_d weight_d * L_d(all nodes)

    with lambda = ``task_loss_weight``. GLNN uses lambda = 0 (soft labels alone); stages
    without distillers (teacher training, baseline) always train on the cross-entropy alone
    (``DistillationTask``'s rule).

    GLNN and FF-G2M report test accuracy at the best validation epoch: the node config
    (``conf/task/node.yaml``) gives the task a ``kdkit.callbacks.KeepBestWeights`` callback
    (``val/acc``, max; not in the teacher stage), which restores those weights when fitting
    ends and reports ``val/acc_selected``.

    Teacher outputs on a static graph never change: unless a core teacher cache is given, the
    last teacher ``Outputs`` are kept and reused while the batch's ``index`` and
    ``edge_index`` are equal to the last ones (a cheap comparison next to a GNN forward), so
    the teacher runs once per run instead of once per epoch.

    Args:
        student: the trained network (the GNN itself in the teacher-training stage).
        teacher: the frozen GNN, or None.
        num_classes: number of classes (checked against both models at start-up).
        embedding_module: name of the module whose output is the hidden node embedding
            (``"embedding"`` in ``kdkit.models.gnn``); models without it give no embedding.
        memoize_teacher: reuse teacher outputs while the graph batch is unchanged.
        latency_repeats: timed blocks per latency figure in ``inference_report`` (each block
            repeats the call for >= 50 ms; the fastest block's mean is reported).
        **kwargs: see ``DistillationTask``.
    """

    primary_metric = "acc"  # compared across stages on validation data (warn_weaker_teachers)

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, num_classes: int,
                 embedding_module: str | None = "embedding", memoize_teacher: bool = True,
                 latency_repeats: int = 20, **kwargs):
        self.embedding_module = embedding_module
        self._embedding_names: dict[str, str | None] = {}
        self.memoize_teacher = memoize_teacher  # read by make_teacher_source during super().__init__
        super().__init__(student, teacher, **kwargs)
        self.num_classes = int(num_classes)
        self.latency_repeats = int(latency_repeats)
        self.metrics = nn.ModuleDict({
            name: torchmetrics.classification.MulticlassAccuracy(self.num_classes, average="micro")
            for name in ("val", "test", "test_observed")
        })

    # ---- outputs ----------------------------------------------------------------------------
    def embedding_name(self, role: str) -> str | None:
        """``embedding_module`` when model ``role`` has it (None: no embedding)."""
        if role not in self._embedding_names:
            model = self.student if role == "student" else self.teachers[role].model
            self._embedding_names[role] = _has_module(model, self.embedding_module)
        return self._embedding_names[role]

    def extra_feature_names(self, role: str) -> list[str]:
        name = self.embedding_name(role)
        return [name] if name else []

    def forward_outputs(self, model, batch: dict, role: str) -> Outputs:
        if needs_graph(model):
            return Outputs(logits=model(batch["x"], batch["edge_index"]))
        return Outputs(logits=model(batch["x"]))

    def finish_outputs(self, out: Outputs, role: str) -> Outputs:
        name = self.embedding_name(role)
        if name and name in out.features:
            out.embedding = out.features.pop(name)
        return out

    def make_teacher_source(self, name: str, cache) -> TeacherSource:
        source = super().make_teacher_source(name, cache)
        if cache is None and self.memoize_teacher:
            return MemoizedTeacher(source, key=graph_batch_key)
        return source

    def check_compatible(self, student: Outputs, teacher: Outputs) -> None:
        if student.logits.shape[-1] != teacher.logits.shape[-1]:
            raise KdkitError(
                f"teacher predicts {teacher.logits.shape[-1]} classes but the student predicts "
                f"{student.logits.shape[-1]}: set num_classes the same for both"
            )
        if student.logits.shape[-1] != self.num_classes:
            raise KdkitError(
                f"models predict {student.logits.shape[-1]} classes but the data has {self.num_classes}"
            )

    # ---- loss and metrics -------------------------------------------------------------------
    def task_loss(self, outputs: Outputs, batch: dict) -> Tensor:
        mask = batch["train_mask"]
        return F.cross_entropy(outputs.logits[mask].float(), batch["y"][mask])

    def update_metrics(self, stage: str, outputs: Outputs, batch: dict) -> None:
        logits = outputs.logits.float()
        mask = batch[f"{stage}_mask"]
        self.metrics[stage].update(logits[mask], batch["y"][mask])
        observed = batch.get("observed_test_mask")
        if stage == "test" and observed is not None:
            self.metrics["test_observed"].update(logits[observed], batch["y"][observed])

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        metrics = {"acc": self.metrics[stage].compute()}  # torchmetrics reduces over ranks
        self.metrics[stage].reset()
        observed = self.metrics["test_observed"]
        if stage == "test" and observed.update_called:
            metrics["acc_observed"] = observed.compute()
            observed.reset()
        return metrics

    # ---- export -----------------------------------------------------------------------------
    def export(self, directory, with_adapters: bool = False, datamodule=None) -> list:
        """``DistillationTask.export``, plus a graph-free student as self-contained programs
        (``student.pt2``, ``student.onnx``) with ``inputs.json`` (the features it reads and their
        normalisation; see ``kdkit.exports``). ``datamodule`` gives the example features and
        preprocessing facts (default: the Trainer's). A format that cannot be written costs a
        warning line only."""
        from kdkit.exports.optional import optional_format
        from kdkit.exports.settings import node_exports

        paths = super().export(directory, with_adapters)
        return paths + optional_format("programs", lambda: node_exports(self, directory, datamodule))

    # ---- inference cost ---------------------------------------------------------------------
    @torch.inference_mode()  # as a deployed model runs: no autograd bookkeeping at all
    def inference_report(self, batch: dict) -> dict:
        """Parameters and latency (ms, ``kdkit.report.latency_ms``) of the student on the whole
        graph and on a batch of new nodes (``batch["query"]``, else the test-mask nodes; see
        ``inductive_forward``). ``inductive_fetched_nodes``: how many nodes' features that batch
        had to read."""
        from kdkit.report import count_parameters, latency_ms

        batch = self.transfer_batch_to_device(batch, self.device, 0)
        model = self.student
        query = inductive_query(batch)
        x, edges = batch["x"], batch["edge_index"]
        graph = needs_graph(model)

        def full():
            return model(x, edges) if graph else model(x)

        def inductive():
            return inductive_forward(model, x, edges, query)

        was_training = model.training
        model.eval()
        try:
            report = {
                "params": count_parameters(model),
                "latency_full_ms": latency_ms(_synced(full, x), runs=self.latency_repeats),
                "latency_inductive_ms": latency_ms(_synced(inductive, x), runs=self.latency_repeats),
                "inductive_nodes": int(query.numel()),
                "inductive_fetched_nodes": inductive()[1],
            }
        finally:
            self.student_tap.pop()
            model.train(was_training)
        return report


def inductive_query(batch: dict) -> Tensor:
    """The new nodes an inductive latency is timed on: ``batch["query"]``, else the test nodes."""
    query = batch.get("query")
    return batch["test_mask"].nonzero().view(-1) if query is None else query


def inductive_forward(model: nn.Module, x: Tensor, edge_index: Tensor, query: Tensor
                      ) -> tuple[Tensor, int]:
    """Logits of the ``query`` nodes as a deployed model computes them, and how many nodes'
    features it read. An MLP reads the query nodes' features alone; a GNN must first gather
    their k-hop neighbourhood (``k_hop_subgraph``, k = ``num_hops``) and run on that subgraph."""
    if not needs_graph(model):
        return model(rows(x, query)), int(query.numel())
    from torch_geometric.utils import k_hop_subgraph

    subset, sub_edges, mapping, _ = k_hop_subgraph(
        query, num_hops(model), edge_index, relabel_nodes=True, num_nodes=x.shape[0])
    return model(rows(x, subset), sub_edges)[mapping], int(subset.numel())


def rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for a dense or a sparse CSR ``x`` (torch cannot index CSR rows)."""
    if x.layout != torch.sparse_csr:
        return x[index]
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    start = crow[index]
    count = crow[index + 1] - start
    new_crow = count.new_zeros(index.numel() + 1)
    torch.cumsum(count, 0, out=new_crow[1:])
    total = int(new_crow[-1])
    # position of every kept value: its new position shifted by (old - new) row start
    # (output_size spares repeat_interleave a pass over count to size its result)
    shift = torch.repeat_interleave(start - new_crow[:-1], count, output_size=total)
    pos = torch.arange(total, device=x.device).add_(shift)
    return torch.sparse_csr_tensor(new_crow, col[pos], val[pos], (index.numel(), x.shape[1]),
                                   check_invariants=False)  # valid by construction; checks cost


def _has_module(model: nn.Module | None, name: str | None) -> str | None:
    if model is None or not name:
        return None
    return name if name in dict(model.named_modules()) else None


def _synced(fn, like: Tensor):
    """``fn`` followed by a device sync, so GPU latency counts the kernels, not their launch."""
    if like.device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(like.device)
        return out

    return run


def graph_batch_key(batch: dict) -> tuple:
    """What makes a graph batch the same batch: its nodes and its edges."""
    return batch["index"], batch["edge_index"]
