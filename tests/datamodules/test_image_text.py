"""Image-text datamodules: CIFAR-10 captioned pairs (real archives), CSV/TSV files, webdataset."""

import os
import tarfile
from pathlib import Path

import pytest
import torch

from kdkit.datamodules.image_text import (CIFAR_TEMPLATES, CIFAR10PairsDataModule, CSVPairsDataModule,
                                    WebDatasetPairsDataModule)
from kdkit.errors import KdkitError
from kdkit.models.clip import clip_tokenizer
from tests.datamodules.fault_helpers import needs_non_root, one_line, truncate

TOKENIZER = clip_tokenizer("kdkit-vit-p8-d32")


def caption(tokens: torch.Tensor) -> str:
    """Token ids -> text, without the start/end markers."""
    ids = [t for t in tokens.tolist() if t not in (0, 49406, 49407)]
    return TOKENIZER.decode(ids).strip()


def encoded(text: str) -> str:
    return caption(TOKENIZER([text])[0])


# ---- CIFAR-10 pairs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_pairs():
    root = os.environ.get("KDKIT_DATA_DIR", "")
    if not os.path.isdir(os.path.join(root, "cifar10-jpeg")):
        pytest.skip("shared CIFAR-10 archives not found (set KDKIT_DATA_DIR)")
    dm = CIFAR10PairsDataModule(tokenizer=TOKENIZER, archive_dir=os.path.join(root, "cifar10-jpeg"),
                                batch_size=32, val_size=1000)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def jpeg_count(*archives: Path) -> int:
    """JPEGs listed in the archives, counted with tarfile: the data decides (parts may be added)."""
    total = 0
    for archive in archives:
        with tarfile.open(archive) as tf:
            total += sum(1 for m in tf if m.isfile() and m.name.endswith(".jpg"))
    return total


def test_cifar_pairs_captions_name_the_class(cifar_pairs):
    dm = cifar_pairs
    assert dm.class_names[:2] == ["airplane", "automobile"] and dm.templates == list(CIFAR_TEMPLATES)
    n_train = jpeg_count(*sorted(dm.archive_dir.glob("train-part*.tar.gz")))
    n_test = jpeg_count(dm.archive_dir / "test.tar.gz")
    assert n_train > 1000 and n_test > 1234
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (n_train - 1000, 1000, n_test)
    sample = dm.test_set[1234]
    assert set(sample) == {"image", "label", "index", "text", "pair_id"}
    assert sample["image"].shape == (3, 32, 32) and 0 <= sample["image"].min() <= sample["image"].max() <= 1
    assert sample["pair_id"] == sample["label"]
    name = dm.class_names[int(sample["label"])]
    # evaluation: template index mod T, so every image keeps one caption
    assert caption(sample["text"]) == encoded(CIFAR_TEMPLATES[1234 % 18].format(name))
    assert torch.equal(dm.test_set[1234]["text"], sample["text"])


def test_cifar_pairs_training_draws_varied_templates(cifar_pairs):
    dm = cifar_pairs
    label = int(dm.train_set[7]["label"])
    allowed = {encoded(t.format(dm.class_names[label])) for t in CIFAR_TEMPLATES}
    torch.manual_seed(0)
    seen = {caption(dm.train_set[7]["text"]) for _ in range(40)}
    assert seen <= allowed and len(seen) > 5
    batch = dm.example_batch(6)
    assert batch["text"].shape == (6, 16) and torch.equal(batch["index"], torch.arange(6))
    assert torch.equal(dm.example_batch(6)["text"], batch["text"])  # deterministic
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (32, 3, 32, 32) and train["text"].dtype == torch.long


