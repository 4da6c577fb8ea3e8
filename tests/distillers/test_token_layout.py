"""Token grids <-> maps: the reshapes by hand, the adapters between layouts, and their errors."""

import pytest
import torch
from torch import nn

from kdkit.distillers.adapters import MapToTokens, TokenGrid, TokensToMap, make_adapter
from kdkit.distillers.at import AT, at_loss
from kdkit.distillers.base import DistillContext
from kdkit.distillers.fitnet import FitNet
from kdkit.distillers.token_layout import as_map, check_prefix, fitting_prefixes, map_to_tokens, tokens_to_map
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def numbered_tokens(b=2, prefix=1, h=2, w=3, d=4):
    """tokens[b, prefix + i*w + j, c] = 1000 b + 100 c + 10 i + j; prefix tokens are -1."""
    x = -torch.ones(b, prefix + h * w, d)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                for c in range(d):
                    x[n, prefix + i * w + j, c] = 1000 * n + 100 * c + 10 * i + j
    return x


def test_tokens_to_map_by_hand():
    m = tokens_to_map(numbered_tokens(), 1, (2, 3))
    assert m.shape == (2, 4, 2, 3)
    for n in range(2):
        for c in range(4):
            for i in range(2):
                for j in range(3):
                    assert m[n, c, i, j].item() == 1000 * n + 100 * c + 10 * i + j


def test_map_to_tokens_inverts_the_grid():
    x = numbered_tokens(prefix=0)
    assert torch.equal(map_to_tokens(tokens_to_map(x, 0, (2, 3))), x)
    m = torch.arange(24.0).view(1, 2, 3, 4)
    t = map_to_tokens(m)
    assert t.shape == (1, 12, 2) and t[0, 5, 1].item() == m[0, 1, 1, 1].item()  # row 1, column 1


def test_prefix_counts_that_fit_and_errors():
    assert fitting_prefixes(65) == [1] and fitting_prefixes(66) == [2] and fitting_prefixes(64) == [0]
    assert check_prefix((2, 66, 8), 2, "w", "student", "blocks.3") == (8, 8)
    with pytest.raises(KdkitError, match=r"\(65, 8\).*student_prefix_tokens.*\[1\]"):
        check_prefix((2, 65, 8), None, "fitnet", "student", "blocks.3")
    with pytest.raises(KdkitError, match=r"prefix_tokens=2 leaves 63 patch tokens.*\[1\]"):
        check_prefix((2, 65, 8), 2, "fitnet", "student", "blocks.3")
    with pytest.raises(KdkitError, match="neither a map"):
        as_map(torch.zeros(2, 5), 0, "at", "student", "fc")


def test_tokens_to_map_adapter_is_reshape_then_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 16, 6)  # CLS + 4x4 patches, width 6
    a = make_adapter(x.shape, (2, 5, 2, 2), "fitnet", 1, None)
    assert isinstance(a, TokensToMap)
    a.eval()
    grid = x[:, 1:].transpose(1, 2).reshape(2, 6, 4, 4)  # by hand
    pooled = torch.nn.functional.avg_pool2d(grid, 2)
    expected = a.map.bn(torch.einsum("oc,bchw->bohw", a.map.conv.weight[:, :, 0, 0], pooled))
    assert torch.allclose(a(x), expected, atol=1e-6)
    t = torch.randn(2, 5, 2, 2)
    assert a.target(t) is t


@pytest.mark.parametrize("layout", ["tokens", "channels_last"])
def test_conv_adapter_gradients_keep_the_weights_layout(layout):
    """Under DDP a gradient in another layout than its parameter is copied into the bucket with a
    warning; a map read from tokens gave the 1x1 conv a channels_last gradient at batch 32."""
    torch.manual_seed(0)
    adapter = TokensToMap(1, (8, 8), 16, 8, (8, 8))
    tokens = torch.randn(32, 1 + 64, 16)
    if layout == "tokens":
        loss = adapter(tokens).pow(2).mean()
    else:
        grid = tokens_to_map(tokens, 1, (8, 8)).contiguous(memory_format=torch.channels_last)
        loss = adapter.map(grid).pow(2).mean()
    loss.backward()
    for name, p in adapter.named_parameters():
        assert p.grad.stride() == p.stride(), name


def test_map_to_tokens_adapter_compares_patch_tokens():
    torch.manual_seed(1)
    m = torch.randn(2, 3, 4, 4)  # CNN student map
    t = torch.randn(2, 2 + 4, 7)  # ViT teacher: CLS + dist token + 2x2 patches
    a = make_adapter(m.shape, t.shape, "fitnet", None, 2)
    assert isinstance(a, MapToTokens)
    a.eval()
    out = a(m)
    assert out.shape == (2, 4, 7)
    pooled = torch.nn.functional.avg_pool2d(m, 2)
    conv = a.map.bn(torch.einsum("oc,bchw->bohw", a.map.conv.weight[:, :, 0, 0], pooled))
    for i in range(2):
        for j in range(2):
            assert torch.allclose(out[:, i * 2 + j], conv[:, :, i, j], atol=1e-6)
    assert torch.equal(a.target(t), t[:, 2:])


