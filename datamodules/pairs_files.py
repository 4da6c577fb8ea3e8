"""Image-caption pairs listed in a CSV / TSV file (image path, caption, optional class), the
images read from disk; the base of every file-backed pairs datamodule.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from kdkit.data_contract import ImageTextData
from kdkit.datamodules.archives import file_error
from kdkit.datamodules.base import build_loader, check_loader_options
from kdkit.errors import KdkitError

IMAGE_HINT = "it is corrupt or truncated: replace it with a good copy"


def image_transform(size: int, train: bool, augment: bool) -> Callable:
    """PIL image -> float [3, size, size] in [0, 1]: open_clip's train crop
    (RandomResizedCrop, scale 0.9-1) when training with ``augment``, else resize + centre crop."""
    from torchvision.transforms import v2

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train and augment:
        return v2.Compose([v2.RGB(), v2.RandomResizedCrop(size, scale=(0.9, 1.0), antialias=True),
                           *to_tensor])
    return v2.Compose([v2.RGB(), v2.Resize(size, antialias=True), v2.CenterCrop(size), *to_tensor])


def stable_id(text: str) -> int:
    """A 63-bit id of a string that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


class PairsFile(Dataset):
    """Image-caption pairs listed in a CSV/TSV file (one pair per row, header line).

    ``pair_id`` = the row of the first occurrence of the row's image, so all captions of one
    image match it (the COCO / Flickr30k retrieval protocol).

    Args:
        path: the .csv / .tsv file (tab-separated when the suffix is .tsv).
        image_key, caption_key: column names of the image path and the caption.
        label_key: optional column of class names (enables zero-shot accuracy).
        image_root: folder that relative image paths start from (default: the file's folder).
        tokenizer, transform: caption -> ids and PIL -> tensor.
        class_names: class names, in label order (required with ``label_key``).
    """

    def __init__(self, path: str | os.PathLike, image_key: str, caption_key: str,
                 tokenizer: Callable, transform: Callable, label_key: str | None = None,
                 image_root: str | os.PathLike | None = None,
                 class_names: Sequence[str] | None = None):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise KdkitError(f"pairs file not found: {self.path} (a CSV/TSV with columns "
                             f"{image_key!r}, {caption_key!r})")
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        wanted = [k for k in (image_key, caption_key, label_key) if k]
        rows, lines, columns = self._read(delimiter)
        if not columns:
            raise KdkitError(f"pairs file {self.path} is empty: write a header line naming the "
                             f"columns {wanted}, then one row per image-caption pair")
        missing = [k for k in wanted if k not in columns]
        if missing:
            raise KdkitError(f"pairs file {self.path}: missing columns {missing}; columns are "
                             f"{columns}: name them in data.image_key / caption_key / label_key")
        if not rows:
            raise KdkitError(f"pairs file {self.path} has a header but no rows: add one row per "
                             "image-caption pair")
        short = next((line for r, line in zip(rows, lines) if any(r[k] is None for k in wanted)), None)
        if short is not None:
            raise KdkitError(f"pairs file {self.path} line {short} has fewer fields than its header "
                             f"{columns}: fix that row (separator {delimiter!r})")
        root = Path(image_root).expanduser() if image_root else self.path.parent
        self.images = [root / r[image_key] for r in rows]
        self.captions = [r[caption_key] for r in rows]
        first: dict[Path, int] = {}
        self.pair_ids = torch.tensor([first.setdefault(p, i) for i, p in enumerate(self.images)])
        self.labels = None
        if label_key:
            lookup = {name: i for i, name in enumerate(class_names or [])}
            unknown = sorted({r[label_key] for r in rows} - set(lookup))
            if unknown:
                raise KdkitError(f"{self.path}: labels {unknown[:5]} are not in class_names")
            self.labels = torch.tensor([lookup[r[label_key]] for r in rows])
        self.tokenizer, self.transform = tokenizer, transform

    def _read(self, delimiter: str) -> tuple[list[dict], list[int], list[str]]:
        """(rows, the line each row ends on, the header's column names)."""
        what = "pairs file"
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter=delimiter)
                rows, lines = [], []
                try:
                    for row in reader:
                        rows.append(row)
                        lines.append(reader.line_num)
                except csv.Error as err:  # e.g. a NUL byte: not a text file
                    raise file_error(f"{self.path} (line {reader.line_num})", what, err,
                                     "it is not a CSV/TSV text file: fix or replace it") from None
                return rows, lines, list(reader.fieldnames or [])
        except UnicodeDecodeError as err:
            raise file_error(self.path, what, err, "it is not UTF-8 text: save it as UTF-8 CSV/TSV "
                                                   "or replace it") from None
        except OSError as err:
            raise file_error(self.path, what, err) from None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        from PIL import Image

        path = self.images[index]
        if not path.is_file():
            raise KdkitError(f"image not found: {path} (listed in {self.path}): add it or remove "
                             "its row")
        try:
            img = Image.open(path)
            img.load()
        # PIL: OSError (unreadable, truncated, UnidentifiedImageError: not an image), SyntaxError
        # (some broken PNG/GIF headers)
        except (OSError, SyntaxError) as err:
            raise file_error(path, "image", err, f"{IMAGE_HINT} (listed in {self.path})") from None
        with img:
            image = self.transform(img)
        sample = {"image": image, "text": self.tokenizer([self.captions[index]])[0],
                  "index": torch.tensor(index), "pair_id": self.pair_ids[index]}
        if self.labels is not None:
            sample["label"] = self.labels[index]
        return sample


