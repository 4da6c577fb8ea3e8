"""Any ``ImageFolder`` tree (ImageNet layout): ``root/<split>/<class>/<image>``."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdkit.datamodules.archives import file_error
from kdkit.datamodules.base import IMAGENET_MEAN, IMAGENET_STD, ImageDataModule
from kdkit.errors import KdkitError

IMAGE_HINT = "it is corrupt or truncated: replace it with a good copy or delete it"


class _DictImageFolder(Dataset):
    """``torchvision.datasets.ImageFolder`` samples as kdkit dict samples.

    Loads as ``ImageFolder.__getitem__`` does (loader, then transform), so that an image that
    cannot be read raises a one-line KdkitError naming its file.
    """

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        folder = self.folder
        path, label = folder.samples[index]
        try:
            image = folder.loader(path)
        # PIL: OSError (unreadable, truncated, UnidentifiedImageError: not an image), SyntaxError
        # (some broken PNG/GIF headers)
        except (OSError, SyntaxError) as err:
            raise file_error(path, "image", err, IMAGE_HINT) from None
        if folder.transform is not None:
            image = folder.transform(image)
        if folder.target_transform is not None:
            label = folder.target_transform(label)
        return {"image": image, "label": torch.tensor(label), "index": torch.tensor(index)}


def train_transform(size: int, strong_steps: Sequence = ()):
    """Inception-style crop (Szegedy et al. 2015) + flip, as in the ImageNet training recipes,
    then ``strong_steps`` (``kdkit.datamodules.strong_augment``) on the float image."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        *strong_steps,
    ])


def eval_transform(size: int):
    """Resize the short side to ``size * 256 / 224``, centre crop ``size`` (the 0.875 crop)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(),
        v2.Resize(round(size * 256 / 224), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
    ])


class ImageFolderDataModule(ImageDataModule):
    """Image classification from folders, e.g. ImageNet: ``root/train/<class>/*``,
    ``root/val/<class>/*``. Images come as float ``[3, size, size]`` in [0, 1] (no Normalize).

    Args:
        root: dataset root holding the split folders.
        image_size: side of the square crops.
        train_dir, val_dir: split folder names under ``root``.
        test_dir: test split folder (default: ``val_dir``, as ImageNet has no public test labels).
        augment: random-resized crop + flip for training (else the eval transform).
        randaugment_ops, randaugment_magnitude, random_erasing: DeiT's strong augmentation after
            the crop and flip (``augment`` must be on), as ``CIFAR10DataModule``'s.
        mean, std: per-channel statistics for the task's normalisation (ImageNet by default).
        **kwargs: loader and dataset options of ``ImageDataModule`` (``num_classes`` is checked
            against the number of class folders).
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 224, train_dir: str = "train",
                 val_dir: str = "val", test_dir: str | None = None, augment: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 randaugment_ops: int = 0, randaugment_magnitude: int = 9, random_erasing: float = 0.0,
                 **kwargs):
        from kdkit.datamodules.strong_augment import strong_augment

        super().__init__(mean=mean, std=std, **kwargs)
        self.strong_steps = strong_augment(randaugment_ops, randaugment_magnitude, random_erasing, mean, std)
        if self.strong_steps and not augment:
            raise KdkitError("data.randaugment_ops / random_erasing add to the training crop and flip: "
                             "set data.augment=true too")
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        self.augment = bool(augment)

    def _folder(self, split: str, transform):
        from torchvision.datasets import ImageFolder

        path = self.root / self.split_dirs[split]
        if not path.is_dir():
            raise KdkitError(f"image folder {path} not found: expected {self.root}/"
                             f"{self.split_dirs[split]}/<class>/<image> (set data.root)")
        try:
            return ImageFolder(str(path), transform=transform)
        except FileNotFoundError as err:  # no class folders or no images
            raise KdkitError(f"image folder {path}: {str(err).strip()} (expected "
                             f"{path}/<class>/<image>: add the class folders and images)") from None
        except OSError as err:  # a folder that cannot be listed (permissions)
            raise file_error(path, "image folder", err) from None

    def train_labels(self) -> list[int]:
        self._require_setup()
        return [label for _, label in self.plain_train_set.folder.samples]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        size = self.image_size
        train = self._folder("train", train_transform(size, self.strong_steps) if self.augment else eval_transform(size))
        self.classes = list(train.classes)
        self.check_num_classes()
        val = self._folder("val", eval_transform(size))
        same = self.split_dirs["test"] == self.split_dirs["val"]
        test = val if same else self._folder("test", eval_transform(size))
        for split, folder in (("val", val), ("test", test)):
            if folder.classes != self.classes:
                raise KdkitError(f"{self.root / self.split_dirs[split]} has class folders that "
                                 f"differ from the {len(self.classes)} of the train split")
        plain = copy.copy(train)  # shares the (possibly long) file list, not the transform
        plain.transform = eval_transform(size)
        self.train_set = _DictImageFolder(train)
        self.plain_train_set = _DictImageFolder(plain)
        self.val_set = _DictImageFolder(val)
        self.test_set = self.val_set if same else _DictImageFolder(test)
