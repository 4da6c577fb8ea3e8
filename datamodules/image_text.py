"""Image-text pairs for CLIP: CIFAR-10 as captioned pairs, CSV/TSV files, webdataset shards.

Every batch is a dict ``{"image": float [B, 3, H, W] in [0, 1], "text": long [B, L] token ids,
"index": long [B], "pair_id": long [B]}`` plus ``"label"`` where the data has classes. Images
are not normalised (the task normalises per model). ``pair_id`` says which pairs match for
retrieval: samples with equal ``pair_id`` are each other's positives.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from kdkit.data_contract import ImageTextData
from kdkit.datamodules.archives import ARCHIVE_ERRORS, file_error
from kdkit.datamodules.base import build_loader, check_loader_options
from kdkit.datamodules.cifar10 import CIFAR10DataModule
from kdkit.errors import KdkitError
from kdkit.extras import require

IMAGE_HINT = "it is corrupt or truncated: replace it with a good copy"

# The 18 CIFAR-10 prompts of CLIP's zero-shot evaluation (Radford et al. 2021, notebook
# "Prompt_Engineering_for_ImageNet" / CIFAR templates).
CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)


# ---- CIFAR-10 as captioned pairs -------------------------------------------------------------
class ClassCaptions(Dataset):
    """Adds a caption ``template.format(class name)`` to each sample of a labelled image set.

    Args:
        images: a dataset of ``{"image", "label", "index"}`` dicts.
        tokens: ``[C, T, L]`` token ids of every (class, template) caption.
        random_template: draw a template per access (training: captions vary every epoch);
            otherwise template ``index mod T`` (a fixed caption per image for evaluation).
    """

    def __init__(self, images: Dataset, tokens: Tensor, random_template: bool):
        self.images, self.tokens, self.random_template = images, tokens, random_template

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = dict(self.images[index])
        n = self.tokens.shape[1]
        t = int(torch.randint(0, n, ())) if self.random_template else index % n
        sample["text"] = self.tokens[sample["label"], t]
        sample["pair_id"] = sample["label"]  # class-level retrieval: captions name only the class
        return sample


class CIFAR10PairsDataModule(CIFAR10DataModule, ImageTextData):
    """CIFAR-10 (see ``CIFAR10DataModule`` for splits and archives) as image-caption pairs
    (``kdkit.data_contract.ImageTextData``).

    A caption is a prompt template filled with the class name ("a blurry photo of a cat.").
    Training draws a template per sample and epoch; evaluation uses template ``index mod T``.
    As captions only name the class, retrieval is class-level (``pair_id`` = label): an
    image->text query is a hit when a retrieved caption names the image's class. Zero-shot
    classification uses ``class_names`` with every template (prompt ensemble).

    Transfer options (``data.labeled_count`` / ``labeled_fraction`` / ``unlabeled``, see
    ``kdkit.datamodules.transfer``) hide the captions of the other images: the student learns
    those images from teacher outputs alone (``batch["captioned"]`` is False there).

    Args:
        tokenizer: callable list[str] -> [N, L] token ids (``kdkit.models.clip.clip_tokenizer``).
        templates: caption templates with one ``{}``, also the zero-shot prompt ensemble
            (default: the 18 CIFAR-10 templates of CLIP).
        **kwargs: see ``CIFAR10DataModule`` (archives, cache, val split, loaders).
    """

    tokenizer: Callable | None = None
    templates: list[str] | None = None
    static_for_teacher = False  # a training caption is drawn anew at every access

    def __init__(self, tokenizer: Callable, templates: Sequence[str] | None = None, **kwargs):
        kwargs.setdefault("mean", (0.0, 0.0, 0.0))  # unused: each CLIP normalises its own way
        kwargs.setdefault("std", (1.0, 1.0, 1.0))
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.templates = list(templates or CIFAR_TEMPLATES)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise KdkitError("data.templates: give templates with exactly one '{}' each")

    @property
    def class_names(self) -> list[str]:
        self._require_setup()
        return list(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if isinstance(self.train_set, ClassCaptions):
            return
        super().setup(stage)
        captions = [t.format(name) for name in self.classes for t in self.templates]
        tokens = self.tokenizer(captions).view(len(self.classes), len(self.templates), -1)
        self.blank_text = torch.zeros_like(tokens[0, 0])  # the caption of a transfer image: none
        self.train_set = ClassCaptions(self.train_set, tokens, random_template=True)
        self.plain_train_set = ClassCaptions(self.plain_train_set, tokens, random_template=False)
        test = ClassCaptions(self.test_set, tokens, random_template=False)
        self.val_set = test if self.val_set is self.test_set else ClassCaptions(self.val_set, tokens, False)
        self.test_set = test


# ---- images from files -------------------------------------------------------------------------
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


# ---- webdataset shards -----------------------------------------------------------------------
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class WebDatasetPairsDataModule(PairsDataModule):
    """Image-caption pairs from webdataset tar shards (``<key>.jpg`` + ``<key>.txt`` per sample,
    optional ``<key>.cls`` class index), the format of CLIP training at scale (img2dataset).

    Training streams shards resampled with replacement on every rank and worker, cut into
    epochs of ``train_samples // (batch_size * world_size)`` full batches, so every rank runs
    the same number of equal batches (the cross-rank gather needs that). Evaluation reads each
    shard once, split over ranks (give at least as many test shards as processes) and workers;
    ``index`` is a stable hash of the shard and sample key.

    Args:
        train_urls: shard paths/URLs, brace notation allowed ("data/train-{000..099}.tar").
        test_urls: evaluation shards; val_urls: default the test shards.
        train_samples: number of training pairs (sets the epoch length; shards have no length).
        shuffle_buffer: samples mixed in the in-memory shuffle buffer.
        **kwargs: see ``PairsDataModule``.
    """

    def __init__(self, train_urls: str | Sequence[str], test_urls: str | Sequence[str],
                 train_samples: int, val_urls: str | Sequence[str] | None = None,
                 shuffle_buffer: int = 1000, **kwargs):
        require("webdataset", "data=image_text_wds (webdataset shards)")
        super().__init__(**kwargs)
        self.urls = {"train": _expand(train_urls), "test": _expand(test_urls),
                     "val": _expand(val_urls or test_urls)}
        for split, urls in self.urls.items():
            missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
            if missing:
                raise KdkitError(f"{split} shards not found: {missing[:3]} (write shards with "
                                 "webdataset.ShardWriter or img2dataset)")
        self.train_samples = int(train_samples)
        self.shuffle_buffer = int(shuffle_buffer)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = True  # streams are built per loader; nothing to load up front

    @property
    def num_train_samples(self) -> int:
        """Training pairs per epoch (``train_samples``); ``index`` is a hash, not below it."""
        return self.train_samples

    # shards are resampled and a sample's ``index`` is a 63-bit hash: no per-index teacher cache
    static_for_teacher = False

    def use_fixed_shards(self) -> None:
        raise KdkitError("webdataset training resamples shards on every rank: fixed per-rank "
                         "shards (teacher.cache) are not possible; set teacher.cache=false")

    def _sample(self, train: bool) -> Callable:
        transform = image_transform(self.image_size, train, self.augment)

        def to_sample(item: dict) -> dict[str, Tensor]:
            key = next((k for k in IMAGE_EXTENSIONS if k in item), None)
            if key is None or "txt" not in item:
                raise KdkitError(f"shard sample {item.get('__key__')} in {item.get('__url__')} lacks "
                                 f"an image ({'/'.join(IMAGE_EXTENSIONS)}) or a .txt caption: "
                                 "rewrite that shard")
            image, text, label = _decode(item, key)
            uid = stable_id(f"{item.get('__url__')}/{item['__key__']}")
            sample = {"image": transform(image), "text": self.tokenizer([text])[0],
                      "index": torch.tensor(uid), "pair_id": torch.tensor(uid)}
            if label is not None:
                sample["label"] = torch.tensor(label)
            return sample

        return to_sample

    def _pipeline(self, split: str, train: bool):
        import webdataset as wds

        handler = _shard_errors(self.urls[split])
        if train:
            data = wds.WebDataset(self.urls[split], resampled=True, shardshuffle=False,
                                  nodesplitter=None, seed=self.seed, handler=handler)
            _check_shard_ends(data, handler)
            data = data.shuffle(self.shuffle_buffer)
        else:
            data = wds.WebDataset(self.urls[split], shardshuffle=False, handler=handler,
                                  nodesplitter=wds.split_by_node, empty_check=False)
            _check_shard_ends(data, handler)
        return data.map(self._sample(train))

    def _steps_per_epoch(self) -> int:
        from kdkit.distributed import world

        steps = self.train_samples // (self.batch_size * world()[1])
        if steps < 1:
            raise KdkitError(f"train_samples={self.train_samples} is less than one global batch")
        return steps

    def train_dataloader(self):
        import webdataset as wds

        steps = self._steps_per_epoch()
        workers = max(1, self.num_workers)
        data = self._pipeline("train", train=True).batched(self.batch_size, partial=False)
        data = data.with_epoch(nbatches=-(-steps // workers))  # per worker
        loader = wds.WebLoader(data, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)
        return loader.slice(steps).with_length(steps, silent=True)

    def _eval_loader(self, split: str):
        data = self._pipeline(split, train=False).batched(self.eval_batch_size, partial=True)
        return DataLoader(data, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def example_batch(self, n: int | None = None) -> dict[str, Tensor]:
        """The first ``n`` (default 4) pairs of the first training shard, without augmentation."""
        n = 4 if n is None else n
        import webdataset as wds

        handler = _shard_errors(self.urls["train"][:1])
        data = wds.WebDataset(self.urls["train"][:1], shardshuffle=False, empty_check=False,
                              handler=handler)
        _check_shard_ends(data, handler)
        samples = [s for _, s in zip(range(n), data.map(self._sample(train=False)))]
        return default_collate(samples)


SHARD = "webdataset shard"


def _decode(item: dict, key: str) -> tuple:
    """(PIL image, caption, class index or None) of a shard sample, as webdataset's "pil"
    decoding gives them; a field that does not decode raises a KdkitError naming the sample."""
    from PIL import Image

    where = f"{item.get('__key__')}.{{}} in {SHARD} {item.get('__url__')}"
    hint = "rewrite or replace that shard"
    try:
        image = Image.open(io.BytesIO(item[key]))
        image.load()
    except (OSError, SyntaxError) as err:  # PIL: not an image, truncated, broken header
        raise file_error(where.format(key), "image", err, hint) from None
    try:
        text = item["txt"].decode("utf-8")
    except UnicodeDecodeError as err:
        raise file_error(where.format("txt"), "caption", err, hint) from None
    label = None
    if "cls" in item:
        try:
            label = int(item["cls"])
        except ValueError:
            raise file_error(where.format("cls"), "class index", f"not an integer: {item['cls'][:20]!r}",
                             hint) from None
    return image, text, label


def _shard_errors(urls: Sequence[str]) -> Callable[[Exception], bool]:
    """A webdataset exception handler: a shard that cannot be opened or read (webdataset adds
    the shard's URL to the exception's args) raises a one-line KdkitError naming it; anything
    else is raised as it is."""
    known = set(urls)

    def handler(exn: Exception) -> bool:
        url = next((a for a in exn.args if isinstance(a, str) and a in known), None)
        url = url or getattr(exn, "filename", None)
        if url is None or not isinstance(exn, ARCHIVE_ERRORS):
            raise exn
        first = str(exn.args[0]) if exn.args else ""
        reason = f"{type(exn).__name__}: {first.split(' @ ')[0]}" if first else type(exn).__name__
        raise file_error(url, SHARD, exn if isinstance(exn, OSError) and exn.filename else reason) from None

    return handler


class _CheckedShardOpen:
    """Opens local shards as webdataset's ``StreamingOpen`` does, and checks each uncompressed
    ``.tar`` shard, as tarfile stops without a word at a damaged or missing header, dropping the
    rest of the shard: it must end in a zero end-of-archive block (else it is cut off), and once
    webdataset's tar reader is done with it, only zeros may be left unread (a damage in the last
    ~10 KB, read ahead by tarfile, goes unseen). Remote URLs are opened by webdataset."""

    def __init__(self, handler: Callable[[Exception], bool]):
        self.handler = handler

    def __call__(self, urls):
        from webdataset.cache import StreamingOpen

        for url in urls:
            url = url["url"] if isinstance(url, dict) else url
            parsed = urlparse(url)
            if parsed.scheme not in ("", "file"):
                yield from StreamingOpen(handler=self.handler)([url])
                continue
            try:
                stream = open(parsed.path, "rb")
            except OSError as exn:
                if self.handler(exn):
                    continue
                break
            with stream:
                plain = parsed.path.lower().endswith(".tar")
                if plain:  # cut off: not whole 512-byte blocks, or no zero end block
                    size = os.fstat(stream.fileno()).st_size
                    stream.seek(max(size - 512, 0))
                    if size % 512 or size < 512 or stream.read(512).count(0) != 512:
                        raise file_error(url, SHARD, f"{size} bytes, not ending in tar's "
                                                     "end-of-archive blocks")
                    stream.seek(0)
                yield dict(url=url, stream=stream, local_path=parsed.path)
                # resumed: webdataset has read this shard and asks for the next one
                while plain and (chunk := stream.read(1 << 20)):
                    if chunk.count(0) != len(chunk):
                        raise file_error(url, SHARD, "a damaged tar header: webdataset stopped "
                                                     "reading before the end of the shard")


def _check_shard_ends(data, handler: Callable[[Exception], bool]) -> None:
    """Swap webdataset's shard opener in ``data`` for ``_CheckedShardOpen`` (when it has one:
    with ``WDS_CACHE`` set webdataset opens through its file cache, and that is kept)."""
    from webdataset.cache import StreamingOpen

    stages = getattr(data, "pipeline", [])
    for i, stage in enumerate(stages):
        if isinstance(stage, StreamingOpen):
            stages[i] = _CheckedShardOpen(handler)
            return


def _expand(urls: str | Sequence[str]) -> list[str]:
    import braceexpand

    if isinstance(urls, str):
        urls = urls.split("::")  # open_clip's separator for several shard lists
    return [u for spec in urls for u in braceexpand.braceexpand(str(spec))]
