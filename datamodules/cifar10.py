"""CIFAR-10 (Krizhevsky 2009) from local JPEG archives, or torchvision's download when online.

Offline layout (``archive_dir``): ``train-part*.tar.gz`` (all parts form the train set) and
``test.tar.gz``, holding ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``. They are
decoded once, straight from the archives, into uint8 tensors cached in
``cache_dir/tensors-<fingerprint>.pt``, so no epoch ever decodes JPEG.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from kdkit.datamodules.archives import file_error, fingerprint, iter_members, warn_cached
from kdkit.checkpoint_io import save_atomically
from kdkit.datamodules.base import ImageDataModule, TensorImageDataset
from kdkit.datamodules.strong_augment import Chain
from kdkit.errors import KdkitError

ARCHIVE = "CIFAR-10 archive"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the 50,000 original training images. (The often-copied
# (0.2023, 0.1994, 0.2010) is the mean of per-image stds, not the dataset std.)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class RandomCropFlip:
    """Standard CIFAR augmentation (He et al. 2016): zero-pad by ``padding``, crop back to the
    original size at a uniformly random offset, flip horizontally with probability 1/2. Torch
    ops on one ``[C, H, W]`` tensor, drawing from torch's global RNG (which Lightning's
    ``seed_everything`` and the DataLoader seed, per worker).

    Args:
        padding: pixels of zero padding on each side.
    """

    def __init__(self, padding: int = 4):
        self.padding = int(padding)

    def __call__(self, image: Tensor) -> Tensor:
        p = self.padding
        c, h, w = image.shape
        padded = image.new_zeros(c, h + 2 * p, w + 2 * p)
        padded[:, p:p + h, p:p + w] = image
        k = 2 * p + 1  # crop offsets per axis
        draw = int(torch.randint(0, 2 * k * k, ()))  # one RNG call: (top, left, flip) uniform
        top, left, flip = draw % k, (draw // k) % k, draw // (k * k)
        out = padded[:, top:top + h, left:left + w]
        return out.flip(-1) if flip else out.contiguous()


def _mixed_order(indices: np.ndarray) -> Tensor:
    """``indices`` in a fixed pseudo-random order.

    The decoded arrays are class-major; mixing them once (always with seed 0, whatever the run
    seed) makes every prefix of a split a fair sample, so ``limit_val_batches`` /
    ``limit_test_batches`` and ``example_batch`` do not see a single class.
    """
    idx = torch.from_numpy(np.sort(indices))
    return idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))]


def _default_dir(env: str, fallback: str) -> Path:
    return Path(os.environ[env]) if os.environ.get(env) else Path(fallback).expanduser()


def decode_archives(archives: Sequence[Path], chunk: int = 1000) -> dict[str, Tensor]:
    """``{"<split>_images": uint8 [N, 3, 32, 32], "<split>_labels": long [N]}`` for the splits
    train and test, ordered by class then file name.

    Members are read straight from the archives (no extraction: creating tens of thousands of
    tiny files costs far more than decoding them) and decoded in chunks by
    ``torchvision.io.decode_jpeg`` (libjpeg-turbo: the same pixels as PIL, several times faster).
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from tqdm.auto import tqdm

    found: dict[str, list] = {"train": [], "test": []}
    source: dict[tuple[str, str, str], Path] = {}  # (split, class, file) -> its archive
    for archive in archives:
        for name, data in iter_members(archive, ".jpg", what=ARCHIVE):
            split, label, filename = PurePosixPath(name).parts[-3:]
            if split not in found or label not in CLASSES:
                raise KdkitError(f"unexpected file {name} in {archive}: expected "
                                 "train/<class>/*.jpg or test/<class>/*.jpg with CIFAR-10 classes")
            key = (split, label, filename)
            if key in source:  # e.g. a part copied under a second train-part* name
                raise KdkitError(f"{name} is twice in the CIFAR-10 archives ({source[key]} and "
                                 f"{archive}): remove the extra copy of the archive")
            source[key] = archive
            found[split].append((CLASSES.index(label), filename, data, archive))
    arrays = {}
    with tqdm(total=sum(map(len, found.values())), desc="decoding CIFAR-10 JPEGs", unit="img",
              disable=None, leave=False) as bar:
        for split, members in found.items():
            members.sort(key=lambda m: m[:2])
            missing = set(range(len(CLASSES))) - {m[0] for m in members}
            if missing:
                raise KdkitError(f"CIFAR-10 {split} archives lack the classes "
                                 f"{sorted(CLASSES[i] for i in missing)}")
            images = torch.empty((len(members), 3, 32, 32), dtype=torch.uint8)
            for start in range(0, len(members), chunk):
                raw = [torch.frombuffer(bytearray(m[2]), dtype=torch.uint8)
                       for m in members[start:start + chunk]]
                try:
                    decoded = decode_jpeg(raw, mode=ImageReadMode.RGB)
                except RuntimeError:  # a damaged JPEG: find and name it
                    _name_bad_jpeg(split, members[start:start + chunk], raw)
                    raise
                images[start:start + len(raw)] = torch.stack(decoded)
                bar.update(len(raw))
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = torch.tensor([m[0] for m in members])
    return arrays