def test_token_grid_adapter_resamples_to_the_teacher_grid():
    torch.manual_seed(2)
    s = torch.randn(1, 1 + 16, 3)  # 4x4 student grid
    t = torch.randn(1, 1 + 4, 5)  # 2x2 teacher grid
    a = make_adapter(s.shape, t.shape, "trg", 1, 1)
    assert isinstance(a, TokenGrid)
    out = a(s)
    proj = a.linear(s[:, 1:])  # [1, 16, 5]
    for i in range(2):
        for j in range(2):
            cells = [proj[0, (2 * i + di) * 4 + 2 * j + dj] for di in (0, 1) for dj in (0, 1)]
            assert torch.allclose(out[0, 2 * i + j], torch.stack(cells).mean(0), atol=1e-6)
    assert torch.equal(a.target(t), t[:, 1:])
    # same grid, other prefix (a distillation-token student, a CLS-only teacher): no resampling
    b = make_adapter((1, 2 + 4, 3), t.shape, "trg", 2, 1)
    s2 = torch.randn(1, 6, 3)
    assert torch.allclose(b(s2), b.linear(s2[:, 2:]))


def test_equal_length_tokens_keep_the_linear_adapter():
    a = make_adapter((2, 17, 6), (2, 17, 8), "fitnet")
    assert isinstance(a.linear, nn.Linear) and a(torch.zeros(2, 17, 6)).shape == (2, 17, 8)


def test_fitnet_cnn_to_vit_layouts():
    torch.manual_seed(3)
    s = Outputs(features={"layer2": torch.randn(2, 4, 8, 8)})
    t = Outputs(features={"blocks.1": torch.randn(2, 1 + 16, 6)})
    d = FitNet(student_feature="layer2", teacher_feature="blocks.1", teacher_prefix_tokens=1)
    d.build(s, t, DistillContext())
    loss = d(s, t, {})["loss"]
    expected = (d.adapter(s.features["layer2"]) - t.features["blocks.1"][:, 1:]).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fitnet_without_adapter_names_both_layouts():
    s = Outputs(features={"blocks.1": torch.zeros(2, 17, 6)})
    t = Outputs(features={"layer2": torch.zeros(2, 6, 4, 4)})
    d = FitNet(student_feature="blocks.1", teacher_feature="layer2", adapter=False)
    with pytest.raises(KdkitError, match=r"\(17, 6\).*\(6, 4, 4\).*student tokens, teacher a map.*adapter: true"):
        d.build(s, t, DistillContext())


def test_fitnet_tokens_without_prefix_say_what_fits():
    s = Outputs(features={"blocks.1": torch.zeros(2, 17, 6)})
    t = Outputs(features={"layer2": torch.zeros(2, 6, 4, 4)})
    with pytest.raises(KdkitError, match=r"fitnet\.student_prefix_tokens.*\[1, 8\]"):
        FitNet(student_feature="blocks.1", teacher_feature="layer2").build(s, t, DistillContext())


def test_at_reads_tokens_as_their_patch_map():
    torch.manual_seed(4)
    tokens = torch.randn(2, 2 + 16, 5)  # CLS + dist token + 4x4
    cnn = torch.randn(2, 3, 4, 4)
    d = AT(pairs=[["blocks.0", "layer1"]], student_prefix_tokens=2)
    got = d(Outputs(features={"blocks.0": tokens}), Outputs(features={"layer1": cnn}), {})["loss"]
    by_hand = tokens[:, 2:].transpose(1, 2).reshape(2, 5, 4, 4)
    assert got.item() == pytest.approx(at_loss(by_hand, cnn).item(), rel=1e-6)
    with pytest.raises(KdkitError, match="at.student_prefix_tokens"):
        AT(pairs=[["blocks.0", "layer1"]])(Outputs(features={"blocks.0": tokens}),
                                           Outputs(features={"layer1": cnn}), {})


def test_context_gives_submodules_by_name():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    ctx = DistillContext(models={"student": net})
    assert ctx.module("student", "0", "cskd") is net[0]
    with pytest.raises(KdkitError, match=r"'head' is not a module of the student.*close valid names"):
        ctx.module("student", "head", "cskd")
    with pytest.raises(KdkitError, match="needs the teacher network"):
        ctx.module("teacher", "fc", "cskd")
