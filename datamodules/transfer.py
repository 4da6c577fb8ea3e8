"""Transfer data: a labelled part and an unlabelled part, served as one training set per stage.

Distillation on unlabelled transfer data is the original setting of model compression (Bucilua,
Caruana & Niculescu-Mizil 2006) and of KD (Hinton et al. 2015): the student learns from the
teacher's outputs wherever it has no label. A datamodule with transfer options serves three
*views* of its training data, one per pipeline stage:

- ``all``: every training sample with its label (the teacher's own stage: the teacher of a
  transfer experiment stands for a model trained elsewhere on more labels);
- ``labeled``: the labelled part alone (the baseline: what the student could learn without a
  teacher);
- ``transfer``: the labelled part with labels, plus every other sample (and any extra unlabelled
  pool) with ``label = kdkit.labels.UNLABELED`` (the distilled student).

Image-text pairs (CLIP) carry their supervision in the caption: there a hidden sample also loses
its caption (``text`` all padding, ``captioned = False``, ``pair_id = UNLABELED``), and every
sample of the view says ``captioned``. The image-text task and the CLIP distillers read that mask.

Which samples keep their labels is drawn once, stratified by class and seeded by the split seed,
so every stage and every run of the same config sees the same split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdkit.errors import KdkitError
from kdkit.labels import UNLABELED

VIEWS = ("all", "labeled", "transfer")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def labeled_rows(labels: np.ndarray, fraction: float | None, count: int | None, seed: int) -> np.ndarray:
    """Sorted positions of the samples that keep their label: ``count`` of them, or ``fraction``
    of all, stratified by class (every class keeps its share), drawn with ``seed``."""
    n = len(labels)
    if fraction is not None and count is not None:
        raise KdkitError("set one of data.labeled_fraction and data.labeled_count, not both")
    if fraction is not None:
        if not 0 < float(fraction) <= 1:
            raise KdkitError(f"data.labeled_fraction={fraction} must be in (0, 1]")
        count = int(round(float(fraction) * n))
    if count is None or int(count) >= n:
        return np.arange(n)
    classes = len(np.unique(labels))
    if not classes <= int(count):
        raise KdkitError(f"data.labeled_count={count} must be at least the number of classes ({classes}) "
                         f"and below the {n} training samples")
    from sklearn.model_selection import train_test_split

    kept, _ = train_test_split(np.arange(n), train_size=int(count), stratify=labels, random_state=int(seed))
    return np.sort(kept)


class TrainView(Dataset):
    """Rows of one or more datasets served as one training set, some rows' labels hidden.

    Args:
        parts: datasets of dict samples (``image``, ``label``, ...); a row is ``(part, position)``.
        rows: ``[(part, position), ...]`` in the order served.
        hidden: bool per row: serve its label as ``UNLABELED``.
        blank_text: for image-text pairs, the padding caption ``[L]`` of a hidden row (and of an
            extra pool's images, which have none); every row then says ``captioned``.

    ``index`` of every sample is its position in this view, as the task and the teacher cache
    expect (``num_train_samples`` = the view's length).
    """

    def __init__(self, parts: list[Dataset], rows: list[tuple[int, int]], hidden: list[bool],
                 blank_text: Tensor | None = None):
        if len(rows) != len(hidden):
            raise ValueError(f"{len(rows)} rows but {len(hidden)} hidden flags")
        self.parts, self.rows, self.hidden, self.blank_text = parts, rows, hidden, blank_text

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        part, position = self.rows[index]
        sample = dict(self.parts[part][position])
        hidden = self.hidden[index]
        if hidden:
            sample["label"] = torch.tensor(UNLABELED)
        if self.blank_text is not None:  # image-text pairs: the caption is the label
            sample["captioned"] = torch.tensor(not hidden)
            if hidden:
                sample["text"] = self.blank_text
                sample["pair_id"] = torch.tensor(UNLABELED)
        sample["index"] = torch.tensor(index)
        return sample

    @property
    def num_unlabeled(self) -> int:
        return int(sum(self.hidden))


def build_view(view: str, train: Dataset, keep: np.ndarray, extra: Dataset | None,
               blank_text: Tensor | None = None) -> TrainView:
    """The training set of ``view`` (``VIEWS``) over the train set ``train``, whose rows ``keep``
    keep their labels, and an optional unlabelled pool ``extra``; ``blank_text``: see
    ``TrainView`` (image-text pairs)."""
    if view not in VIEWS:
        raise KdkitError(f"unknown training view {view!r}; one of {VIEWS}")
    parts = [train] + ([extra] if extra is not None else [])
    if view == "all":
        rows = [(0, i) for i in range(len(train))]
        return TrainView(parts, rows, [False] * len(rows), blank_text)
    if view == "labeled":
        rows = [(0, int(i)) for i in keep]
        return TrainView(parts, rows, [False] * len(rows), blank_text)
    kept = np.zeros(len(train), dtype=bool)
    kept[keep] = True
    rows = [(0, i) for i in range(len(train))]
    hidden = [not k for k in kept]
    if extra is not None:
        rows += [(1, i) for i in range(len(extra))]
        hidden += [True] * len(extra)
    return TrainView(parts, rows, hidden, blank_text)


class UnlabeledImages(Dataset):
    """Images without labels held as one uint8 tensor (``label = UNLABELED``).

    Args:
        images: uint8 ``[N, C, H, W]``.
        transform: optional ``float [C, H, W] -> float [C, H, W]`` augmentation.
    """

    def __init__(self, images: Tensor, transform=None):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self.images[index].float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": torch.tensor(UNLABELED), "index": torch.tensor(index)}


def load_unlabeled_images(source: str | os.PathLike, size: int, channels: int = 3) -> Tensor:
    """Every image under ``source`` (a folder, searched recursively, or a ``.tar``/``.tar.gz``
    archive), decoded and resized to ``size x size``: uint8 ``[N, channels, size, size]``, in
    file-name order. Labels, folder names and any other files are ignored."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import resize
    from tqdm.auto import tqdm

    from kdkit.datamodules.archives import file_error, iter_members

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        members = ((str(p), p.read_bytes) for p in files)
        total = len(files)
    elif path.is_file():
        found = [(name, data) for name, data in iter_members(path, what="unlabelled image archive")
                 if Path(name).suffix.lower() in IMAGE_SUFFIXES]
        found.sort()
        members = ((f"{name} in {path}", (lambda d=data: d)) for name, data in found)
        total = len(found)
    else:
        raise KdkitError(f"data.unlabeled={source}: no such folder or archive")
    if not total:
        raise KdkitError(f"data.unlabeled={source}: no images ({', '.join(IMAGE_SUFFIXES)}) found there")
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    out = torch.empty((total, channels, size, size), dtype=torch.uint8)
    for i, (name, read) in enumerate(tqdm(members, total=total, desc="decoding unlabelled images",
                                         unit="img", disable=None, leave=False)):
        try:
            image = decode_image(torch.frombuffer(bytearray(read()), dtype=torch.uint8), mode=mode)
        except RuntimeError as err:
            raise file_error(name, "unlabelled image", err, "remove or replace the file") from None
        if image.shape[-2:] != (size, size):
            image = resize(image, [size, size], antialias=True)
        out[i] = image
    return out

