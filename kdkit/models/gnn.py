"""Node classifiers for the GNN-to-MLP setting: GNN teachers (GCN, GraphSAGE, GAT) built from
PyG message-passing layers, and the graph-free MLP student.

Both classes mark their last hidden representation with an ``nn.Identity`` named
``embedding``, so ``NodeTask`` can tap it (forward hook) as ``Outputs.embedding`` for
representation distillers without a second forward. ``needs_graph`` tells the task whether the
model is fed ``(x, edge_index)`` or ``x`` alone.

Node features may be a sparse CSR tensor (bag-of-words features are ~1% nonzero): the first
layer then multiplies sparse by dense, about 10x less work than the dense product on a CPU
(``SparseInputLinear`` keeps that product fast at inference too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError, close_names

CONVS = ("gcn", "sage", "gat")
NORMS = ("none", "batch", "layer")
ACTS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    if kind == "none":
        return nn.Identity()
    raise KdkitError(f"norm={kind!r} is not one of: {close_names(str(kind), NORMS)}")


def _act(kind: str) -> nn.Module:
    if kind not in ACTS:
        raise KdkitError(f"act={kind!r} is not one of: {close_names(str(kind), ACTS)}")
    return ACTS[kind]()


class FeatureDropout(nn.Dropout):
    """``nn.Dropout`` that also takes a sparse CSR input (dropping stored values only)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.layout != torch.sparse_csr:
            return super().forward(x)
        if not self.training or self.p == 0:
            return x
        values = F.dropout(x.values(), self.p, True)
        return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape,
                                       check_invariants=False)  # same structure as x


class SparseInputLinear(nn.Linear):
    """``nn.Linear`` that, at inference on a sparse CSR input, computes ``x @ W^T`` as a weighted
    embedding bag over a cached contiguous ``W^T`` (row i = sum of ``v * W^T[j]`` over its stored
    ``(j, v)``). torch's CSR @ transposed-weight product (sparse-matrix setup for every call) was
    the largest part of an MLP's inductive latency; on this project's CPUs the bag took about
    half the time of CSR @ ``W^T`` and a quarter of CSR @ ``W.t()`` (ad-hoc timings of 256 Cora
    rows, 1 thread: 0.04 / 0.075 / 0.14 ms). Training (autograd on the weight) and dense inputs
    take ``nn.Linear``'s own path. The cache is keyed on the weight's storage and version, so
    optimizer steps, ``load_state_dict`` and ``.to()`` invalidate it.
    """

    _wt: Tensor | None = None
    _wt_key: tuple | None = None

    @classmethod
    def like(cls, linear: nn.Module) -> "SparseInputLinear":
        """The same layer (weights shared, no new init) as a SparseInputLinear, e.g. PyG's."""
        new = cls(linear.weight.shape[1], linear.weight.shape[0], bias=linear.bias is not None,
                  device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        if (x.layout != torch.sparse_csr or torch.is_autocast_enabled(x.device.type)
                or (torch.is_grad_enabled() and self.weight.requires_grad)):
            return super().forward(x)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype)
        if self._wt_key != key:
            self._wt, self._wt_key = self.weight.detach().t().contiguous(), key
        # row i of x @ W^T = sum over its stored (j, v) of v * W^T[j]: a weighted embedding bag,
        # one kernel and no sparse-matrix setup (half the time of torch's CSR @ dense here)
        out = F.embedding_bag(x.col_indices(), self._wt, x.crow_indices(), mode="sum",
                              per_sample_weights=x.values(), include_last_offset=True)
        return out if self.bias is None else out.add_(self.bias)