def _name_bad_jpeg(split: str, members: list, raw: list[Tensor]) -> None:
    """Raise a KdkitError naming the first member of ``members`` that does not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    for (label, filename, _, archive), data in zip(members, raw):
        try:
            decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as err:  # "decode_jpeg, <source file>:<line>, <reason>"
            reason = str(err).strip().splitlines()[0].rsplit(", ", 1)[-1] if str(err).strip() else ""
            raise file_error(f"{split}/{CLASSES[label]}/{filename} in {archive}", "CIFAR-10 image",
                             f"not a valid JPEG: {reason}" if reason else err,
                             f"the archive is damaged: re-download or replace {archive.name}") from None


def _load_cache(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(path, weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise file_error(path, "CIFAR-10 tensor cache", err,
                         "delete it: kdkit decodes the archives again") from None


def load_cifar10_arrays(archive_dir: Path, cache_dir: Path, download: bool = False) -> dict[str, Tensor]:
    """``{"train_images", "train_labels", "test_images", "test_labels"}``, decoding only once.

    Uses the JPEG archives in ``archive_dir`` when present (cached as
    ``cache_dir/tensors-<fingerprint of the archives>.pt``, so a new train part invalidates it),
    else torchvision's CIFAR10 download (``download=True``), else raises a KdkitError that says
    how to get the data.
    """
    parts = sorted(archive_dir.glob("train-part*.tar.gz"))
    test = archive_dir / "test.tar.gz"
    if parts and test.exists():
        archives = [*parts, test]
        cached = cache_dir / f"tensors-{fingerprint(archives)}.pt"
        if not cached.is_file():
            save_atomically(decode_archives(archives), cached)
        return _load_cache(cached)
    if download:
        cached = cache_dir / "tensors-torchvision.pt"
        if cached.is_file():
            warn_cached(archive_dir, cached, "CIFAR-10 archives")
        return _download(cache_dir)
    raise KdkitError(
        f"CIFAR-10 archives not found in {archive_dir} (need train-part*.tar.gz and test.tar.gz): "
        "put them there, set KDKIT_DATA_DIR to their parent folder, or set data.download=true"
    )


def _download(cache_dir: Path) -> dict[str, Tensor]:
    """The original CIFAR-10 through torchvision (online users), cached as tensors too."""
    cached = cache_dir / "tensors-torchvision.pt"
    if not cached.is_file():
        from torchvision.datasets import CIFAR10

        arrays = {}
        for split, train in (("train", True), ("test", False)):
            ds = CIFAR10(root=str(cache_dir / "torchvision"), train=train, download=True)
            images = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8))
            arrays[f"{split}_images"] = images.permute(0, 3, 1, 2).contiguous()
            arrays[f"{split}_labels"] = torch.tensor(ds.targets, dtype=torch.long)
        save_atomically(arrays, cached)
    return _load_cache(cached)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 with a stratified held-out validation split and cheap tensor augmentation.

    Splits: train = the train archives minus ``val_size`` images (stratified, seeded by
    ``split_seed``); val = those held-out images, or the test set when ``val_size=0`` (the KD
    literature's practice of reporting test accuracy of the last epoch); test = the test set.
    Each split is in a fixed mixed order (not class by class), so any prefix is a fair sample.

    Args:
        archive_dir: folder with ``train-part*.tar.gz`` and ``test.tar.gz``
            (default ``$KDKIT_DATA_DIR/cifar10-jpeg``).
        cache_dir: where archives are extracted and decoded (default
            ``$KDKIT_CACHE_DIR/cifar10-jpeg`` or ``~/.cache/kdkit/cifar10-jpeg``).
        download: without archives, download the original CIFAR-10 with torchvision.
        augment: random crop (pad 4) + horizontal flip on the train set.
        randaugment_ops, randaugment_magnitude: RandAugment after the crop and flip, this many
            ops of this magnitude (DeiT: 2 and 9); 0 ops = off
            (``kdkit.datamodules.strong_augment``).
        random_erasing: probability of erasing a random box of each train image with noise
            (DeiT: 0.25).
        val_size: train images held out for validation (0: validate on the test set).
        train_limit: keep only this many (stratified) train images, for quick runs.
        split_seed: seed of the val split and of ``train_limit``.
        **kwargs: loader and dataset options of ``ImageDataModule``.
    """

    def __init__(self, archive_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, download: bool = False,
                 augment: bool = True, val_size: int = 1000, train_limit: int | None = None,
                 split_seed: int = 0, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, randaugment_ops: int = 0,
                 randaugment_magnitude: int = 9, random_erasing: float = 0.0, **kwargs):
        from kdkit.datamodules.strong_augment import strong_augment

        super().__init__(mean=mean, std=std, **kwargs)
        self.strong_steps = strong_augment(randaugment_ops, randaugment_magnitude, random_erasing, mean, std)
        self.archive_dir = Path(archive_dir or _default_dir("KDKIT_DATA_DIR", "data") / "cifar10-jpeg")
        self.cache_dir = Path(cache_dir or _default_dir("KDKIT_CACHE_DIR", "~/.cache/kdkit") / "cifar10-jpeg")
        self.download = bool(download)
        self.crop_flip = bool(augment)
        self.augment = self.crop_flip or bool(self.strong_steps)  # any random per-image change
        self.val_size = int(val_size)
        self.train_limit = train_limit
        self.split_seed = int(split_seed)

    @property
    def class_names(self) -> list[str]:
        """The class names in label order (fixed: no setup needed), e.g. for zero-shot prompts."""
        return list(CLASSES)

    def prepare_data(self) -> None:
        load_cifar10_arrays(self.archive_dir, self.cache_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        arrays = load_cifar10_arrays(self.archive_dir, self.cache_dir, self.download)
        self.classes = list(CLASSES)
        self.check_num_classes()
        images, labels = arrays["train_images"], arrays["train_labels"]
        train_idx, val_idx = self._split(labels.numpy())
        self.split_indices = {"train": train_idx, "val": val_idx}  # positions in the train archives
        steps = [RandomCropFlip(4)] if self.crop_flip else []
        steps += self.strong_steps
        transform = Chain(steps) if len(steps) > 1 else (steps[0] if steps else None)
        self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], transform)
        self.plain_train_set = TensorImageDataset(self.train_set.images, self.train_set.labels)
        test = _mixed_order(np.arange(len(arrays["test_labels"])))
        self.test_set = TensorImageDataset(arrays["test_images"][test], arrays["test_labels"][test])
        self.val_set = (TensorImageDataset(images[val_idx], labels[val_idx]) if len(val_idx)
                        else self.test_set)

    def _split(self, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(labels))
        if not 0 <= self.val_size < len(labels):
            raise KdkitError(f"val_size={self.val_size} must be in [0, {len(labels)})")
        train, val = idx, idx[:0]
        if self.val_size:
            train, val = train_test_split(idx, test_size=self.val_size, stratify=labels,
                                          random_state=self.split_seed)
        if self.train_limit is not None and self.train_limit < len(train):
            train, _ = train_test_split(train, train_size=int(self.train_limit),
                                        stratify=labels[train], random_state=self.split_seed)
        return _mixed_order(train), _mixed_order(val)
