"""Image-caption pairs from webdataset tar shards (img2dataset's format), streamed, with every
damaged shard or sample named in its error.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from kdkit.datamodules.archives import ARCHIVE_ERRORS, file_error
from kdkit.datamodules.pairs_files import PairsDataModule, image_transform, stable_id
from kdkit.errors import KdkitError
from kdkit.extras import require

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
