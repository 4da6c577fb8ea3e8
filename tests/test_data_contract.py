"""Every datamodule implements its protocol of ``kdkit.data_contract``.

Datamodule classes are found by walking ``kdkit.datamodules``, so a new one is checked without
touching this file: statically (every protocol member is implemented by the datamodule itself,
methods take the protocol's parameters), and, for those cheap to build here on tiny data, at
run time after ``setup`` (``isinstance``, the members' types, ``example_batch(n=3)``'s batch
dimension, ``use_fixed_shards``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import pkgutil
import tarfile
import types
import typing
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch

from kdkit.data_contract import (SETTINGS, ClassificationData, DistillationData, GraphData, members,
                                 settings_of)
from kdkit.errors import KdkitError


# ---- discovery and the static check --------------------------------------------------------------
def datamodule_classes() -> dict[str, type]:
    """``{"module.Class": class}`` of every LightningDataModule defined in ``kdkit.datamodules``."""
    import kdkit.datamodules as package

    found = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, L.LightningDataModule)
                    and obj.__module__ == module.__name__):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return dict(sorted(found.items()))


CLASSES = datamodule_classes()


def declaration(protocol: type, name: str):
    """The most specific declaration of member ``name`` in ``protocol`` or its base protocols."""
    return next(vars(k)[name] for k in protocol.__mro__ if k in SETTINGS and name in vars(k))


def signature_problems(name: str, declared, implemented) -> list[str]:
    """What ``implemented`` lacks of ``declared``'s parameters (names; defaults where declared)."""
    want = list(inspect.signature(declared).parameters.values())[1:]  # without self
    have = inspect.signature(implemented).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in have.values())
    problems = []
    for p in want:
        got = have.get(p.name)
        if got is None and not var_kw:
            problems.append(f"{name}() takes no parameter {p.name!r}")
        elif got is not None and p.default is not p.empty and got.default is got.empty:
            problems.append(f"{name}(): parameter {p.name!r} needs a default "
                            f"(the protocol's is {p.default!r})")
    extra = [q.name for q in list(have.values())[1:] if q.name not in {p.name for p in want}
             and q.default is q.empty and q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
    if extra:
        problems.append(f"{name}() requires parameters the protocol does not pass: {extra}")
    return problems


def contract_problems(cls: type) -> list[str]:
    """Why ``cls`` does not implement its protocols (empty: it does)."""
    settings = settings_of(cls)
    if DistillationData not in settings:
        return [f"{cls.__name__} lists no protocol of kdkit.data_contract among its bases"]
    problems = []
    for protocol in settings:
        for name in members(protocol):
            owner = next((k for k in cls.__mro__ if name in vars(k)), None)
            if owner is None or owner in SETTINGS:
                problems.append(f"{name}: missing ({protocol.__name__}; a class-level default, "
                                "property or method is needed, the protocol's stub does not count)")
                continue
            declared, implemented = declaration(protocol, name), vars(owner)[name]
            if inspect.isfunction(declared):
                if not inspect.isfunction(implemented):
                    problems.append(f"{name}: the protocol has a method, {owner.__name__} has "
                                    f"{type(implemented).__name__}")
                else:
                    problems += signature_problems(name, declared, implemented)
            elif inspect.isfunction(implemented):  # a property or attribute, not a method
                problems.append(f"{name}: a method in {owner.__name__}, but the protocol's member "
                                "is a value (property or attribute)")
    return sorted(set(problems))


def test_the_package_walk_finds_the_datamodules():
    names = {qualname.rsplit(".", 1)[1] for qualname in CLASSES}
    assert names >= {"DigitsDataModule", "CIFAR10DataModule", "ImageFolderDataModule",
                     "CIFAR10PairsDataModule", "CSVPairsDataModule", "WebDatasetPairsDataModule",
                     "GraphDataModule", "BEIRDataModule"}


@pytest.mark.parametrize("qualname", list(CLASSES))
def test_every_datamodule_implements_its_protocols(qualname):
    cls = CLASSES[qualname]
    assert contract_problems(cls) == []
    n = inspect.signature(cls.example_batch).parameters.get("n")
    assert n is not None and n.default is None, "example_batch(self, n: int | None = None)"


# ---- the checker itself fails when a member goes ---------------------------------------------------
class _Complete(L.LightningDataModule, ClassificationData):
    """Every ClassificationData member, each in one of the accepted forms."""

    num_train_samples = 6
    static_for_teacher = True
    teacher_input_fingerprint = None
    fixed_shards = False
    is_transfer = False
    has_unlabeled = False
    mixes_samples = False
    teacher_view = "all"
    student_view = "transfer"
    plain_train_view = ()

    @property
    def num_classes(self) -> int:
        return 3

    def use_train_view(self, view: str) -> None:
        pass

    def example_batch(self, n: int | None = None) -> dict:
        return {"index": torch.arange(4 if n is None else n)}

    def use_fixed_shards(self) -> None:
        self.fixed_shards = True


def _without(name: str, **replace) -> type:
    body = {k: v for k, v in vars(_Complete).items() if k != name and not k.startswith("_")}
    return type("Broken", (L.LightningDataModule, ClassificationData), {**body, **replace})


def test_the_checker_accepts_a_complete_datamodule():
    assert contract_problems(_Complete) == []


@pytest.mark.parametrize("name", members(ClassificationData))
def test_the_checker_names_a_missing_member(name):
    broken = _without(name)
    assert any(p.startswith(f"{name}:") for p in contract_problems(broken))
    instance = broken()  # the protocol's stub stands in: it answers None, silently
    assert getattr(instance, name) is None or callable(getattr(instance, name))


def test_the_checker_names_a_wrong_example_batch_signature():
    no_n = _without("example_batch", example_batch=lambda self: {})
    assert contract_problems(no_n) == ["example_batch() takes no parameter 'n'"]
    required = _without("example_batch", example_batch=lambda self, n: {})
    assert contract_problems(required) == [
        "example_batch(): parameter 'n' needs a default (the protocol's is None)"]


def test_the_checker_refuses_a_datamodule_without_a_protocol():
    class Bare(L.LightningDataModule):
        pass

    assert contract_problems(Bare) == ["Bare lists no protocol of kdkit.data_contract among its bases"]


# ---- run-time check on tiny data built here -------------------------------------------------------
def _digits(tmp_path):
    from kdkit.datamodules.digits import DigitsDataModule

    return DigitsDataModule(batch_size=8)


def _png_tree(root: Path, per_split: dict[str, int]) -> Path:
    from PIL import Image

    for split, n in per_split.items():
        for c, color in enumerate(((255, 0, 0), (0, 128, 255), (10, 200, 30))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12 + i, 10), color).save(folder / f"{i}.png")
    return root