# ---- CSV / TSV --------------------------------------------------------------------------------
def write_images(folder, n=3):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + 8 * i, 40), color=(60 * i, 100, 200)).save(folder / f"im{i}.png")


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_pairs_file_reads_rows_and_groups_captions_of_one_image(tmp_path, suffix):
    write_images(tmp_path / "img")
    sep = "\t" if suffix == ".tsv" else ","
    rows = [("img/im0.png", "a red square", "cat"), ("img/im1.png", "a green one", "dog"),
            ("img/im0.png", "the same red image", "cat"), ("img/im2.png", "blue", "dog")]
    path = tmp_path / f"pairs{suffix}"
    path.write_text("\n".join(sep.join(r) for r in [("filepath", "title", "cls"), *rows]) + "\n")
    dm = CSVPairsDataModule(train_file=str(path), tokenizer=TOKENIZER, image_size=24, batch_size=2,
                            label_key="cls", class_names=["cat", "dog"])
    dm.setup("fit")
    assert dm.num_train_samples == 4 and dm.num_classes == 2
    assert dm.test_set.pair_ids.tolist() == [0, 1, 0, 3]  # both captions of im0 match it
    sample = dm.test_set[2]
    assert caption(sample["text"]) == "the same red image" and sample["label"] == 0
    assert sample["image"].shape == (3, 24, 24)
    assert sample["image"][2].mean().item() == pytest.approx(200 / 255, abs=1e-3)  # blue channel
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 24, 24) and set(batch) >= {"text", "pair_id", "label"}


def test_pairs_file_errors_say_what_is_wrong(tmp_path):
    path = tmp_path / "pairs.csv"
    with pytest.raises(KdkitError, match="pairs file not found"):
        CSVPairsDataModule(train_file=str(path), tokenizer=TOKENIZER).setup()
    path.write_text("image,text\nx.png,hello\n")
    with pytest.raises(KdkitError, match=r"missing columns \['filepath', 'title'\]"):
        CSVPairsDataModule(train_file=str(path), tokenizer=TOKENIZER).setup()
    dm = CSVPairsDataModule(train_file=str(path), tokenizer=TOKENIZER, image_key="image", caption_key="text")
    dm.setup()
    with pytest.raises(KdkitError, match="image not found"):
        dm.train_set[0]


# ---- webdataset -------------------------------------------------------------------------------
def write_shards(folder, prefix, n_shards, per_shard):
    import io

    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{prefix}-{s:03d}.tar")) as sink:
            for _ in range(per_shard):
                buf = io.BytesIO()
                Image.new("RGB", (20, 20), color=(k, 0, 0)).save(buf, format="PNG")
                sink.write({"__key__": f"{k:05d}", "png": buf.getvalue(), "txt": f"sample {k}",
                            "cls": str(k % 3)})
                k += 1
    return str(folder / f"{prefix}-{{000..{n_shards - 1:03d}}}.tar")


