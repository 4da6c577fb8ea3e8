"""scikit-learn's 8x8 handwritten digits: a real dataset that ships with sklearn (fully offline).

1,797 grayscale images of the digits 0-9 (UCI optical recognition of handwritten digits),
pixel values 0..16 scaled to [0, 1]. Small enough for a whole distillation run in seconds on CPU.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from kdkit.datamodules.archives import file_error
from kdkit.datamodules.base import ImageDataModule, TensorImageDataset
from kdkit.errors import KdkitError


def load_digits():
    """``sklearn.datasets.load_digits()``; its data file (``digits.csv.gz``, inside the
    scikit-learn package) that cannot be read raises a one-line KdkitError naming it."""
    from importlib import resources

    from sklearn import datasets

    try:
        return datasets.load_digits()
    # gzip: OSError (BadGzipFile), EOFError (truncated), zlib.error; np.loadtxt: ValueError
    except (OSError, EOFError, zlib.error, ValueError) as err:
        path = resources.files("sklearn.datasets.data") / "digits.csv.gz"
        raise file_error(path, "scikit-learn digits file", err,
                         "reinstall scikit-learn (pip install --force-reinstall scikit-learn)") from None


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted train/val/test index arrays, each keeping the class proportions of ``labels``."""
    from sklearn.model_selection import train_test_split

    n, n_classes = len(labels), len(np.unique(labels))
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    if min(n_test, n_val, n - n_test - n_val) < n_classes:  # stratifying needs one per class
        raise KdkitError(f"val_fraction={val_fraction}, test_fraction={test_fraction} leave no "
                         f"room for train/val/test in {n} samples")
    idx = np.arange(n)
    rest, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


class DigitsDataModule(ImageDataModule):
    """8x8 digits with a stratified, seeded train/val/test split (60/20/20 by default).

    Batches: ``image`` float ``[B, 1, 8, 8]`` in [0, 1], ``label``, ``index``. No augmentation.

    Args:
        val_fraction: share of all samples held out for validation.
        test_fraction: share of all samples held out for testing.
        split_seed: seed of the split (independent of the run seed, so every run sees the
            same test set).
        in_channels, image_size, in_features: the shape facts from the config, checked here.
        **kwargs: loader and dataset options of ``ImageDataModule``.
    """

    def __init__(self, val_fraction: float = 0.2, test_fraction: float = 0.2, split_seed: int = 0,
                 in_channels: int = 1, image_size: int = 8, in_features: int = 64,
                 batch_size: int = 64, **kwargs):
        super().__init__(batch_size=batch_size, **kwargs)
        if (in_channels, image_size, in_features) != (1, 8, 64):
            raise KdkitError("digits images are 1x8x8: in_channels=1, image_size=8, in_features=64 "
                             f"(got {in_channels}, {image_size}, {in_features})")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed = int(split_seed)
        self.augment = False

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = load_digits()
        images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(data.target.astype(np.int64))
        self.classes = [str(c) for c in data.target_names]
        self.check_num_classes()
        splits = stratified_split(data.target, self.val_fraction, self.test_fraction, self.split_seed)
        self.split_indices = dict(zip(("train", "val", "test"), splits))
        train, val, test = (torch.from_numpy(s) for s in splits)
        self.train_set = TensorImageDataset(images[train], labels[train])
        self.plain_train_set = self.train_set
        self.val_set = TensorImageDataset(images[val], labels[val])
        self.test_set = TensorImageDataset(images[test], labels[test])