def _conv(kind: str, in_channels: int, out_channels: int, last: bool, heads: int,
          attn_dropout: float) -> nn.Module:
    from torch_geometric.nn import GATConv, GCNConv, SAGEConv

    if kind == "gcn":
        # No `cached=True`: the same model must run on the observed graph in training and on
        # the full graph (or a k-hop subgraph) at inductive evaluation.
        conv = GCNConv(in_channels, out_channels)
        conv.lin = SparseInputLinear.like(conv.lin)  # same weight and init, same state_dict keys
        return conv
    if kind == "sage":
        return SAGEConv(in_channels, out_channels, aggr="mean")
    if last:  # one output head, as Velickovic et al. (2018) use on Cora and CiteSeer
        return GATConv(in_channels, out_channels, heads=1, concat=False, dropout=attn_dropout)
    if out_channels % heads:
        raise KdkitError(f"GAT hidden_channels={out_channels} is not divisible by heads={heads}")
    return GATConv(in_channels, out_channels // heads, heads=heads, dropout=attn_dropout)


class GNN(nn.Module):
    """A full-batch GNN node classifier: GCN (Kipf & Welling 2017), GraphSAGE (Hamilton et al.
    2017, mean aggregator) or GAT (Velickovic et al. 2018), from PyG layers.

    Layer ``l < L``: ``h = dropout(act(norm(conv_l(h, edge_index))))``; the activated output of
    the last hidden layer passes through ``embedding`` (before its dropout); layer ``L`` maps to
    class logits. Module names: ``convs.<l>``, ``norms.<l>``, ``embedding``.

    Args:
        conv: "gcn", "sage" or "gat".
        in_channels: node feature size.
        hidden_channels: width of every hidden layer (for GAT: all heads together).
        num_classes: number of output logits.
        num_layers: message-passing layers (= hops of neighbourhood each prediction reads).
        dropout: dropout on every hidden representation.
        input_dropout: dropout on the input features (Kipf & Welling use the hidden rate).
        norm: "none", "batch" or "layer" after each hidden layer.
        act: "relu", "elu" or "gelu".
        heads: attention heads of hidden GAT layers.
        attn_dropout: dropout on GAT attention coefficients.
    """

    needs_graph = True

    def __init__(self, conv: str, in_channels: int, hidden_channels: int, num_classes: int,
                 num_layers: int = 2, dropout: float = 0.5, input_dropout: float = 0.0,
                 norm: str = "none", act: str = "relu", heads: int = 8,
                 attn_dropout: float = 0.0):
        super().__init__()
        if conv not in CONVS:
            raise KdkitError(f"conv={conv!r} is not one of: {close_names(str(conv), CONVS)}")
        if num_layers < 1:
            raise KdkitError(f"num_layers must be >= 1, got {num_layers}")
        self.conv_type = conv
        self.num_layers = int(num_layers)
        widths = [in_channels] + [hidden_channels] * (num_layers - 1) + [num_classes]
        self.convs = nn.ModuleList(
            _conv(conv, a, b, last=(i == num_layers - 1), heads=heads, attn_dropout=attn_dropout)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
        )
        self.norms = nn.ModuleList(_norm(norm, hidden_channels) for _ in range(num_layers - 1))
        self.act = _act(act)
        self.input_dropout = FeatureDropout(input_dropout)
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Identity()

    @property
    def num_hops(self) -> int:
        """How many hops of neighbourhood one node's prediction depends on."""
        return self.num_layers

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        # dropout is skipped, not called, in eval: a module call costs microseconds, which
        # count when a deployed model answers a batch of new nodes in well under a millisecond
        h = self.input_dropout(x) if self.training else x
        if h.layout != torch.strided and self.conv_type == "sage":
            h = h.to_dense()  # SAGEConv aggregates raw features first, which needs dense rows
        for i, (conv, norm) in enumerate(zip(self.convs[:-1], self.norms)):
            h = self.act(norm(conv(h, edge_index)))
            if i == self.num_layers - 2:
                h = self.embedding(h)
            h = self.dropout(h) if self.training else h
        return self.convs[-1](h, edge_index)


class NodeMLP(nn.Module):
    """The graph-free student of GLNN (Zhang et al. 2022): each node is classified from its own
    features, so inference needs no neighbourhood fetching.

    Hidden layer: ``h = dropout(act(norm(linear(h))))``; the activated output of the last
    hidden layer passes through ``embedding`` (before its dropout); then a linear classifier.
    With ``num_layers=1`` the model is logistic regression and ``embedding`` is the input.
    Module names: ``layers.<l>``, ``norms.<l>``, ``embedding``.

    Args:
        in_channels: node feature size.
        hidden_channels: width of every hidden layer.
        num_classes: number of output logits.
        num_layers: linear layers in total (GLNN: 2 on Cora/CiteSeer).
        dropout: dropout on every hidden representation.
        input_dropout: dropout on the input features.
        norm: "none", "batch" or "layer" after each hidden linear layer.
        act: "relu", "elu" or "gelu".
    """

    needs_graph = False

    def __init__(self, in_channels: int, hidden_channels: int, num_classes: int,
                 num_layers: int = 2, dropout: float = 0.0, input_dropout: float = 0.0,
                 norm: str = "none", act: str = "relu"):
        super().__init__()
        if num_layers < 1:
            raise KdkitError(f"num_layers must be >= 1, got {num_layers}")
        widths = [in_channels] + [hidden_channels] * (num_layers - 1) + [num_classes]
        self.layers = nn.ModuleList(SparseInputLinear(a, b) if i == 0 else nn.Linear(a, b)
                                    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))
        self.norms = nn.ModuleList(_norm(norm, hidden_channels) for _ in range(num_layers - 1))
        self.act = _act(act)
        self.input_dropout = FeatureDropout(input_dropout)
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.input_dropout(x) if self.training else x  # (no dropout calls in eval, as GNN)
        if len(self.layers) == 1:
            h = self.embedding(h)
        for i, (layer, norm) in enumerate(zip(self.layers[:-1], self.norms)):
            h = self.act(norm(layer(h)))
            if i == len(self.layers) - 2:
                h = self.embedding(h)
            h = self.dropout(h) if self.training else h
        return self.layers[-1](h)
