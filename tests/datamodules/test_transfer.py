"""Transfer views: which samples keep their label, what each stage's view serves, unlabelled pools."""

import tarfile

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from kdkit.datamodules.digits import DigitsDataModule
from kdkit.datamodules.transfer import TrainView, build_view, labeled_rows, load_unlabeled_images
from kdkit.errors import KdkitError
from kdkit.labels import UNLABELED


def test_labeled_rows_are_stratified_seeded_and_sized():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])  # 100 samples, unbalanced classes
    rows = labeled_rows(labels, fraction=0.2, count=None, seed=0)
    assert len(rows) == 20 and list(rows) == sorted(rows)
    assert np.bincount(labels[rows]).tolist() == [8, 6, 4, 2]  # every class keeps its share
    assert list(labeled_rows(labels, None, 20, seed=0)) == list(rows)  # fraction 0.2 == count 20
    assert list(labeled_rows(labels, None, 20, seed=1)) != list(rows)
    assert len(labeled_rows(labels, None, None, seed=0)) == 100  # no option: every label kept


@pytest.mark.parametrize("fraction,count,message", [
    (0.0, None, "labeled_fraction=0.0 must be in (0, 1]"),
    (1.5, None, "labeled_fraction=1.5"),
    (0.5, 10, "not both"),
    (None, 2, "at least the number of classes"),
])
def test_labeled_rows_refuse_impossible_settings(fraction, count, message):
    with pytest.raises(KdkitError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        labeled_rows(np.repeat(np.arange(4), 5), fraction, count, seed=0)


class Samples(torch.utils.data.Dataset):
    def __init__(self, n, offset=0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.full((1, 2, 2), float(i + self.offset)), "label": torch.tensor(i % 3),
                "index": torch.tensor(i)}


def test_views_serve_labels_only_where_kept_and_index_by_position():
    train, extra, keep = Samples(6), Samples(2, offset=100), np.array([1, 4])
    everything = build_view("all", train, keep, extra)
    assert len(everything) == 6 and [int(everything[i]["label"]) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    labelled = build_view("labeled", train, keep, extra)
    assert [float(labelled[i]["image"][0, 0, 0]) for i in range(2)] == [1.0, 4.0]
    assert [int(labelled[i]["index"]) for i in range(2)] == [0, 1]
    transfer = build_view("transfer", train, keep, extra)
    assert isinstance(transfer, TrainView) and len(transfer) == 8 and transfer.num_unlabeled == 6
    assert [int(transfer[i]["label"]) for i in range(8)] == [UNLABELED, 1, UNLABELED, UNLABELED, 1,
                                                              UNLABELED, UNLABELED, UNLABELED]
    assert [int(transfer[i]["index"]) for i in range(8)] == list(range(8))
    assert float(transfer[7]["image"][0, 0, 0]) == 101.0  # the extra pool comes after the train set


def test_digits_views_per_stage():
    dm = DigitsDataModule(labeled_fraction=0.1, batch_size=16)
    dm.setup("fit")
    n = len(dm.train_set)
    assert dm.is_transfer and dm.num_train_samples == n and not dm.has_unlabeled  # "all" until told
    dm.use_train_view("labeled")
    labelled = dm.plain_train_view
    assert dm.num_train_samples == round(0.1 * n) == len(labelled)
    assert all(int(labelled[i]["label"]) >= 0 for i in range(len(labelled)))
    dm.use_train_view("transfer")
    assert dm.has_unlabeled and dm.num_train_samples == n
    labels = torch.stack([dm.plain_train_view[i]["label"] for i in range(n)])
    assert int((labels == UNLABELED).sum()) == n - round(0.1 * n)
    # the labels shown are the true ones, for exactly the labelled view's images
    shown = (labels != UNLABELED).nonzero().flatten()
    assert torch.equal(labels[shown], dm.train_set.labels[shown])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[0] == 16 and int(batch["index"].max()) < n
    example = dm.example_batch()  # a probe batch with both kinds of row
    assert (example["label"] == UNLABELED).any() and (example["label"] >= 0).any()
    with pytest.raises(KdkitError, match="unknown training view"):
        dm.use_train_view("everything")


def test_without_transfer_options_every_view_is_the_train_set():
    dm = DigitsDataModule()
    dm.setup("fit")
    for view in ("all", "labeled", "transfer"):
        dm.use_train_view(view)
        assert dm.plain_train_view is dm.plain_train_set and not dm.has_unlabeled


def _png(path, value, size=5):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.full((3, size, size), value, dtype=torch.uint8)
    write_png(image, str(path))


def test_unlabeled_images_from_folder_and_archive(tmp_path):
    _png(tmp_path / "pool" / "b" / "2.png", 20)
    _png(tmp_path / "pool" / "a.png", 10, size=7)  # another size: resized
    (tmp_path / "pool" / "notes.txt").write_text("not an image")
    images = load_unlabeled_images(tmp_path / "pool", size=5)
    assert images.shape == (2, 3, 5, 5) and images.dtype == torch.uint8
    assert images[:, 0, 2, 2].tolist() == [10, 20]  # file-name order: a.png, b/2.png
    with tarfile.open(tmp_path / "pool.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "pool", arcname="pool")
    assert torch.equal(load_unlabeled_images(tmp_path / "pool.tar.gz", size=5), images)
    with pytest.raises(KdkitError, match="no such folder"):
        load_unlabeled_images(tmp_path / "missing", size=5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdkitError, match="no images"):
        load_unlabeled_images(tmp_path / "empty", size=5)


def test_unlabeled_pool_joins_the_transfer_view_only(tmp_path):
    for i in range(3):
        _png(tmp_path / "pool" / f"{i}.png", 50 * i, size=8)
    dm = DigitsDataModule(unlabeled=str(tmp_path / "pool"))
    dm.setup("fit")
    n = len(dm.train_set)
    dm.use_train_view("labeled")
    assert dm.num_train_samples == n  # no label dropped: the labelled part is the whole train set
    dm.use_train_view("transfer")
    assert dm.num_train_samples == n + 3 and dm.plain_train_view.num_unlabeled == 3
    last = dm.plain_train_view[n + 2]
    assert last["image"].shape == (1, 8, 8) and int(last["label"]) == UNLABELED
    assert torch.allclose(last["image"], torch.full((1, 8, 8), 100 / 255))
