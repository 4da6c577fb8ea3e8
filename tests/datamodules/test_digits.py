"""Digits datamodule: split sizes, stratification, determinism, values, the batch schema."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from kdkit.datamodules.digits import DigitsDataModule
from kdkit.errors import KdkitError
from tests.datamodules.fault_helpers import one_line

CONF = Path(__file__).resolve().parents[2] / "conf" / "data" / "digits.yaml"


@pytest.fixture(scope="module")
def dm():
    module = DigitsDataModule(batch_size=64, seed=3)
    module.setup()
    return module


@pytest.fixture(scope="module")
def raw():
    return load_digits()


def test_split_sizes_partition_the_dataset(dm):
    idx = dm.split_indices
    assert [len(idx[s]) for s in ("train", "val", "test")] == [1079, 359, 359]
    everything = np.concatenate([idx["train"], idx["val"], idx["test"]])
    assert sorted(everything.tolist()) == list(range(1797))  # disjoint, and nothing left out
    assert (dm.num_train_samples, dm.num_classes) == (1079, 10)


def test_split_is_stratified(dm, raw):
    total = Counter(raw.target.tolist())
    for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = Counter(raw.target[dm.split_indices[split]].tolist())
        for digit, n in total.items():
            assert abs(counts[digit] - share * n) <= 1.0, (split, digit, counts[digit], share * n)


def test_split_is_deterministic_and_seeded(dm):
    again = DigitsDataModule()
    again.setup()
    other = DigitsDataModule(split_seed=1)
    other.setup()
    for split in ("train", "val", "test"):
        assert np.array_equal(again.split_indices[split], dm.split_indices[split])
    assert not np.array_equal(other.split_indices["test"], dm.split_indices["test"])


def test_images_are_the_raw_digits_scaled_to_unit_range(dm, raw):
    sample = dm.test_set[5]
    source = dm.split_indices["test"][5]
    assert sample["image"].shape == (1, 8, 8) and sample["image"].dtype == torch.float32
    np.testing.assert_allclose(sample["image"][0].numpy(), raw.images[source] / 16.0)
    assert sample["label"].item() == raw.target[source]
    images = dm.train_set.images
    assert images.min() == 0.0 and images.max() == 1.0


def test_config_statistics_are_those_of_the_train_split(dm):
    conf = OmegaConf.load(CONF)
    images = dm.train_set.images.double()
    assert conf.mean == [round(images.mean().item(), 4)]
    assert conf.std == [round(images.std().item(), 4)]
    assert (conf.num_classes, conf.in_channels, conf.image_size, conf.in_features) == (10, 1, 8, 64)


def test_loaders_yield_the_batch_schema(dm):
    batches = list(dm.train_dataloader())
    assert len(batches) == 1079 // 64  # the remainder is dropped: equal shapes on every rank
    b = batches[0]
    assert set(b) == {"image", "label", "index"}
    assert b["image"].shape == (64, 1, 8, 8) and b["image"].dtype == torch.float32
    assert b["label"].dtype == b["index"].dtype == torch.long
    # "index" addresses the training set: the sample at that index is the batch's image
    torch.testing.assert_close(b["image"][7], dm.train_set[int(b["index"][7])]["image"])
    val = list(dm.val_dataloader())
    assert sum(len(v["label"]) for v in val) == 359
    assert torch.equal(torch.cat([v["index"] for v in val]), torch.arange(359))  # no shuffle


def test_training_order_is_shuffled_by_the_seed():
    def first_indices(seed):
        module = DigitsDataModule(batch_size=32, seed=seed)
        module.setup()
        return [b["index"] for _, b in zip(range(2), module.train_dataloader())]

    a, b, c = first_indices(0), first_indices(0), first_indices(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], torch.arange(32))


def test_example_batch_is_the_first_train_samples(dm):
    batch = dm.example_batch(n=4)
    assert torch.equal(batch["index"], torch.arange(4))
    torch.testing.assert_close(batch["image"], dm.train_set.images[:4])
    assert dm.static_for_teacher


def test_bad_configuration_is_refused():
    with pytest.raises(KdkitError, match="num_classes=7 but the data has 10"):
        DigitsDataModule(num_classes=7).setup()
    with pytest.raises(KdkitError, match="1x8x8"):
        DigitsDataModule(in_features=784)
    with pytest.raises(KdkitError, match="leave no room"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5).setup()
    with pytest.raises(KdkitError, match="batch_size=2000 exceeds the 1079"):
        DigitsDataModule(batch_size=2000).train_dataloader()


def test_an_unreadable_sklearn_data_file_is_named(monkeypatch):
    import sklearn.datasets

    def damaged():  # what gzip raises on a truncated digits.csv.gz
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(sklearn.datasets, "load_digits", damaged)
    with pytest.raises(KdkitError) as err:
        DigitsDataModule().setup()
    path = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    assert path.is_file()
    assert "EOFError" in one_line(err, path, "reinstall scikit-learn")


def test_batch_size_zero_is_refused():
    with pytest.raises(KdkitError) as err:
        DigitsDataModule(batch_size=0)
    one_line(err, "data.batch_size=0 must be a whole number >= 1")
