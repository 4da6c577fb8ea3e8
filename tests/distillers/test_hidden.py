from functools import partial

import numpy as np
import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.hidden import HiddenRep, hidden_loss
from kdkit.errors import KdkitError
from kdkit.models.gnn import GNN, NodeMLP
from kdkit.outputs import Outputs
from kdkit.tasks.node import NodeTask

from .helpers import from_yaml

# 3 nodes: student embeddings of width 2, teacher embeddings of width 3.
HS = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
HT = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [2.0, 0.0, -1.0]])
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # adapter weight [3, 2], bias 0


def built(loss: str, **kwargs) -> HiddenRep:
    d = HiddenRep(loss=loss, **kwargs)
    d.build(Outputs(embedding=HS), Outputs(embedding=HT), DistillContext())
    with torch.no_grad():
        d.adapter.weight.copy_(W)
        d.adapter.bias.zero_()
    return d


def adapted() -> np.ndarray:
    # A h^S row by row: (h1, h2) -> (h1, h2, h1 + h2)
    return np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 2.0], [1.0, -1.0, 0.0]])


def test_mse_by_hand():
    # differences: row 0 (0,0,0); row 1 (0,1,2); row 2 (-1,-1,1) -> (0 + 5 + 3) / 9
    out = built("mse")(Outputs(embedding=HS), Outputs(embedding=HT), {})
    assert out["loss"].item() == pytest.approx(8 / 9, rel=1e-6)


def test_cosine_by_hand():
    a, t = adapted(), HT.numpy()
    cos = [a[i] @ t[i] / np.linalg.norm(a[i]) / np.linalg.norm(t[i]) for i in range(3)]
    expected = np.mean([1 - c for c in cos])  # row 0: cos 1; row 1: 2/sqrt(8); row 2: 1/sqrt(10)
    out = built("cosine")(Outputs(embedding=HS), Outputs(embedding=HT), {})
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_similarity_is_nosmog_gram_matching():
    a, t = adapted(), HT.numpy()
    expected = sum((a[i] @ a[j] - t[i] @ t[j]) ** 2 for i in range(3) for j in range(3)) / 9
    out = built("similarity")(Outputs(embedding=HS), Outputs(embedding=HT), {})
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_similarity_samples_max_nodes_per_step():
    d = built("similarity", max_nodes=2)
    torch.manual_seed(7)
    got = d(Outputs(embedding=HS), Outputs(embedding=HT), {})["loss"]
    torch.manual_seed(7)
    pick = torch.randperm(3)[:2]
    expected = hidden_loss(d.adapter(HS)[pick], HT[pick], "similarity")
    torch.testing.assert_close(got, expected)


def test_errors():
    with pytest.raises(KdkitError, match="mse"):
        HiddenRep(loss="l1")
    with pytest.raises(KdkitError, match="not built"):
        HiddenRep()(Outputs(embedding=HS), Outputs(embedding=HT), {})
    with pytest.raises(KdkitError, match="embedding"):
        HiddenRep().build(Outputs(logits=HS), Outputs(embedding=HT), DistillContext())


@pytest.mark.parametrize("loss", ["mse", "cosine", "similarity"])
def test_adapter_is_built_by_the_task_and_only_student_and_adapter_learn(loss):
    torch.manual_seed(0)
    batch = {"x": torch.randn(4, 5), "edge_index": torch.tensor([[0, 1, 2], [1, 2, 3]]),
             "y": torch.tensor([0, 1, 1, 0]), "index": torch.arange(4),
             "train_mask": torch.tensor([True, False, True, False])}
    student, teacher = NodeMLP(5, 6, 2), GNN("gcn", 5, 10, 2)
    d = HiddenRep(loss=loss)
    task = NodeTask(student, teacher, distillers={"hidden": d}, num_classes=2,
                    task_loss_weight=0.0, optimizer=partial(torch.optim.Adam, lr=0.01))
    task.build(batch)
    assert d.adapter.weight.shape == (10, 6)
    losses, _ = task.losses(batch)
    losses["hidden"].backward()
    # the embedding is the hidden layer: the classifier gets no gradient from this loss
    assert student.layers[1].weight.grad is None
    assert student.layers[0].weight.grad.abs().sum() > 0
    assert d.adapter.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert any(n.startswith("distillers.hidden.adapter") for n, _ in task.named_parameters())


def test_yaml():
    d = from_yaml("hidden")
    assert isinstance(d, HiddenRep) and d.loss == "mse" and d.max_nodes == 1024
