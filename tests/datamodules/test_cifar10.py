"""CIFAR-10 from the real JPEG archives (decoded once per session, by two racing threads), the
splits, the augmentation, and the offline/online fallbacks."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.datamodules import cifar10
from kdkit.datamodules.cifar10 import CLASSES, CIFAR10DataModule, RandomCropFlip, load_cifar10_arrays
from kdkit.errors import KdkitError
from tests.datamodules.fault_helpers import flip_middle, one_line, truncate


def real_archive_dir() -> Path:
    archive_dir = Path(os.environ.get("KDKIT_DATA_DIR", "/work/shared/data")) / "cifar10-jpeg"
    if not archive_dir.is_dir():
        pytest.skip(f"CIFAR-10 archives not found at {archive_dir}: set KDKIT_DATA_DIR (CI does)")
    return archive_dir


def count_members(archive_dir: Path) -> dict[str, Counter]:
    """``{split: Counter(class index)}`` of the JPEGs listed in the archives, read with tarfile
    (not with the code under test): the data decides the counts, as train parts may be added."""
    counts = {"train": Counter(), "test": Counter()}
    for archive in [*sorted(archive_dir.glob("train-part*.tar.gz")), archive_dir / "test.tar.gz"]:
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".jpg"):
                    split, label, _ = member.name.split("/")[-3:]
                    counts[split][CLASSES.index(label)] += 1
    return counts


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """(archive_dir, cache_dir, arrays): the real archives decoded once into a fresh cache."""
    archive_dir = real_archive_dir()
    cache = tmp_path_factory.mktemp("cifar10-cache")
    return archive_dir, cache, load_cifar10_arrays(archive_dir, cache)


@pytest.fixture(scope="session")
def counts(real) -> dict[str, Counter]:
    return count_members(real[0])


def test_cache_is_one_complete_file_and_is_reused(real, monkeypatch):
    archive_dir, cache, arrays = real
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("tensors-")  # no temporary leftovers
    monkeypatch.setattr(cifar10, "decode_archives", lambda *_: pytest.fail("decoded twice"))
    again = load_cifar10_arrays(archive_dir, cache)
    assert all(torch.equal(again[k], arrays[k]) for k in arrays)


def test_counts_and_classes(real, counts):
    arrays = real[2]
    parts = sorted(real[0].glob("train-part*.tar.gz"))
    assert len(parts) >= 1
    n_train, n_test = sum(counts["train"].values()), sum(counts["test"].values())
    assert n_train >= 1000 * len(parts) and n_test > 0  # every part counts (1,000 per class each)
    assert arrays["train_images"].shape == (n_train, 3, 32, 32)
    assert arrays["test_images"].shape == (n_test, 3, 32, 32)
    assert arrays["train_images"].dtype == torch.uint8
    for split in ("train", "test"):
        assert sorted(counts[split]) == list(range(10))
        assert Counter(arrays[f"{split}_labels"].tolist()) == counts[split]


def test_pixels_match_pil_decoding(real, counts):
    archive_dir, _, arrays = real
    with tarfile.open(archive_dir / "test.tar.gz") as tf:
        cats = sorted(m.name for m in tf.getmembers() if m.name.startswith("test/cat/"))
        raw = tf.extractfile(cats[0]).read()
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(raw)).convert("RGB"))).permute(2, 0, 1)
    # class-major, file-name order: the first cat follows every test image of the earlier classes
    index = sum(counts["test"][c] for c in range(CLASSES.index("cat")))
    assert arrays["test_labels"][index] == CLASSES.index("cat")
    diff = (arrays["test_images"][index].int() - expected.int()).abs()
    assert diff.max() <= 1, diff.max()  # same libjpeg-turbo decoder: identical or off by one
    assert expected.float().std() > 10  # a real image, not a blank


@pytest.fixture(scope="session")
def dm(real):
    archive_dir, cache, _ = real
    module = CIFAR10DataModule(archive_dir=archive_dir, cache_dir=cache, batch_size=100, seed=0)
    module.setup()
    return module


def test_splits(dm, real, counts):
    n_train, n_test = sum(counts["train"].values()), sum(counts["test"].values())
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (n_train - 1000, 1000, n_test)
    assert dm.num_train_samples == n_train - 1000 and dm.num_classes == 10
    train, val = dm.split_indices["train"], dm.split_indices["val"]
    assert sorted(torch.cat([train, val]).tolist()) == list(range(n_train))
    val_counts = Counter(dm.val_set.labels.tolist())  # stratified: each class its share of 1000
    assert sum(val_counts.values()) == 1000
    assert all(abs(val_counts[c] - 1000 * counts["train"][c] / n_train) <= 1 for c in range(10)), val_counts
    arrays = real[2]
    assert torch.equal(dm.val_set.images, arrays["train_images"][val])
    assert torch.equal(dm.train_set.labels, arrays["train_labels"][train])
    assert Counter(dm.test_set.labels.tolist()) == counts["test"]
    # fixed mixed order: short prefixes (limit_test_batches, example_batch) see many classes
    assert len(set(dm.test_set.labels[:50].tolist())) >= 8
    assert len(set(dm.example_batch(8)["label"].tolist())) >= 4
    again = CIFAR10DataModule(archive_dir=dm.archive_dir, cache_dir=dm.cache_dir, seed=5)
    again.setup()
    assert torch.equal(again.test_set.labels, dm.test_set.labels)
    assert torch.equal(again.split_indices["train"], train)
    assert dm.mean == cifar10.CIFAR10_MEAN and dm.std == cifar10.CIFAR10_STD


def test_val_size_zero_validates_on_test_and_train_limit(real):
    archive_dir, cache, _ = real
    module = CIFAR10DataModule(archive_dir=archive_dir, cache_dir=cache, val_size=0, train_limit=500)
    module.setup()
    assert module.val_set is module.test_set
    assert Counter(module.train_set.labels.tolist()) == {c: 50 for c in range(10)}


def test_loaders_yield_the_batch_schema(dm):
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (100, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert batch["label"].dtype == batch["index"].dtype == torch.long
    assert torch.equal(batch["label"], dm.train_set.labels[batch["index"]])
    assert len(dm.train_dataloader()) == len(dm.train_set) // 100  # the remainder is dropped
    test = next(iter(dm.test_dataloader()))
    assert torch.equal(test["index"], torch.arange(100))
    torch.testing.assert_close(test["image"], dm.test_set.images[:100].float() / 255)


def test_augmentation_is_random_but_example_batch_is_not(dm):
    assert not dm.static_for_teacher
    torch.manual_seed(0)
    a = dm.train_set[3]["image"]
    torch.manual_seed(0)
    assert torch.equal(a, dm.train_set[3]["image"])  # seeded: reproducible
    views = {tuple(dm.train_set[3]["image"].flatten()[:200].tolist()) for _ in range(10)}
    assert len(views) > 1
    example = dm.example_batch(4)
    torch.testing.assert_close(example["image"], dm.train_set.images[:4].float() / 255)
    plain = CIFAR10DataModule(archive_dir=dm.archive_dir, cache_dir=dm.cache_dir, augment=False)
    assert plain.static_for_teacher


def _candidates(image: torch.Tensor, pad: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every crop/flip the augmentation may produce, built with numpy (an independent path)."""
    arr = np.pad(image.numpy(), ((0, 0), (pad, pad), (pad, pad)))
    out = []
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = arr[:, top:top + image.shape[1], left:left + image.shape[2]]
            for flip in (False, True):
                view = np.ascontiguousarray(crop[:, :, ::-1] if flip else crop)
                out.append((top, left, flip, torch.from_numpy(view)))
    return out


