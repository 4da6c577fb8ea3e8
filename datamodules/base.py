"""Loader plumbing shared by the image datamodules.

Every batch is a dict ``{"image": float [B, C, H, W] in [0, 1], "label": long [B],
"index": long [B]}``; images are *not* normalised (the task normalises per model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from kdkit.data_contract import ClassificationData
from kdkit.distributed import FixedShardSampler, eval_sampler, world
from kdkit.errors import KdkitError
from kdkit.resumable_loader import ResumableLoader
from kdkit.sampling import EpochShuffleSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_loader_options(batch_size, eval_batch_size=None, num_workers=0, **more) -> None:
    """Refuse loader sizes the DataLoader would only reject deep inside a run: batch sizes
    below 1, a negative worker count, or values that are not whole numbers (``more``: further
    batch sizes, e.g. ``teacher_batch_size``). One line each, naming the ``data.`` option."""
    sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, **more}
    checks = [(name, value, 1) for name, value in sizes.items()] + [("num_workers", num_workers, 0)]
    for name, value, least in checks:
        if value is None and name == "eval_batch_size":  # None: the training batch size
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        bad = number is None or isinstance(value, bool) or isinstance(value, float) and number != value
        if bad or number < least:  # the wording of kdkit.config_checks
            what = ("worker processes; 0 loads in the main process" if name == "num_workers"
                    else "samples per batch")
            shown = repr(value) if isinstance(value, str) else value
            raise KdkitError(f"data.{name}={shown} must be a whole number >= {least} ({what})")


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor, served as dict samples.

    Args:
        images: ``uint8`` (0..255) or float (0..1) tensor ``[N, C, H, W]``.
        labels: class indices ``[N]``.
        transform: optional ``float [C, H, W] -> float [C, H, W]`` augmentation.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self.images[index]
        image = image.float().div_(255) if image.dtype == torch.uint8 else image.float()
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": self.labels[index], "index": torch.tensor(index)}


class ImageDataModule(L.LightningDataModule, ClassificationData):
    """Base of the image datamodules: loaders, ``example_batch`` and dataset facts
    (``kdkit.data_contract.ClassificationData``).

    Subclasses fill ``self.train_set``, ``self.val_set``, ``self.test_set`` and
    ``self.plain_train_set`` (the train set without augmentation, same order) in ``setup``.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: page-locked host memory for faster GPU copies.
        seed: seeds the training shuffle (a fresh ``torch.Generator`` per loader).
        num_classes: expected class count (from the config, checked against the data).
        mean, std: per-channel statistics of this data, read by the task for normalisation.
        labeled_fraction, labeled_count: keep the labels of only this fraction / number of
            training samples (stratified, drawn with ``split_seed``); the others become transfer
            data the student learns from through teacher outputs alone
            (``kdkit.datamodules.transfer``). None: every sample keeps its label.
        unlabeled: a folder or archive of extra images without labels, added to the student's
            training view as transfer data (resized to the data's image size).
        teacher_view: the training view of the teacher's own stage: ``all`` (every label: the
            teacher stands for a model trained elsewhere on more labels) or ``labeled``.
        student_view: the distilled student's: ``transfer`` (labelled plus unlabelled samples)
            or ``labeled`` (KD on the labelled part alone, for comparison).
        labeled_per_batch: on a view with unlabelled samples, every training batch holds exactly
            this many labelled samples, drawn from a labelled stream apart from the unlabelled
            one (``kdkit.datamodules.labeled_share``); None: uniform batches, whose labelled
            share is the data's.
        mixup_alpha, cutmix_alpha: Mixup / CutMix on training batches
            (``kdkit.datamodules.batch_mix``): the Beta parameter of each, 0 = off. Labels
            become soft ``[B, num_classes]``; teacher and student see the same mixed images.
        mix_prob: probability that a training batch is mixed.
        mix_switch_prob: with both on, the probability of CutMix rather than Mixup for a batch.
    """

    augment: bool = False  # random augmentation of training images (subclasses' option)
    fixed_shards: bool = False  # True after use_fixed_shards(): see kdkit.data_contract
    teacher_input_fingerprint: str | None = None  # the data config stands for the teacher's inputs
    teacher_view: str = "all"  # training view of the teacher's stage (kdkit.stage_views)
    student_view: str = "transfer"  # training view of the distilled student's stage

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False, seed: int = 0,
                 num_classes: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, labeled_fraction: float | None = None,
                 labeled_count: int | None = None, unlabeled: str | None = None,
                 teacher_view: str = "all", student_view: str = "transfer",
                 labeled_per_batch: int | None = None, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mix_prob: float = 1.0, mix_switch_prob: float = 0.5):
        super().__init__()
        if teacher_view not in ("all", "labeled"):
            raise KdkitError(f"data.teacher_view={teacher_view!r} must be 'all' or 'labeled'")
        if student_view not in ("transfer", "labeled"):
            raise KdkitError(f"data.student_view={student_view!r} must be 'transfer' or 'labeled'")
        self.student_view = student_view
        self.labeled_fraction = labeled_fraction
        self.labeled_count = labeled_count
        self.unlabeled = unlabeled
        self.teacher_view = teacher_view
        if labeled_per_batch is not None and not self.is_transfer:
            raise KdkitError(f"data.labeled_per_batch={labeled_per_batch} mixes labelled and unlabelled "
                             "samples: set data.labeled_fraction, labeled_count or unlabeled too")
        self.labeled_per_batch = None if labeled_per_batch is None else int(labeled_per_batch)
        self.batch_mix = None
        if mixup_alpha or cutmix_alpha:
            from kdkit.datamodules.batch_mix import BatchMix

            if self.is_transfer:
                raise KdkitError("data.mixup_alpha / cutmix_alpha mix two samples' labels, but the transfer "
                                 "options leave samples without one: drop one or the other")
            self.batch_mix = BatchMix(mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob)
        self.train_view = "all"
        self._views: dict[str, tuple] = {}
        check_loader_options(batch_size, eval_batch_size, num_workers)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self.expected_num_classes = num_classes
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.train_set = self.val_set = self.test_set = self.plain_train_set = None
        self.classes: list[str] = []

    # ---- facts the task and the pipeline read ------------------------------------------------
    def _require_setup(self) -> None:
        if self.train_set is None:
            self.setup("fit")

    @property
    def num_classes(self) -> int:
        self._require_setup()
        return len(self.classes)

    @property
    def num_train_samples(self) -> int:
        return len(self.view_sets()[0])

    # ---- transfer data (kdkit.datamodules.transfer) ------------------------------------------
    @property
    def is_transfer(self) -> bool:
        """Whether some training samples have no label (transfer options are set)."""
        return self.labeled_fraction is not None or self.labeled_count is not None or bool(self.unlabeled)

    @property
    def has_unlabeled(self) -> bool:
        """Whether the current training view holds samples without a label."""
        return self.is_transfer and self.train_view == "transfer"

    def use_train_view(self, view: str) -> None:
        """Serve the training view ``view`` from now on (``all``, ``labeled`` or ``transfer``;
        see ``kdkit.datamodules.transfer``); without transfer options every view is the whole
        labelled train set."""
        from kdkit.datamodules.transfer import VIEWS

        if view not in VIEWS:
            raise KdkitError(f"unknown training view {view!r}; one of {VIEWS}")
        self.train_view = view

    def view_sets(self) -> tuple[Dataset, Dataset]:
        """(augmented, plain) training datasets of the current view."""
        self._require_setup()
        if not self.is_transfer:
            return self.train_set, self.plain_train_set
        if self.train_view not in self._views:
            self._views[self.train_view] = self._build_view(self.train_view)
        return self._views[self.train_view]

    def train_labels(self) -> list[int]:
        """Every training sample's label, in train-set order (subclasses reading files answer
        from their index, without decoding images)."""
        return _labels_of(self.plain_train_set)

    @property
    def plain_train_view(self) -> Dataset:
        """The current training view without augmentation, indexed like its batches."""
        return self.view_sets()[1]

    def _build_view(self, view: str) -> tuple[Dataset, Dataset]:
        import numpy as np

        from kdkit.datamodules.transfer import UnlabeledImages, build_view, labeled_rows, load_unlabeled_images

        labels = np.asarray(self.train_labels())
        keep = labeled_rows(labels, self.labeled_fraction, self.labeled_count, getattr(self, "split_seed", 0))
        extra = extra_plain = None
        if self.unlabeled and view == "transfer":
            if getattr(self, "_unlabeled_images", None) is None:
                image = self.plain_train_set[0]["image"]
                self._unlabeled_images = load_unlabeled_images(self.unlabeled, image.shape[-1], image.shape[0])
            labelled = getattr(self.train_set, "images", self.train_set)  # under image-text captions
            extra = UnlabeledImages(self._unlabeled_images, getattr(labelled, "transform", None))
            extra_plain = UnlabeledImages(self._unlabeled_images)
        blank = getattr(self, "blank_text", None)  # image-text pairs (CIFAR10PairsDataModule)
        return (build_view(view, self.train_set, keep, extra, blank),
                build_view(view, self.plain_train_set, keep, extra_plain, blank))

    @property
    def static_for_teacher(self) -> bool:
        """True when a train sample is the same every epoch (teacher outputs can be cached)."""
        return not self.augment and self.batch_mix is None

    @property
    def mixes_samples(self) -> bool:
        """Whether training rows are mixtures of two samples with soft labels (Mixup / CutMix):
        a row is then neither one sample (``index``) nor one class."""
        return self.batch_mix is not None

    def use_fixed_shards(self) -> None:
        """Keep every DDP rank on a fixed training shard (a per-rank teacher cache asks)."""
        self.fixed_shards = True

    def check_num_classes(self) -> None:
        expected = self.expected_num_classes
        if expected is not None and int(expected) != len(self.classes):
            raise KdkitError(f"data.num_classes={expected} but the data has {len(self.classes)} "
                             f"classes ({', '.join(self.classes[:5])}, ...)")

    def example_batch(self, n: int | None = None) -> dict[str, Tensor]:
        """The first ``n`` (default 4) train samples, without augmentation: a small
        deterministic batch."""
        plain = self.plain_train_view
        n = min(4 if n is None else n, len(plain))
        if not self.has_unlabeled:
            return default_collate([plain[i] for i in range(n)])
        # a transfer view's probe batch holds labelled and unlabelled rows, as its batches do
        hidden = [i for i in range(len(plain)) if plain.hidden[i]][: max(1, n // 2)]
        shown = [i for i in range(len(plain)) if not plain.hidden[i]][: n - len(hidden)]
        return default_collate([plain[i] for i in sorted(shown + hidden)])

    # ---- loaders -----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return build_loader(self, dataset, train)

    def train_dataloader(self) -> DataLoader:
        train = self.view_sets()[0]
        if len(train) < self.batch_size:
            raise KdkitError(f"batch_size={self.batch_size} exceeds the {len(train)} "
                             f"training samples of the '{self.train_view}' view (train batches drop the remainder)")
        return self._loader(train, train=True)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_set, train=False)


def build_loader(dm, dataset: Dataset, train: bool) -> DataLoader:
    """The loader every kdkit datamodule uses, reading ``batch_size``, ``eval_batch_size``,
    ``seed``, ``num_workers``, ``pin_memory`` and ``fixed_shards`` off ``dm``.

    Training batches are mixed (Mixup / CutMix) when ``dm.batch_mix`` is set.
    Under DDP: eval shards without repeated samples (exact metrics over the full set), and fixed
    training shards when a per-rank teacher cache asks for them (Lightning keeps a
    DistributedSampler it finds instead of injecting its own). Train batches drop the remainder:
    cross-rank gathers in contrastive losses need equal shapes on every rank. A transfer view
    with ``labeled_per_batch`` set gets ``LabeledShareSampler`` (its shards change every epoch,
    so a per-rank teacher cache fills over several epochs instead of one).
    """
    sampler = None
    share = getattr(dm, "labeled_per_batch", None)
    if not train:
        sampler = eval_sampler(dataset)
    elif share is not None and getattr(dataset, "num_unlabeled", 0) > 0:
        from kdkit.datamodules.labeled_share import LabeledShareSampler

        sampler = LabeledShareSampler(dataset.hidden, dm.batch_size, share, seed=dm.seed)
    elif dm.fixed_shards and world()[1] > 1:
        sampler = FixedShardSampler(dataset, seed=dm.seed)
    if train and sampler is None:
        sampler = EpochShuffleSampler(dataset, seed=dm.seed)  # same order when resumed mid-run
    collate = None
    if train and getattr(dm, "batch_mix", None) is not None:
        from kdkit.datamodules.batch_mix import MixingCollate

        collate = MixingCollate(dm.batch_mix, dm.num_classes)
    return (ResumableLoader if train else DataLoader)(  # a training epoch resumes at its next batch
        dataset,
        batch_size=dm.batch_size if train else dm.eval_batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=dm.num_workers,
        pin_memory=dm.pin_memory,
        persistent_workers=dm.num_workers > 0,
        collate_fn=collate,
    )


def _labels_of(dataset) -> list[int]:
    """Every sample's label; read from the tensor when the dataset holds one (no decoding)."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):
        return labels.tolist()
    return [int(dataset[i]["label"]) for i in range(len(dataset))]
