import numpy as np
import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.features import FeatureTap
from kdkit.models.gnn import GNN, NodeMLP, SparseInputLinear

# A 3-node path 0 - 1 - 2, both directions.
EDGES = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_gnn_shapes_embedding_and_hops(conv):
    torch.manual_seed(0)
    model = GNN(conv, in_channels=5, hidden_channels=8, num_classes=3, num_layers=3, heads=2).eval()
    tap = FeatureTap(model, ["embedding"])
    out = model(torch.randn(3, 5), EDGES)
    assert out.shape == (3, 3)
    assert tap.pop()["embedding"].shape == (3, 8)
    assert model.needs_graph and model.num_hops == 3


def test_gcn_one_layer_is_the_normalised_propagation():
    # GCN layer with identity weights: D^-1/2 (A + I) D^-1/2 X, computed here with numpy.
    model = GNN("gcn", in_channels=2, hidden_channels=4, num_classes=2, num_layers=1).eval()
    conv = model.convs[0]
    with torch.no_grad():
        conv.lin.weight.copy_(torch.eye(2))
        conv.bias.zero_()
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    a = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=float)  # A + I
    d = np.diag(1 / np.sqrt(a.sum(1)))
    expected = d @ a @ d @ x
    got = model(torch.tensor(x, dtype=torch.float32), EDGES)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5)


def test_gnn_output_depends_on_edges_and_mlp_does_not_take_them():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    gnn = GNN("sage", 4, 8, 2).eval()
    assert not torch.allclose(gnn(x, EDGES), gnn(x, EDGES[:, :2]))
    mlp = NodeMLP(4, 8, 2)
    assert mlp.needs_graph is False
    with pytest.raises(TypeError):
        mlp(x, EDGES)


def test_mlp_embedding_is_the_activated_last_hidden_layer():
    torch.manual_seed(0)
    model = NodeMLP(4, 6, 3, num_layers=2, dropout=0.9).eval()  # eval: dropout is off
    tap = FeatureTap(model, ["embedding"])
    x = torch.randn(5, 4)
    logits = model(x)
    hidden = torch.relu(x @ model.layers[0].weight.T + model.layers[0].bias)
    torch.testing.assert_close(tap.pop()["embedding"], hidden)
    torch.testing.assert_close(logits, hidden @ model.layers[1].weight.T + model.layers[1].bias)


def test_mlp_depth_norms_and_logistic_regression():
    deep = NodeMLP(4, 6, 3, num_layers=4, norm="layer")
    assert len(deep.layers) == 4 and all(isinstance(n, torch.nn.LayerNorm) for n in deep.norms)
    assert all(isinstance(n, torch.nn.BatchNorm1d) for n in NodeMLP(4, 6, 3, norm="batch").norms)
    linear = NodeMLP(4, 6, 3, num_layers=1)
    tap = FeatureTap(linear, ["embedding"])
    x = torch.randn(2, 4)
    linear(x)
    torch.testing.assert_close(tap.pop()["embedding"], x)  # the only representation: the input


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat", "mlp"])
def test_sparse_csr_features_give_the_dense_result(conv):
    torch.manual_seed(0)
    x = (torch.rand(12, 9) < 0.2).float()
    edges = torch.randint(0, 12, (2, 30))
    if conv == "mlp":
        model = NodeMLP(9, 8, 3, input_dropout=0.5)
        run = lambda inp: model(inp)  # noqa: E731
    else:
        model = GNN(conv, 9, 8, 3, input_dropout=0.5, heads=2)
        run = lambda inp: model(inp, edges)  # noqa: E731
    model.eval()
    torch.testing.assert_close(run(x.to_sparse_csr()), run(x))
    model.train()  # input dropout keeps the layout, zeroes about p of the stored values
    dropped = model.input_dropout(x.to_sparse_csr())
    assert dropped.layout == torch.sparse_csr
    kept = dropped.values() != 0
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(dropped.values()[kept], torch.full((int(kept.sum()),), 2.0))
    run(x.to_sparse_csr()).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_names_raise_one_line_errors():
    with pytest.raises(KdkitError, match="gcn"):
        GNN("gnc", 4, 8, 2)
    with pytest.raises(KdkitError, match="batch"):
        NodeMLP(4, 8, 2, norm="bach")
    with pytest.raises(KdkitError, match="divisible"):
        GNN("gat", 4, 10, 2, heads=4)
    with pytest.raises(KdkitError, match="num_layers"):
        NodeMLP(4, 8, 2, num_layers=0)


def test_sparse_input_linear_inference_path_matches_and_tracks_weight_updates():
    torch.manual_seed(0)
    x = (torch.rand(16, 40) < 0.1).float() * torch.randn(16, 40)
    x[3] = 0  # a node without features: its bag is empty, its output the bias
    layer = SparseInputLinear(40, 5)
    with torch.no_grad():
        fast = layer(x.to_sparse_csr())
        torch.testing.assert_close(fast, x @ layer.weight.t() + layer.bias)
        assert layer._wt is not None  # the cached W^T path ran
        layer.weight.mul_(2.0)        # an in-place update (optimizer step) invalidates the cache
        torch.testing.assert_close(layer(x.to_sparse_csr()), x @ layer.weight.t() + layer.bias)
        layer.load_state_dict({"weight": torch.ones(5, 40), "bias": torch.zeros(5)})
        torch.testing.assert_close(layer(x.to_sparse_csr()), x.sum(1, keepdim=True).expand(16, 5))
        torch.testing.assert_close(layer(x.to_sparse_csr())[3], torch.zeros(5))
    out = layer(x.to_sparse_csr())  # with autograd: nn.Linear's own path, gradients flow
    out.sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(5, 40))


def test_gcn_first_layer_keeps_pyg_init_and_state_dict_keys():
    from torch_geometric.nn import GCNConv

    torch.manual_seed(3)
    plain = GCNConv(9, 3)
    torch.manual_seed(3)
    model = GNN("gcn", 9, 8, 3, num_layers=1)
    conv = model.convs[0]
    assert isinstance(conv.lin, SparseInputLinear)
    assert set(conv.state_dict()) == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(conv.state_dict()[k], v)
    x = (torch.rand(3, 9) < 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(model(x.to_sparse_csr(), EDGES), plain(x, EDGES))