def _image_folder(tmp_path):
    from kdkit.datamodules.image_folder import ImageFolderDataModule

    return ImageFolderDataModule(_png_tree(tmp_path / "tree", {"train": 2, "val": 1}), image_size=8,
                                 batch_size=2, num_classes=3)


def _cifar_archives(folder: Path) -> Path:
    """Tiny CIFAR-10 archives: 3 train and 1 test JPEG per class."""
    from PIL import Image

    from kdkit.datamodules.cifar10 import CLASSES as NAMES

    folder.mkdir(parents=True)
    for split, per_class in (("train", 3), ("test", 1)):
        name = "train-part0.tar.gz" if split == "train" else "test.tar.gz"
        with tarfile.open(folder / name, "w:gz") as tf:
            for label, cls in enumerate(NAMES):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), (label * 25, i * 40, 200)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tf.addfile(info, io.BytesIO(buf.getvalue()))
    return folder


def _cifar10(tmp_path):
    from kdkit.datamodules.cifar10 import CIFAR10DataModule

    return CIFAR10DataModule(archive_dir=_cifar_archives(tmp_path / "cifar"), cache_dir=tmp_path / "cache",
                             val_size=10, batch_size=4)


@functools.cache
def _clip_tokenizer():
    from kdkit.models.clip import clip_tokenizer

    return clip_tokenizer("kdkit-vit-p8-d32")


def _cifar10_pairs(tmp_path):
    from kdkit.datamodules.cifar10_pairs import CIFAR10PairsDataModule

    return CIFAR10PairsDataModule(tokenizer=_clip_tokenizer(), archive_dir=_cifar_archives(tmp_path / "cifar"),
                                  cache_dir=tmp_path / "cache", val_size=10, batch_size=4)


def _csv_pairs(tmp_path):
    from kdkit.datamodules.pairs_files import CSVPairsDataModule

    _png_tree(tmp_path, {"img": 2})
    rows = [f"img/class{i % 3}/{i // 3}.png,caption {i},c{i % 3}" for i in range(6)]
    (tmp_path / "pairs.csv").write_text("\n".join(["filepath,title,cls", *rows]) + "\n")
    return CSVPairsDataModule(train_file=str(tmp_path / "pairs.csv"), tokenizer=_clip_tokenizer(),
                              image_size=8, batch_size=2, label_key="cls", class_names=["c0", "c1", "c2"])


