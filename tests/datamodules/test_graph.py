import functools

import pytest
import torch
from torch_geometric.data import Data

from kdkit.datamodules.graph import GraphDataModule
from kdkit.errors import KdkitError
from tests.datamodules.fault_helpers import needs_non_root, one_line, truncate


def toy_graph(num_splits: int | None = None) -> list[Data]:
    """10 nodes on a ring (both directions), 3 classes; masks [10] or [10, k]."""
    n = 10
    src = torch.arange(n)
    ring = torch.stack([src, (src + 1) % n])
    edge_index = torch.cat([ring, ring.flip(0)], dim=1)
    x = torch.arange(n * 4, dtype=torch.float).view(n, 4) % 3
    train = torch.zeros(n, dtype=torch.bool)
    train[:3] = True
    val = torch.zeros(n, dtype=torch.bool)
    val[3:5] = True
    test = torch.zeros(n, dtype=torch.bool)
    test[5:] = True
    if num_splits:
        train, val, test = (torch.stack([m.roll(k) for k in range(num_splits)], 1)
                            for m in (train, val, test))
    return [Data(x=x, edge_index=edge_index, y=torch.arange(n) % 3,
                 train_mask=train, val_mask=val, test_mask=test)]


def test_transductive_batch_is_the_whole_graph():
    dm = GraphDataModule(toy_graph(), num_classes=3, num_features=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 1  # one step per epoch
    b = batches[0]
    assert b["x"].shape == (10, 4) and b["edge_index"].shape == (2, 20)
    torch.testing.assert_close(b["index"], torch.arange(10))
    assert b["train_mask"].tolist() == [True] * 3 + [False] * 7
    assert int(b["test_mask"].sum()) == 5
    # row-normalised features: each nonzero row sums to 1
    sums = b["x"].sum(1)
    raw = toy_graph()[0].x.sum(1)
    torch.testing.assert_close(sums[raw > 0], torch.ones(int((raw > 0).sum())))
    assert next(iter(dm.test_dataloader()))["x"] is b["x"]
    assert (dm.num_classes, dm.num_features, dm.num_train_samples) == (3, 4, 10)


def test_split_column_is_picked_from_multi_split_masks():
    dm = GraphDataModule(toy_graph(num_splits=3), split=2)
    dm.setup()
    assert dm.batches["train"]["train_mask"].nonzero().view(-1).tolist() == [2, 3, 4]
    with pytest.raises(KdkitError, match="3 splits"):
        GraphDataModule(toy_graph(num_splits=3), split=3).setup()
    with pytest.raises(KdkitError, match="one predefined split"):
        GraphDataModule(toy_graph(), split=1).setup()


def test_inductive_hides_held_out_nodes_and_their_edges():
    dm = GraphDataModule(toy_graph(), setting="inductive", inductive_rate=0.4, split_seed=3)
    dm.setup("fit")
    obs, full = dm.batches["train"], dm.batches["test"]
    held = full["test_mask"].nonzero().view(-1)
    assert held.numel() == 2  # int(5 test nodes * 0.4)
    assert set(held.tolist()) <= set(range(5, 10))
    # observed graph: every other node, relabelled, with the original ids in `index`
    assert sorted(obs["index"].tolist()) == sorted(set(range(10)) - set(held.tolist()))
    assert obs["x"].shape[0] == 8 and dm.batches["val"] is obs
    original_edges = obs["index"][obs["edge_index"]]
    assert not torch.isin(original_edges, held).any()  # no edge touches a held-out node
    ring = toy_graph()[0].edge_index
    keep = ~torch.isin(ring, held).any(0)
    assert original_edges.shape[1] == int(keep.sum())
    torch.testing.assert_close(obs["x"], full["x"][obs["index"]])
    # test batch: the full graph; held-out nodes are the test mask, the rest the observed tests
    assert full["x"].shape[0] == 10 and full["edge_index"].shape[1] == 20
    assert full["observed_test_mask"].nonzero().view(-1).tolist() == sorted(
        set(range(5, 10)) - set(held.tolist()))
    assert obs["test_mask"].sum() == 3 and obs["train_mask"].sum() == 3
    # the draw is reproducible and depends on the seed
    again = GraphDataModule(toy_graph(), setting="inductive", inductive_rate=0.4, split_seed=3)
    again.setup()
    assert again.batches["test"]["test_mask"].equal(full["test_mask"])
    draws = set()
    for seed in range(6):
        other = GraphDataModule(toy_graph(), setting="inductive", inductive_rate=0.4, split_seed=seed)
        other.setup()
        draws.add(tuple(other.batches["test"]["test_mask"].nonzero().view(-1).tolist()))
    assert len(draws) > 1


@pytest.mark.parametrize("setting", ["transductive", "inductive"])
def test_sparse_features_hold_the_same_values(setting):
    dense = GraphDataModule(toy_graph(), setting=setting, inductive_rate=0.4)
    sparse = GraphDataModule(toy_graph(), setting=setting, inductive_rate=0.4, sparse_features=True)
    dense.setup()
    sparse.setup()
    for stage in ("train", "test"):
        x = sparse.batches[stage]["x"]
        assert x.layout == torch.sparse_csr
        torch.testing.assert_close(x.to_dense(), dense.batches[stage]["x"])
    assert sparse.num_features == 4


def test_example_batch_query_is_test_nodes():
    dm = GraphDataModule(toy_graph(), setting="inductive", inductive_rate=0.4)
    b = dm.example_batch(n=5)
    assert b["x"].shape[0] == 10
    assert b["query"].tolist() == b["test_mask"].nonzero().view(-1).tolist()  # 2 < 5 held out
    assert "query" not in dm.example_batch()


def test_user_errors_are_one_line():
    with pytest.raises(KdkitError, match="num_classes=7"):
        GraphDataModule(toy_graph(), num_classes=7).setup()
    with pytest.raises(KdkitError, match="setting"):
        GraphDataModule(toy_graph(), setting="semi")
    no_masks = [Data(x=torch.ones(3, 2), edge_index=EMPTY, y=torch.zeros(3, dtype=torch.long))]
    with pytest.raises(KdkitError, match="train_mask"):
        GraphDataModule(no_masks).setup()

    def offline():
        raise ConnectionError("no network")

    with pytest.raises(KdkitError, match="KDKIT_DATA_DIR"):
        GraphDataModule(offline, raw_src="/nonexistent/planetoid/Cora/raw").prepare_data()


EMPTY = torch.zeros(2, 0, dtype=torch.long)


def test_real_cora_from_the_offline_copy(data_dir, tmp_path):
    from torch_geometric.datasets import Planetoid

    raw_src = data_dir / "planetoid" / "Cora" / "raw"
    raw_dst = tmp_path / "Cora" / "raw"
    dataset = functools.partial(Planetoid, root=str(tmp_path), name="Cora")
    dm = GraphDataModule(dataset, raw_src=str(raw_src), raw_dst=str(raw_dst),
                         num_classes=7, num_features=1433)
    dm.prepare_data()
    assert sorted(p.name for p in raw_dst.iterdir()) == sorted(p.name for p in raw_src.iterdir())
    dm.setup("fit")
    b = dm.batches["train"]
    assert b["x"].shape == (2708, 1433) and b["edge_index"].shape == (2, 10556)
    assert [int(b[k].sum()) for k in ("train_mask", "val_mask", "test_mask")] == [140, 500, 1000]
    assert dm.static_for_teacher


# ---- damaged files: one line naming the file and saying what to do ------------------------------
def cora_module(tmp_path) -> GraphDataModule:
    """Cora read from tmp_path/data/Cora/raw, copied and processed into tmp_path/cache."""
    from torch_geometric.datasets import Planetoid

    root = tmp_path / "cache"
    return GraphDataModule(functools.partial(Planetoid, root=str(root), name="Cora"),
                           raw_src=str(tmp_path / "data" / "Cora" / "raw"), raw_dst=str(root / "Cora" / "raw"))


def cora_copy(data_dir, tmp_path, damage=None) -> GraphDataModule:
    """``cora_module`` over a copy of the real Cora raw files; ``damage``: (file name, callable)
    applied to that copy."""
    import shutil

    raw_src = tmp_path / "data" / "Cora" / "raw"
    shutil.copytree(data_dir / "planetoid" / "Cora" / "raw", raw_src)
    if damage:
        name, fn = damage
        fn(raw_src / name)
    return cora_module(tmp_path)


@pytest.mark.parametrize("name, damage, reason", [
    ("ind.cora.x", truncate, "UnpicklingError"),
    ("ind.cora.graph", lambda p: p.write_bytes(b"\x80\x04garbage" * 50), "UnpicklingError"),
    ("ind.cora.test.index", lambda p: p.write_bytes(bytes(range(128, 256))), "UnicodeDecodeError"),
])
def test_a_damaged_raw_file_is_named(data_dir, tmp_path, name, damage, reason):
    dm = cora_copy(data_dir, tmp_path, (name, damage))
    with pytest.raises(KdkitError) as err:
        dm.prepare_data()
    copy = tmp_path / "cache" / "Cora" / "raw" / name
    assert reason in one_line(err, f"graph data file {copy} is unreadable", "delete it",
                              str(tmp_path / "data" / "Cora" / "raw" / name))


def test_an_empty_raw_file_is_named(data_dir, tmp_path):
    dm = cora_copy(data_dir, tmp_path, ("ind.cora.y", lambda p: p.write_bytes(b"")))
    with pytest.raises(KdkitError) as err:
        dm.prepare_data()
    src = tmp_path / "data" / "Cora" / "raw" / "ind.cora.y"
    one_line(err, f"graph raw file {src} is unreadable (empty file)", "re-download or replace it")
    assert not (tmp_path / "cache" / "Cora" / "raw" / "ind.cora.y").exists()  # not copied


def test_a_damaged_processed_file_is_named(data_dir, tmp_path):
    cora_copy(data_dir, tmp_path).prepare_data()
    processed = tmp_path / "cache" / "Cora" / "processed" / "data.pt"
    truncate(processed)
    with pytest.raises(KdkitError) as err:
        cora_module(tmp_path).setup()
    one_line(err, processed, "delete it, and the raw files are processed again")


@pytest.mark.parametrize("data_dir_state", ["missing", "empty"])
def test_a_warm_cache_warns_when_the_data_dir_is_gone(data_dir, tmp_path, capsys, data_dir_state):
    import shutil

    cora_copy(data_dir, tmp_path).prepare_data()  # the cache is warm
    raw_src = tmp_path / "data" / "Cora" / "raw"
    shutil.rmtree(raw_src)  # KDKIT_DATA_DIR now points at nothing
    if data_dir_state == "empty":
        raw_src.mkdir()
    capsys.readouterr()
    dm = cora_module(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.batches["train"]["x"].shape[0] == 2708  # served from the cache
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert str(raw_src) in warnings[0] and "KDKIT_DATA_DIR" in warnings[0]
    assert str(tmp_path / "cache" / "Cora" / "raw") in warnings[0]


def test_no_warning_while_the_data_dir_is_there(data_dir, tmp_path, capsys):
    dm = cora_copy(data_dir, tmp_path)
    dm.prepare_data()
    cora_module(tmp_path).setup()  # a warm cache, and the data too
    assert "warning" not in capsys.readouterr().err


@needs_non_root
def test_an_unreadable_raw_file_is_named(data_dir, tmp_path):
    dm = cora_copy(data_dir, tmp_path, ("ind.cora.tx", lambda p: p.chmod(0)))
    with pytest.raises(KdkitError) as err:
        dm.prepare_data()
    one_line(err, tmp_path / "data" / "Cora" / "raw" / "ind.cora.tx", "check its permissions")


def test_a_directory_where_a_raw_file_belongs(data_dir, tmp_path):
    dm = cora_copy(data_dir, tmp_path)
    copy = tmp_path / "cache" / "Cora" / "raw" / "ind.cora.ty"
    copy.mkdir(parents=True)  # so kdkit does not copy it, and PyG finds a folder there
    with pytest.raises(KdkitError) as err:
        dm.prepare_data()
    one_line(err, f"graph data file {copy}", "IsADirectoryError", "it is a directory")
