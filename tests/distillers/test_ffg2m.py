import math
from functools import partial

import pytest
import torch

from kdkit.distillers.ffg2m import FFG2M, high_frequency_loss, low_frequency_loss
from kdkit.errors import KdkitError
from kdkit.models.gnn import GNN, NodeMLP
from kdkit.outputs import Outputs
from kdkit.tasks.node import NodeTask

from .helpers import from_yaml

# Path 0 - 1 - 2 - 3, both directions (6 directed edges), and hand-picked logits over 3 classes.
EDGES = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
S = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
T = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, -1.0], [0.0, 3.0, 1.0], [-1.0, 0.0, 2.0]])


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def low_by_hand(s, t, edges):
    """mean over edges + one self-loop per node of KL(p^T_dst || p^S_src), with loops."""
    pairs = list(zip(*edges.tolist())) + [(i, i) for i in range(len(s))]
    return sum(kl(softmax(t[j].tolist()), softmax(s[i].tolist())) for i, j in pairs) / len(pairs)


def high_by_hand(s, t, edges, tau):
    total = 0.0
    for i, j in zip(*edges.tolist()):
        dt = [abs(a - b) / tau for a, b in zip(t[i].tolist(), t[j].tolist())]
        ds = [abs(a - b) / tau for a, b in zip(s[i].tolist(), s[j].tolist())]
        total += kl(softmax(dt), softmax(ds))
    return total / edges.shape[1]


def test_terms_match_explicit_loops_on_a_4_node_path():
    d = FFG2M(tau=1.5)
    terms = d(Outputs(logits=S), Outputs(logits=T), {"edge_index": EDGES})
    assert set(terms) == {"low", "high"}
    assert terms["low"].item() == pytest.approx(low_by_hand(S, T, EDGES), rel=1e-5)
    assert terms["high"].item() == pytest.approx(high_by_hand(S, T, EDGES, 1.5), rel=1e-5)
    # the pure functions are the same numbers (LFD takes the self-loops it is given)
    loops = torch.cat([EDGES, torch.arange(4).repeat(2, 1)], 1)
    assert low_frequency_loss(S, T, loops).item() == pytest.approx(terms["low"].item(), rel=1e-6)
    assert high_frequency_loss(S, T, EDGES, 1.5).item() == pytest.approx(terms["high"].item(), rel=1e-6)


def test_one_edge_by_hand():
    # Nodes 0 - 1, 2 classes. Teacher logits (ln 3, 0) at both nodes -> p^T = (3/4, 1/4);
    # student logits 0 -> p^S = (1/2, 1/2). LFD: 4 pairs, each KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    # HFD: teacher and student differences are all 0 -> uniform vs uniform -> 0.
    s, t = torch.zeros(2, 2), torch.tensor([[math.log(3.0), 0.0]] * 2)
    terms = FFG2M()(Outputs(logits=s), Outputs(logits=t), {"edge_index": torch.tensor([[0, 1], [1, 0]])})
    assert terms["low"].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert terms["high"].item() == pytest.approx(0.0, abs=1e-7)


def test_self_loops_in_the_input_are_not_counted_twice_and_weights_apply():
    with_loops = torch.cat([EDGES, torch.tensor([[2], [2]])], 1)
    a = FFG2M()(Outputs(logits=S), Outputs(logits=T), {"edge_index": EDGES})
    b = FFG2M()(Outputs(logits=S), Outputs(logits=T), {"edge_index": with_loops})
    torch.testing.assert_close(a["low"], b["low"])
    torch.testing.assert_close(a["high"], b["high"])
    only_low = FFG2M(low_weight=2.0, high_weight=0.0)(Outputs(logits=S), Outputs(logits=T),
                                                      {"edge_index": EDGES})
    assert set(only_low) == {"low"}
    torch.testing.assert_close(only_low["low"], 2 * a["low"])


def test_student_equal_to_teacher_and_errors():
    # HFD vanishes; LFD does not: a node still differs from its neighbours' teacher outputs.
    terms = FFG2M()(Outputs(logits=T.clone()), Outputs(logits=T), {"edge_index": EDGES})
    assert terms["high"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["low"].item() == pytest.approx(low_by_hand(T, T, EDGES), rel=1e-5)
    assert terms["low"].item() > 0.1
    with pytest.raises(KdkitError, match="edge_index"):
        FFG2M()(Outputs(logits=S), Outputs(logits=T), {})
    with pytest.raises(KdkitError, match="tau"):
        FFG2M(tau=0.0)


def test_yaml_and_gradients_reach_the_student_only():
    d = from_yaml("ffg2m")
    assert isinstance(d, FFG2M) and d.tau == 1.5
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    batch = {"x": x, "edge_index": EDGES, "y": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4),
             "train_mask": torch.tensor([True, True, False, False])}
    student, teacher = NodeMLP(5, 8, 3), GNN("gcn", 5, 8, 3)
    task = NodeTask(student, teacher, distillers={"ffg2m": d}, num_classes=3, task_loss_weight=0.0,
                    optimizer=partial(torch.optim.Adam, lr=0.01))
    task.build(batch)
    losses, _ = task.losses(batch)
    assert set(losses) == {"ffg2m/low", "ffg2m/high"}
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
