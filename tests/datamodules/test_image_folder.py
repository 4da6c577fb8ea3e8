"""ImageFolder datamodule on a tiny tree of PNGs written here: schema, transforms, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from kdkit.datamodules.image_folder import ImageFolderDataModule
from kdkit.errors import KdkitError
from tests.datamodules.fault_helpers import needs_non_root, one_line

COLORS = {"ant": (255, 0, 0), "bee": (0, 128, 255), "cat": (10, 200, 30)}


def write_tree(root: Path, per_class: dict[str, int], classes=COLORS) -> Path:
    """One flat colour per class, odd sizes so that resizing and cropping are exercised."""
    for split, n in per_class.items():
        for name, color in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + 7 * i, 30 + 5 * i), color).save(folder / f"{i}.png")
    return root


@pytest.fixture
def root(tmp_path):
    return write_tree(tmp_path / "data", {"train": 4, "val": 2})


def test_batches_follow_the_schema_and_class_folders(root):
    dm = ImageFolderDataModule(root, image_size=16, batch_size=4, num_classes=3)
    dm.setup()
    assert dm.classes == ["ant", "bee", "cat"] and dm.num_classes == 3
    assert (dm.num_train_samples, len(dm.val_set), len(dm.test_set)) == (12, 6, 6)
    assert dm.mean == (0.485, 0.456, 0.406)  # ImageNet statistics by default
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == batch["index"].dtype == torch.long
    # flat colours survive any crop/resize/flip: each image is its class colour, in [0, 1]
    for image, label in zip(batch["image"], batch["label"]):
        color = torch.tensor(COLORS[dm.classes[label]], dtype=torch.float32) / 255
        torch.testing.assert_close(image, color.view(3, 1, 1).expand(3, 16, 16), atol=2 / 255, rtol=0)
    assert len(dm.train_dataloader()) == 3


def test_eval_transform_resizes_short_side_then_centre_crops(tmp_path):
    """A left-white / right-black image: after Resize(short side 16*256/224=18) and a 16 crop,
    the white/black boundary sits where the geometry puts it."""
    folder = tmp_path / "d" / "val" / "only"
    folder.mkdir(parents=True)
    (tmp_path / "d" / "train").mkdir()
    (tmp_path / "d" / "train" / "only").symlink_to(folder, target_is_directory=True)
    img = Image.new("RGB", (90, 45), (0, 0, 0))  # 2:1 -> resized to 36 x 18
    img.paste((255, 255, 255), (0, 0, 45, 45))  # left half white
    img.save(folder / "half.png")
    dm = ImageFolderDataModule(tmp_path / "d", image_size=16, batch_size=1, augment=False)
    dm.setup()
    x = dm.val_set[0]["image"]
    assert x.shape == (3, 16, 16)
    # the 36-wide resize is cropped to columns 10..25; the boundary (column 18) becomes column 8
    assert torch.all(x[:, :, :7] > 0.95) and torch.all(x[:, :, 9:] < 0.05)
    torch.testing.assert_close(dm.example_batch(1)["image"][0], x)  # eval view of the train set


def test_example_batch_is_deterministic(root):
    dm = ImageFolderDataModule(root, image_size=16)
    a, b = dm.example_batch(3), dm.example_batch(3)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], torch.arange(3))
    assert not dm.static_for_teacher
    assert ImageFolderDataModule(root, augment=False).static_for_teacher


def test_test_dir_defaults_to_val_and_can_differ(tmp_path):
    root = write_tree(tmp_path / "d", {"train": 1, "val": 1, "test": 3})
    dm = ImageFolderDataModule(root, image_size=8)
    dm.setup()
    assert dm.test_set is dm.val_set
    dm = ImageFolderDataModule(root, image_size=8, test_dir="test")
    dm.setup()
    assert (len(dm.val_set), len(dm.test_set)) == (3, 9)


def test_errors(tmp_path, root):
    with pytest.raises(KdkitError, match="image folder .*missing/train not found"):
        ImageFolderDataModule(tmp_path / "missing").setup()
    with pytest.raises(KdkitError, match="num_classes=1000 but the data has 3"):
        ImageFolderDataModule(root, num_classes=1000).setup()
    other = write_tree(tmp_path / "other", {"train": 1}, classes=COLORS)
    write_tree(tmp_path / "other", {"val": 1}, classes={"ant": (0, 0, 0), "dog": (1, 1, 1)})
    with pytest.raises(KdkitError, match="class folders that differ"):
        ImageFolderDataModule(other).setup()
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(KdkitError, match="image folder .*empty/train"):
        ImageFolderDataModule(tmp_path / "empty").setup()


# ---- damaged images: one line naming the file and saying what to do -----------------------------
IMAGE_HINT = "replace it with a good copy or delete it"


def _bad_image(root: Path, content: bytes | None, name: str = "bad.jpg") -> Path:
    """Replace one train image of class bee with ``content`` (None: a truncated real JPEG)."""
    folder = root / "train" / "bee"
    path = folder / name
    if content is None:
        Image.new("RGB", (64, 64), (0, 128, 255)).save(path, format="JPEG")
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    return path


def _load_every_train_image(dm):
    dm.setup()
    for i in range(len(dm.train_set)):
        dm.train_set[i]


@pytest.mark.parametrize("content, reason", [
    (b"garbage, not a JPEG" * 10, "UnidentifiedImageError"),
    (b"", "UnidentifiedImageError"),
    (None, "truncated"),
])
def test_a_damaged_image_is_named(root, content, reason):
    path = _bad_image(root, content)
    with pytest.raises(KdkitError) as err:
        _load_every_train_image(ImageFolderDataModule(root, image_size=8))
    assert reason in one_line(err, path, "image", IMAGE_HINT)


def test_an_image_gone_after_the_scan_is_named(root):
    dm = ImageFolderDataModule(root, image_size=8)
    dm.setup()
    path = Path(dm.train_set.folder.samples[5][0])
    path.unlink()
    with pytest.raises(KdkitError) as err:
        dm.train_set[5]
    one_line(err, path, "it is missing")


def test_a_dangling_link_to_an_image(root, tmp_path):
    path = root / "train" / "bee" / "link.png"
    path.symlink_to(tmp_path / "moved-away.png")
    with pytest.raises(KdkitError) as err:
        _load_every_train_image(ImageFolderDataModule(root, image_size=8))
    one_line(err, path, "FileNotFoundError", "restore it or fix the path")


@needs_non_root
def test_an_unreadable_image(root):
    path = root / "train" / "bee" / "0.png"
    path.chmod(0)
    with pytest.raises(KdkitError) as err:
        _load_every_train_image(ImageFolderDataModule(root, image_size=8))
    one_line(err, path, "check its permissions")


def test_an_empty_split_folder_says_what_it_expects(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(KdkitError) as err:
        ImageFolderDataModule(tmp_path / "d").setup()
    one_line(err, tmp_path / "d" / "train", "add the class folders and images")


def test_batch_size_zero_is_refused(root):
    with pytest.raises(KdkitError) as err:
        ImageFolderDataModule(root, batch_size=0)
    one_line(err, "data.batch_size=0 must be a whole number >= 1")


def test_strong_augmentation_and_mixing_on_folders(root):
    """Erasing every image (p=1) leaves one box of noise in the flat class colour; Mixup soft
    labels come through the same loader."""
    dm = ImageFolderDataModule(root, image_size=16, batch_size=4, num_classes=3, random_erasing=1.0,
                               randaugment_ops=0, mixup_alpha=0.8)
    dm.setup()
    torch.manual_seed(0)
    sample = dm.train_set[0]
    color = torch.tensor(COLORS[dm.classes[int(sample["label"])]], dtype=torch.float32).view(3, 1, 1) / 255
    off = ((sample["image"] - color).abs() > 2 / 255).any(0)
    ys, xs = off.nonzero(as_tuple=True)
    assert 0 < int(off.sum()) == int((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].shape == (4, 3)
    torch.testing.assert_close(batch["label"].sum(1), torch.ones(4))
    with pytest.raises(KdkitError, match="set data.augment=true too"):
        ImageFolderDataModule(root, augment=False, randaugment_ops=2)