class PairsDataModule(L.LightningDataModule, ImageTextData):
    """Shared loader plumbing of the file-based image-text datamodules
    (``kdkit.data_contract.ImageTextData``).

    Args:
        tokenizer: callable list[str] -> [N, L] token ids.
        image_size: side of the square images served (each model resizes to its own size).
        augment: random resized crop on training images.
        batch_size, eval_batch_size, num_workers, pin_memory, seed: loader options; training
            batches drop the remainder (equal shapes on every rank for the cross-rank gather).
        class_names: class names for zero-shot accuracy, in label order (optional).
        templates: zero-shot prompt templates (optional; the task's default otherwise).
    """

    tokenizer: Callable | None = None
    class_names: list[str] | None = None
    templates: list[str] | None = None
    num_classes: int | None = None  # len(class_names) when given
    fixed_shards: bool = False  # True after use_fixed_shards(): see kdkit.data_contract
    teacher_input_fingerprint: str | None = None  # the data config stands for the teacher's inputs

    def __init__(self, tokenizer: Callable, image_size: int = 224, augment: bool = True,
                 batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 pin_memory: bool = False, seed: int = 0,
                 class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None):
        super().__init__()
        check_loader_options(batch_size, eval_batch_size, num_workers)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.augment = bool(augment)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers, self.pin_memory, self.seed = int(num_workers), bool(pin_memory), int(seed)
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates) if templates else None
        self.num_classes = len(self.class_names) if self.class_names else None
        self.train_set = self.val_set = self.test_set = self.plain_train_set = None

    def _require_setup(self) -> None:
        if self.train_set is None:
            self.setup("fit")

    @property
    def num_train_samples(self) -> int:
        self._require_setup()
        return len(self.train_set)

    @property
    def static_for_teacher(self) -> bool:
        """True without augmentation: a training pair is then the same every epoch."""
        return not self.augment

    def use_fixed_shards(self) -> None:
        """Keep every DDP rank on a fixed training shard (a per-rank teacher cache asks)."""
        self.fixed_shards = True

    def example_batch(self, n: int | None = None) -> dict[str, Tensor]:
        """The first ``n`` (default 4) training pairs without augmentation."""
        self._require_setup()
        n = min(4 if n is None else n, len(self.plain_train_set))
        return default_collate([self.plain_train_set[i] for i in range(n)])

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return build_loader(self, dataset, train)

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        if len(self.train_set) < self.batch_size:
            raise KdkitError(f"batch_size={self.batch_size} exceeds the {len(self.train_set)} "
                             "training pairs (train batches drop the remainder)")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_set, train=False)


class CSVPairsDataModule(PairsDataModule):
    """Image-caption pairs from CSV/TSV files (open_clip's ``--csv-img-key`` layout).

    Args:
        train_file: pairs to train on; val_file: to validate on (default: the test file);
            test_file: to test on (default: the train file, for quick checks only).
        image_key, caption_key, label_key, image_root: see ``PairsFile``.
        **kwargs: see ``PairsDataModule``.
    """

    def __init__(self, train_file: str, test_file: str | None = None, val_file: str | None = None,
                 image_key: str = "filepath", caption_key: str = "title",
                 label_key: str | None = None, image_root: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if label_key and not self.class_names:
            raise KdkitError("data.label_key needs data.class_names (in label order)")
        self.files = {"train": train_file, "test": test_file or train_file,
                      "val": val_file or test_file or train_file}
        self.columns = dict(image_key=image_key, caption_key=caption_key, label_key=label_key,
                            image_root=image_root, class_names=self.class_names)

    def _pairs(self, split: str, train: bool) -> PairsFile:
        return PairsFile(self.files[split], tokenizer=self.tokenizer,
                         transform=image_transform(self.image_size, train, self.augment),
                         **self.columns)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self._pairs("train", train=True)
        self.plain_train_set = self._pairs("train", train=False)
        self.test_set = self._pairs("test", train=False)
        self.val_set = self._pairs("val", train=False)