def test_webdataset_equal_train_batches_and_every_test_sample_once(tmp_path):
    train = write_shards(tmp_path, "train", 2, 5)
    test = write_shards(tmp_path, "test", 2, 4)
    dm = WebDatasetPairsDataModule(train_urls=train, test_urls=test, train_samples=10,
                                   tokenizer=TOKENIZER, image_size=16, batch_size=3, eval_batch_size=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # 10 // 3 full batches per epoch
    assert all(b["image"].shape == (3, 3, 16, 16) and b["text"].shape == (3, 16) for b in batches)
    seen = torch.cat([b["index"] for b in dm.test_dataloader()])
    assert len(seen) == 8 and len(set(seen.tolist())) == 8
    texts = {caption(t) for b in dm.test_dataloader() for t in b["text"]}
    assert texts == {f"sample {k}" for k in range(8)}
    example = dm.example_batch(2)
    assert caption(example["text"][0]) == "sample 0" and example["label"].tolist() == [0, 1]
    assert torch.equal(example["index"], example["pair_id"])


def test_webdataset_missing_shards(tmp_path):
    with pytest.raises(KdkitError, match="train shards not found"):
        WebDatasetPairsDataModule(train_urls=str(tmp_path / "x-{0..1}.tar"), test_urls=str(tmp_path / "y.tar"),
                                  train_samples=4, tokenizer=TOKENIZER)


def test_yaml_configs_build_the_datamodules(tmp_path):
    from hydra.utils import instantiate

    from kdkit.compose import compose

    write_images(tmp_path / "img", 1)
    (tmp_path / "p.csv").write_text("filepath,title\nimg/im0.png,a picture\n")
    shards = write_shards(tmp_path, "s", 1, 2)
    base = ["experiment=cifar10_clip"]
    csv_dm = instantiate(compose([*base, "data=image_text_csv", f"data.train_file={tmp_path / 'p.csv'}"]).data)
    wds_dm = instantiate(compose([*base, "data=image_text_wds", f"data.train_urls='{shards}'",
                                  f"data.test_urls='{shards}'", "data.train_samples=2"]).data)
    pairs_dm = instantiate(compose(base).data)
    assert isinstance(csv_dm, CSVPairsDataModule) and isinstance(wds_dm, WebDatasetPairsDataModule)
    assert isinstance(pairs_dm, CIFAR10PairsDataModule) and pairs_dm.tokenizer.context_length == 16
    assert csv_dm.example_batch(1)["text"].shape == (1, 16)


# ---- damaged files: one line naming the file and saying what to do ------------------------------
def pairs_module(path, **kwargs):
    return CSVPairsDataModule(train_file=str(path), tokenizer=TOKENIZER, image_size=8, **kwargs)


@pytest.mark.parametrize("content, reason, todo", [
    (b"", "is empty", "write a header line"),
    (b"filepath,title\n", "has a header but no rows", "add one row per image-caption pair"),
    (b"filepath,title\nimg/im0.png,one\nimg/im1.png\n", "line 3 has fewer fields than its header", "fix that row"),
    (b"filepath,title\n" + bytes(range(128, 256)), "UnicodeDecodeError", "save it as UTF-8"),
])
def test_a_bad_pairs_file(tmp_path, content, reason, todo):
    path = tmp_path / "pairs.csv"
    path.write_bytes(content)
    with pytest.raises(KdkitError) as err:
        pairs_module(path).setup()
    assert reason in one_line(err, path, todo)


def test_a_directory_where_the_pairs_file_belongs(tmp_path):
    (tmp_path / "pairs.csv").mkdir()
    with pytest.raises(KdkitError) as err:
        pairs_module(tmp_path / "pairs.csv").setup()
    one_line(err, tmp_path / "pairs.csv", "it is a directory")


@needs_non_root
def test_an_unreadable_pairs_file(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\nx.png,hello\n")
    path.chmod(0)
    with pytest.raises(KdkitError) as err:
        pairs_module(path).setup()
    one_line(err, path, "check its permissions")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_image_in_a_pairs_file_is_named(tmp_path, damage):
    write_images(tmp_path / "img", 2)
    image = tmp_path / "img" / "im1.png"
    if damage == "garbage":
        image.write_bytes(b"not a picture" * 20)
    else:
        truncate(image, 0.5)
    (tmp_path / "pairs.csv").write_text("filepath,title\nimg/im0.png,zero\nimg/im1.png,one\n")
    dm = pairs_module(tmp_path / "pairs.csv")
    dm.setup()
    assert dm.train_set[0]["image"].shape == (3, 8, 8)
    with pytest.raises(KdkitError) as err:
        dm.train_set[1]
    one_line(err, image, f"listed in {tmp_path / 'pairs.csv'}", "replace it with a good copy")


def shard_files(tmp_path, n=6) -> tuple[Path, str]:
    pattern = write_shards(tmp_path, "s", 1, n)
    return tmp_path / "s-000.tar", pattern


def wds_module(urls, **kwargs):
    return WebDatasetPairsDataModule(train_urls=urls, test_urls=urls, train_samples=4, tokenizer=TOKENIZER,
                                     image_size=8, batch_size=2, eval_batch_size=2, **kwargs)


def read_test_split(dm):
    return [b for b in dm.test_dataloader()]


@pytest.mark.parametrize("damage", ["empty", "truncated", "cut at a member", "damaged header", "garbage"])
def test_a_damaged_shard_is_named(tmp_path, damage):
    from tests.datamodules.fault_helpers import damage_header, header_offsets

    shard, urls = shard_files(tmp_path)
    data = shard.read_bytes()
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) * 3 // 5]
    elif damage == "cut at a member":
        data = data[: header_offsets(data)[7]]
    elif damage == "damaged header":
        data = damage_header(data, 3)  # the first file of sample 1 (3 files per sample)
    else:
        data = os.urandom(len(data))
    shard.write_bytes(data)
    dm = wds_module(urls)
    for read in (read_test_split, lambda dm: dm.example_batch(6)):
        with pytest.raises(KdkitError) as err:
            read(dm)
        one_line(err, f"webdataset shard {shard}", "re-download or replace it")


def test_intact_shards_read_fully(tmp_path):
    _, urls = shard_files(tmp_path)
    texts = [caption(t) for b in read_test_split(wds_module(urls)) for t in b["text"]]
    assert texts == [f"sample {k}" for k in range(6)]


@pytest.mark.parametrize("field, content, what", [
    ("png", b"not a png", "image"),
    ("txt", b"\xff\xfe caption", "caption"),
    ("cls", b"three", "class index"),
])
def test_a_damaged_sample_in_a_shard_is_named(tmp_path, field, content, what):
    import io

    import webdataset as wds
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    good = {"png": buf.getvalue(), "txt": "fine", "cls": "1"}
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "00000", **good})
        sink.write({"__key__": "00001", **good, field: content})
    with pytest.raises(KdkitError) as err:
        read_test_split(wds_module(str(tmp_path / "s.tar")))
    one_line(err, f"{what} 00001.{field} in webdataset shard {tmp_path / 's.tar'}", "rewrite or replace that shard")