def test_random_crop_flip_draws_every_crop_and_flip_uniformly():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 6, 6, generator=g) + 0.1  # no zeros: padding is recognisable
    candidates = _candidates(image, pad=2)
    augment = RandomCropFlip(padding=2)
    torch.manual_seed(0)
    seen = Counter()
    for _ in range(2500):
        out = augment(image)
        assert out.shape == image.shape and out.is_contiguous()
        matches = [(top, left, flip) for top, left, flip, c in candidates if torch.equal(out, c)]
        assert len(matches) == 1
        seen[matches[0]] += 1
    assert len(seen) == 50  # all 5 x 5 offsets x 2 flips occur
    flips = sum(n for (_, _, f), n in seen.items() if f) / 2500
    assert abs(flips - 0.5) < 0.04
    assert max(seen.values()) < 3 * 2500 / 50  # no offset strongly favoured


def test_augmentation_speed_is_fine_for_cpu_training(dm):
    import time

    start = time.perf_counter()
    for i in range(2000):
        dm.train_set[i]
    per_sample = (time.perf_counter() - start) / 2000
    assert per_sample < 1e-3, f"{per_sample * 1e6:.0f} us per sample"


def test_missing_archives_say_how_to_get_them(tmp_path):
    module = CIFAR10DataModule(archive_dir=tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    with pytest.raises(KdkitError, match="archives not found in .*nowhere.*KDKIT_DATA_DIR.*download=true"):
        module.setup()


def test_download_path_uses_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:  # torchvision's attributes: data [N, 32, 32, 3] uint8, targets list
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            n = 20 if train else 10
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3).astype(np.uint8)
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    arrays = load_cifar10_arrays(tmp_path / "none", tmp_path / "cache", download=True)
    assert [c[1:] for c in calls] == [(True, True), (False, True)]
    assert arrays["train_images"].shape == (20, 3, 32, 32)
    expected = FakeCIFAR10(None, True, True).data
    assert torch.equal(arrays["train_images"][7, 2], torch.from_numpy(expected[7, :, :, 2]))
    assert arrays["test_labels"].tolist() == [i % 10 for i in range(10)]
    load_cifar10_arrays(tmp_path / "none", tmp_path / "cache", download=True)
    assert len(calls) == 3  # the second call read the tensor cache (one FakeCIFAR10 above)


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tar(path: Path, split: str, per_class: int, offset: int = 0) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                data = _jpeg((label * 25, i * 40, 200))
                info = tarfile.TarInfo(f"{split}/{name}/{offset + i:04d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_every_train_part_counts_and_a_new_part_invalidates_the_cache(tmp_path):
    archives, cache = tmp_path / "archives", tmp_path / "cache"
    archives.mkdir()
    _tar(archives / "train-part0.tar.gz", "train", 2)
    _tar(archives / "test.tar.gz", "test", 1)
    first = load_cifar10_arrays(archives, cache)
    assert first["train_images"].shape[0] == 20 and first["test_images"].shape[0] == 10
    _tar(archives / "train-part1.tar.gz", "train", 3, offset=2)
    second = load_cifar10_arrays(archives, cache)
    assert Counter(second["train_labels"].tolist()) == {c: 5 for c in range(10)}
    assert len(list(cache.glob("tensors-*.pt"))) == 2
    # class-major, then file name: the first image of class 1 is train-part0's 0000.jpg
    pixel = second["train_images"][5, :, 16, 16].tolist()
    assert all(abs(p - q) <= 3 for p, q in zip(pixel, (25, 0, 200)))


def test_concurrent_builders_share_one_cache(tmp_path, monkeypatch):
    """Two processes of a job (threads here) decoding into one cache at the same moment: both get
    the same arrays, and one complete cache file is left."""
    archives, cache = tmp_path / "archives", tmp_path / "cache"
    archives.mkdir()
    _tar(archives / "train-part0.tar.gz", "train", 20)
    _tar(archives / "test.tar.gz", "test", 5)
    results, start, decodes = [None, None], threading.Barrier(2), []
    real_decode = cifar10.decode_archives

    def counted_decode(*args):
        decodes.append(1)
        out = real_decode(*args)
        start_writes.wait(timeout=30)  # both decode before either writes: a real race
        return out

    start_writes = threading.Barrier(2)
    monkeypatch.setattr(cifar10, "decode_archives", counted_decode)

    def build(i):
        start.wait()
        results[i] = load_cifar10_arrays(archives, cache)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results
    assert len(decodes) == 2
    assert a is not None and b is not None and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["train_images"].shape == (200, 3, 32, 32)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("tensors-")
    assert all(torch.equal(v, torch.load(files[0], weights_only=True)[k]) for k, v in a.items())


def test_foreign_layout_is_refused(tmp_path):
    with tarfile.open(tmp_path / "train-part0.tar.gz", "w:gz") as tf:
        data = _jpeg((0, 0, 0))
        info = tarfile.TarInfo("train/unicorn/0000.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    _tar(tmp_path / "test.tar.gz", "test", 1)
    with pytest.raises(KdkitError, match="unexpected file train/unicorn/0000.jpg"):
        load_cifar10_arrays(tmp_path, tmp_path / "cache")


# ---- damaged archives, caches and options: one line naming the file, saying what to do ----------
CORRUPT = "corrupt or truncated: re-download or replace it"


def _real_copy(tmp_path: Path, damage) -> Path:
    """A folder with a damaged copy of the real test archive and a tiny intact train part."""
    folder = tmp_path / "archives"
    folder.mkdir()
    _tar(folder / "train-part0.tar.gz", "train", 1)
    test = folder / "test.tar.gz"
    test.write_bytes((real_archive_dir() / "test.tar.gz").read_bytes())
    damage(test)
    return test


def test_truncated_test_archive(tmp_path):
    test = _real_copy(tmp_path, truncate)
    with pytest.raises(KdkitError) as err:
        load_cifar10_arrays(test.parent, tmp_path / "cache")
    message = one_line(err, test, "CIFAR-10 archive", CORRUPT)
    assert "EOFError" in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_flipped_bytes_in_the_test_archive_are_not_missing_classes(tmp_path):
    test = _real_copy(tmp_path, flip_middle)
    with pytest.raises(KdkitError) as err:
        load_cifar10_arrays(test.parent, tmp_path / "cache")
    assert "lack the classes" not in one_line(err, test, "CIFAR-10 archive", CORRUPT)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"\x1f\x8b garbage" * 99, "not a tar archive")])
