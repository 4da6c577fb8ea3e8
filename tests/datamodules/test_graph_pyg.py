"""``data=pyg``: any torch_geometric node-classification dataset, counts read from the data."""

import pytest
import torch

from kdkit.datamodules.graph import GraphDataModule
from kdkit.errors import KdkitError
from tests.datamodules.pyg_fixture import TinyNodes

TARGET = "tests.datamodules.pyg_fixture.TinyNodes"


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    message = str(err.value)
    assert isinstance(err.value, KdkitError) and "\n" not in message, message
    for w in words:
        assert w in message, message
    return message


def module(tmp_path, split=None, **dataset) -> GraphDataModule:
    """The datamodule over a TinyNodes config node, as conf/data/pyg.yaml hands it over."""
    node = {"_target_": TARGET, "root": str(tmp_path / "tiny"), **dataset}
    return GraphDataModule(node, split=split, normalize_features=False)


def test_counts_are_read_from_the_data(tmp_path):
    dm = module(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_classes, dm.num_features, dm.num_train_samples) == (3, 5, 60)
    data = TinyNodes(str(tmp_path / "tiny"))[0]
    for key in ("train_mask", "val_mask", "test_mask"):
        assert dm.batches["train"][key].equal(data[key])
    torch.testing.assert_close(dm.batches["train"]["x"], data.x)  # no normalisation asked


def test_a_dataset_object_works_too(tmp_path):
    dm = GraphDataModule(TinyNodes(str(tmp_path)))
    assert (dm.num_classes, dm.num_features) == (3, 5)


@pytest.mark.parametrize("split", [0, 2])
def test_split_i_is_column_i_of_the_masks(tmp_path, split):
    dm = module(tmp_path, split=split, num_splits=3)
    dm.setup()
    data = TinyNodes(str(tmp_path / "tiny"), num_splits=3)[0]
    assert data.train_mask.shape == (60, 3)
    for key in ("train_mask", "val_mask", "test_mask"):
        assert dm.batches["train"][key].equal(data[key][:, split])
    assert not dm.batches["train"]["train_mask"].equal(data.train_mask[:, 1])


def test_no_masks_draws_a_seeded_random_split(tmp_path):
    def draw(seed):
        dm = GraphDataModule({"_target_": TARGET, "root": str(tmp_path), "masks": False},
                             num_train_per_class=4, num_val=0.25, num_test=12, split_seed=seed)
        dm.setup()
        return [dm.batches["train"][k] for k in ("train_mask", "val_mask", "test_mask")]

    train, val, test = draw(0)
    y = TinyNodes(str(tmp_path), masks=False)[0].y
    assert [int((y[train] == c).sum()) for c in range(3)] == [4, 4, 4]
    assert (int(val.sum()), int(test.sum())) == (15, 12)
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()
    assert all(a.equal(b) for a, b in zip(draw(0), (train, val, test)))  # reproducible
    assert not draw(1)[0].equal(train)  # and seeded


def test_bad_split_is_one_line(tmp_path):
    with pytest.raises(KdkitError) as err:
        module(tmp_path, split=3, num_splits=3).setup()
    one_line(err, "data.split=3", "3 splits", "data.split=0..2")
    with pytest.raises(KdkitError) as err:
        module(tmp_path, split=None, num_splits=3).setup()
    one_line(err, "ships 3 splits", "data.split=0..2")
    with pytest.raises(KdkitError) as err:
        module(tmp_path, split=1).setup()
    one_line(err, "data.split=1", "one predefined split", "data.split=null")
    with pytest.raises(KdkitError) as err:
        module(tmp_path, split=0, masks=False).setup()
    one_line(err, "ships no split", "data.split=null")


def test_several_graphs_or_multi_label_are_refused(tmp_path):
    with pytest.raises(KdkitError) as err:
        module(tmp_path, num_graphs=2).setup()
    one_line(err, "TinyNodes holds 2 graphs", "one graph", "single-graph dataset")
    with pytest.raises(KdkitError) as err:
        module(tmp_path, multilabel=True).setup()
    one_line(err, "multi-label", "[60, 3]", "single-label")
    from torch_geometric.data import HeteroData

    hetero = HeteroData()
    hetero["paper"].x, hetero["author"].x = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(KdkitError) as err:
        GraphDataModule([hetero]).setup()
    one_line(err, "heterogeneous", "paper", "homogeneous")


def test_config_mistakes_are_one_line(tmp_path):
    with pytest.raises(KdkitError) as err:
        GraphDataModule({"_target_": "???", "root": "x"}).setup()
    one_line(err, "data.dataset._target_ is required", "torch_geometric.datasets")
    with pytest.raises(KdkitError) as err:
        GraphDataModule({"_target_": TARGET, "root": "???"}).setup()
    one_line(err, "data.dataset.root is required", "data.dataset.root=")
    with pytest.raises(KdkitError) as err:
        GraphDataModule({"_target_": "torch_geometric.datasets.NoSuchSet", "root": "x"}).setup()
    one_line(err, "NoSuchSet cannot be imported")
    with pytest.raises(KdkitError) as err:
        GraphDataModule({"_target_": "torch_geometric.datasets.WikipediaNetwork",
                         "root": str(tmp_path)}).setup()
    one_line(err, "WikipediaNetwork needs name", "+data.dataset.name=")
    with pytest.raises(KdkitError) as err:
        module(tmp_path, colour="red").setup()
    one_line(err, "TinyNodes takes no colour", "~data.dataset.colour")
    with pytest.raises(KdkitError) as err:
        GraphDataModule({"_target_": TARGET, "root": str(tmp_path), "masks": False},
                        num_val=1.5).setup()
    one_line(err, "data.num_val=1.5", "fraction in (0, 1)")
    with pytest.raises(KdkitError) as err:
        GraphDataModule({"_target_": TARGET, "root": str(tmp_path), "masks": False}).setup()
    one_line(err, "random split of its 60 labelled nodes", "val_mask and test_mask empty",
             "data.num_val=0.2")


def test_the_command_line_composes_and_passes_the_cli_check(tmp_path):
    from kdkit.cli_checks import check_argv
    from kdkit.compose import compose

    line = ["experiment=cora_glnn", "data=pyg", f"data.dataset._target_={TARGET}",
            f"data.dataset.root={tmp_path}"]
    assert check_argv(line) is None
    cfg = compose(line)
    assert cfg.data.num_classes is None and cfg.data.num_features is None
    assert cfg.data.split is None and cfg.data.dataset.root == str(tmp_path)


def test_end_to_end_glnn_on_a_pyg_dataset(tmp_path):
    from kdkit.compose import compose
    from kdkit.pipeline import run

    cfg = compose(["experiment=cora_glnn", "data=pyg", f"data.dataset._target_={TARGET}",
                   f"data.dataset.root={tmp_path / 'data'}", "+data.dataset.num_splits=3",
                   "data.split=1", "trainer.max_epochs=2", "logger=none", "callbacks=none",
                   "trainer.enable_progress_bar=false", "report.latency_batch_size=8",
                   "task.latency_repeats=1"], output_dir=str(tmp_path / "run"))
    results = run(cfg)
    assert set(results) == {"teacher", "baseline", "student"}
    for stage, metrics in results.items():
        assert 0.0 <= metrics["test/acc"] <= 1.0, (stage, metrics)
    assert (cfg.data.num_classes, cfg.data.num_features) == (3, 5)  # read from the data