def _webdataset_pairs(tmp_path):
    import webdataset as wds
    from PIL import Image

    from kdkit.datamodules.webdataset_pairs import WebDatasetPairsDataModule

    with wds.TarWriter(str(tmp_path / "s-000.tar")) as sink:
        for k in range(5):
            buf = io.BytesIO()
            Image.new("RGB", (12, 12), (40 * k, 0, 0)).save(buf, format="PNG")
            sink.write({"__key__": f"{k:05d}", "png": buf.getvalue(), "txt": f"sample {k}", "cls": str(k % 2)})
    urls = str(tmp_path / "s-000.tar")
    return WebDatasetPairsDataModule(train_urls=urls, test_urls=urls, train_samples=4, tokenizer=_clip_tokenizer(),
                                     image_size=8, batch_size=2, class_names=["even", "odd"])


def _graph(tmp_path):
    from torch_geometric.data import Data

    from kdkit.datamodules.graph import GraphDataModule

    n = 10
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    masks = {key: torch.zeros(n, dtype=torch.bool) for key in ("train_mask", "val_mask", "test_mask")}
    masks["train_mask"][:3], masks["val_mask"][3:5], masks["test_mask"][5:] = True, True, True
    data = Data(x=torch.rand(n, 4), edge_index=torch.cat([ring, ring.flip(0)], 1), y=torch.arange(n) % 3, **masks)
    return GraphDataModule([data], num_classes=3, num_features=4)


def _beir(tmp_path):
    from kdkit.datamodules.beir import BEIRData, BEIRDataModule, write_beir

    docs = [f"passage {i} about cells and genes" for i in range(12)]
    queries = {f"q{i}": f"question {i}" for i in range(6)}
    qrels = {"train": {f"q{i}": {f"d{i}": 1} for i in range(4)}, "test": {f"q{i}": {f"d{i}": 1} for i in (4, 5)}}
    folder = write_beir(BEIRData([f"d{i}" for i in range(12)], docs, queries, qrels), tmp_path / "beir")
    return BEIRDataModule(name=None, path=str(folder), cache_dir=str(tmp_path / "cache"), batch_size=4,
                          eval_batch_size=4)


# "module.Class" -> builder(tmp_path); a discovered class without one is checked statically only
BUILDERS: dict[str, Callable] = {
    "kdkit.datamodules.digits.DigitsDataModule": _digits,
    "kdkit.datamodules.image_folder.ImageFolderDataModule": _image_folder,
    "kdkit.datamodules.cifar10.CIFAR10DataModule": _cifar10,
    "kdkit.datamodules.cifar10_pairs.CIFAR10PairsDataModule": _cifar10_pairs,
    "kdkit.datamodules.pairs_files.CSVPairsDataModule": _csv_pairs,
    "kdkit.datamodules.webdataset_pairs.WebDatasetPairsDataModule": _webdataset_pairs,
    "kdkit.datamodules.graph.GraphDataModule": _graph,
    "kdkit.datamodules.beir.BEIRDataModule": _beir,
}
BASES = {"kdkit.datamodules.base.ImageDataModule", "kdkit.datamodules.pairs_files.PairsDataModule"}


def conforms(value, hint) -> bool:
    """``isinstance`` against a type hint, ignoring subscripts (``Sequence[str]`` -> Sequence)."""
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(hint))
    return isinstance(value, origin or hint)


def test_the_builders_and_bases_name_existing_classes():
    assert set(BUILDERS) <= set(CLASSES), "a builder names a class that is gone"
    assert BASES <= set(CLASSES)


@pytest.mark.parametrize("qualname", list(CLASSES))
def test_after_setup_the_members_have_their_documented_types(qualname, tmp_path):
    if qualname not in BUILDERS:
        pytest.skip("a base class" if qualname in BASES else "no cheap builder here: checked statically only")
    dm = BUILDERS[qualname](tmp_path)
    assert type(dm) is CLASSES[qualname]
    dm.prepare_data()
    dm.setup("fit")
    settings = settings_of(type(dm))
    for protocol in settings:
        assert isinstance(dm, protocol)
        for name in members(protocol):
            declared = declaration(protocol, name)
            if isinstance(declared, property):
                hint = typing.get_type_hints(declared.fget)["return"]
                value = getattr(dm, name)
                assert conforms(value, hint), f"{name} = {value!r} is not {hint}"
    if ClassificationData in settings or GraphData in settings:
        assert dm.num_classes >= 2

    default = dm.example_batch()
    assert isinstance(default, dict) and default
    batch = dm.example_batch(n=3)
    assert isinstance(batch, dict)
    if GraphData in settings:  # a batch is the whole graph; n picks the query nodes
        assert batch["query"].shape == (3,) and batch["x"].shape[0] == dm.num_train_samples
    else:
        sizes = {key: value.shape[0] for key, value in batch.items() if isinstance(value, torch.Tensor)}
        assert "index" in sizes and set(sizes.values()) == {3}, sizes

    assert dm.fixed_shards is False
    try:
        dm.use_fixed_shards()
    except KdkitError:
        assert not dm.static_for_teacher, "static data must accept use_fixed_shards()"
    else:
        assert dm.fixed_shards is True