def test_empty_or_garbage_train_part(tmp_path, content, reason):
    _tar(tmp_path / "test.tar.gz", "test", 1)
    part = tmp_path / "train-part1.tar.gz"
    _tar(tmp_path / "train-part0.tar.gz", "train", 1)
    part.write_bytes(content)
    with pytest.raises(KdkitError) as err:
        load_cifar10_arrays(tmp_path, tmp_path / "cache")
    assert reason in one_line(err, part, CORRUPT)


def test_a_directory_named_like_the_test_archive(tmp_path):
    _tar(tmp_path / "train-part0.tar.gz", "train", 1)
    (tmp_path / "test.tar.gz").mkdir()
    with pytest.raises(KdkitError) as err:
        load_cifar10_arrays(tmp_path, tmp_path / "cache")
    one_line(err, tmp_path / "test.tar.gz", "it is a directory")


def test_a_damaged_jpeg_is_named(tmp_path):
    _tar(tmp_path / "train-part0.tar.gz", "train", 2)
    with tarfile.open(tmp_path / "test.tar.gz", "w:gz") as tf:
        for label, name in enumerate(CLASSES):
            data = _jpeg((label, 0, 0))
            if name == "dog":
                data = data[: len(data) // 3]  # a truncated JPEG inside an intact archive
            info = tarfile.TarInfo(f"test/{name}/0000.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(KdkitError) as err:
        load_cifar10_arrays(tmp_path, tmp_path / "cache")
    one_line(err, f"test/dog/0000.jpg in {tmp_path / 'test.tar.gz'}", "re-download or replace test.tar.gz")


def test_an_image_in_two_train_parts_is_refused(tmp_path):
    _tar(tmp_path / "train-part0.tar.gz", "train", 2)
    _tar(tmp_path / "train-part0-copy.tar.gz", "train", 1)  # matches train-part*: a second part
    _tar(tmp_path / "test.tar.gz", "test", 1)
    with pytest.raises(KdkitError) as err:
        load_cifar10_arrays(tmp_path, tmp_path / "cache")
    one_line(err, "train/airplane/0000.jpg", "train-part0-copy.tar.gz", "remove the extra copy")


def test_a_damaged_tensor_cache_is_named(tmp_path):
    _tar(tmp_path / "train-part0.tar.gz", "train", 1)
    _tar(tmp_path / "test.tar.gz", "test", 1)
    load_cifar10_arrays(tmp_path, tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("tensors-*.pt")
    truncate(cached)
    with pytest.raises(KdkitError) as err:
        load_cifar10_arrays(tmp_path, tmp_path / "cache")
    one_line(err, cached, "delete it")


@pytest.mark.parametrize("data_dir", ["missing", "empty"])
def test_a_warm_download_cache_warns_about_the_data_dir(tmp_path, capsys, data_dir):
    from kdkit.checkpoint_io import save_atomically

    archive_dir = tmp_path / data_dir
    if data_dir == "empty":
        archive_dir.mkdir()
    cached = tmp_path / "cache" / "tensors-torchvision.pt"
    arrays = {f"{s}_{k}": torch.zeros(2, *shape, dtype=dt) for s in ("train", "test")
              for k, shape, dt in (("images", (3, 32, 32), torch.uint8), ("labels", (), torch.long))}
    save_atomically(arrays, cached)
    module = CIFAR10DataModule(archive_dir=archive_dir, cache_dir=tmp_path / "cache", download=True)
    module.prepare_data()
    assert load_cifar10_arrays(archive_dir, tmp_path / "cache", download=True)["train_images"].shape[0] == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings  # once, however often the data is looked up
    assert str(archive_dir) in warnings[0] and str(cached) in warnings[0] and "KDKIT_DATA_DIR" in warnings[0]


def test_no_warning_when_the_archives_are_there(tmp_path, capsys):
    _tar(tmp_path / "train-part0.tar.gz", "train", 1)
    _tar(tmp_path / "test.tar.gz", "test", 1)
    load_cifar10_arrays(tmp_path, tmp_path / "cache", download=True)
    load_cifar10_arrays(tmp_path, tmp_path / "cache", download=True)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("eval_batch_size", 0), ("num_workers", -1),
                                           ("batch_size", "many")])
def test_bad_loader_options_are_refused_up_front(tmp_path, option, value):
    with pytest.raises(KdkitError) as err:
        CIFAR10DataModule(archive_dir=tmp_path, cache_dir=tmp_path, **{option: value})
    shown = repr(value) if isinstance(value, str) else value
    one_line(err, f"data.{option}={shown} must be a whole number >=")


def test_deits_strong_augmentation_follows_the_crop_and_flip(real):
    archive_dir, cache, _ = real
    strong = CIFAR10DataModule(archive_dir=archive_dir, cache_dir=cache, randaugment_ops=2, random_erasing=0.25)
    strong.setup()
    steps = strong.train_set.transform.steps
    assert [type(s).__name__ for s in steps] == ["RandomCropFlip", "RandAugment", "RandomErasingNoise"]
    assert strong.plain_train_set.transform is None and not strong.static_for_teacher
    torch.manual_seed(0)
    image = strong.train_set[0]["image"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    alone = CIFAR10DataModule(archive_dir=archive_dir, cache_dir=cache, augment=False, randaugment_ops=1)
    alone.setup()
    assert type(alone.train_set.transform).__name__ == "RandAugment" and not alone.static_for_teacher