def test_a_shard_gone_after_the_start_is_named(tmp_path):
    shard, urls = shard_files(tmp_path)
    dm = wds_module(urls)
    shard.unlink()
    with pytest.raises(KdkitError) as err:
        read_test_split(dm)
    one_line(err, shard, "FileNotFoundError", "restore it or fix the path")


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("eval_batch_size", 0), ("num_workers", -1)])
def test_bad_loader_options_are_refused(tmp_path, option, value):
    (tmp_path / "p.csv").write_text("filepath,title\nx.png,hi\n")
    with pytest.raises(KdkitError) as err:
        pairs_module(tmp_path / "p.csv", **{option: value})
    one_line(err, f"data.{option}={value} must be a whole number >=")


def test_cifar_pairs_transfer_view_hides_captions_and_not_images(cifar_pairs):
    """data.labeled_count on image-text pairs: the other images lose their caption (the label in
    text form), say so in ``captioned``, and keep their pixels; the labelled view keeps every
    caption. Without this the caption leaked the hidden class to the student."""
    dm = CIFAR10PairsDataModule(tokenizer=TOKENIZER, archive_dir=cifar_pairs.archive_dir, batch_size=32,
                                val_size=1000, labeled_count=100, augment=False)
    dm.setup("fit")
    dm.use_train_view("transfer")
    view = dm.plain_train_view
    assert len(view) == len(dm.train_set) and view.num_unlabeled == len(view) - 100
    shown = [i for i in range(len(view)) if not view.hidden[i]]
    hidden = [i for i in range(len(view)) if view.hidden[i]][:50]
    for i in shown[:50] + hidden:
        sample, original = view[i], dm.plain_train_set[i]
        assert torch.equal(sample["image"], original["image"])
        if view.hidden[i]:
            assert not sample["captioned"] and sample["label"] == -1 and sample["pair_id"] == -1
            assert not sample["text"].any()  # padding only: no class name left
        else:
            assert sample["captioned"] and torch.equal(sample["text"], original["text"])
            assert sample["label"] == original["label"]
    dm.use_train_view("labeled")
    labeled = dm.plain_train_view
    assert len(labeled) == 100 and all(bool(labeled[i]["captioned"]) for i in range(len(labeled)))
    batch = next(iter(torch.utils.data.DataLoader(view, batch_size=len(view) // 4)))
    assert batch["captioned"].dtype == torch.bool and 0 < int(batch["captioned"].sum()) < len(batch["captioned"])
