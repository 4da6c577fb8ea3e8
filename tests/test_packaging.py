"""The installed distribution exposes one top-level name, ``kdkit``: the repository's ``conf/``
and ``datamodules/`` folders are installed as ``kdkit.conf`` and ``kdkit.datamodules``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_installation():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kdkit").rglob("__init__.py")}
    found |= {"kdkit.conf", "kdkit.datamodules"}
    assert found == listed


def python_outside(code: str, cwd) -> list[str]:
    """The stdout lines of ``python -c code`` run in ``cwd``, outside the repository."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=True).stdout.split()


def test_only_kdkit_is_importable_outside_the_repository(tmp_path):
    out = python_outside("import importlib.util as u, kdkit.conf, kdkit.datamodules.cifar10\n"
                         "print(u.find_spec('conf') is None, u.find_spec('datamodules') is None)\n"
                         "print(kdkit.conf.__name__, kdkit.datamodules.cifar10.__name__)", tmp_path)
    assert out == ["True", "True", "kdkit.conf", "kdkit.datamodules.cifar10"]


def test_hydra_finds_the_installed_config_module(tmp_path):
    out = python_outside("from kdkit.compose import compose\n"
                         "print(compose(['experiment=cora_glnn']).data._target_)", tmp_path)
    assert out[-1] == "kdkit.datamodules.graph.GraphDataModule"


def test_the_console_entry_point_finds_its_config_outside_the_repository(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kdkit.train", "--cfg", "job", "experiment=cora_glnn"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "_target_: kdkit.datamodules.graph.GraphDataModule" in out.stdout


@pytest.mark.slow
def test_wheel_holds_one_top_level_package(tmp_path):
    import shutil

    # build from a copy: setuptools writes build/ next to the sources
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", "benchmarks", "notebooks", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("kdkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"kdkit"}
    for must in ("kdkit/conf/train.yaml", "kdkit/conf/experiment/cora_glnn.yaml",
                 "kdkit/conf/clip_models/kdkit-vit-p8-d64.json", "kdkit/datamodules/cifar10.py"):
        assert must in names
