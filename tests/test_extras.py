"""Optional extras: one table (kdkit.extras) that pyproject and the README agree with, and one
line naming the extra when a feature's package is missing."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.extras import EXTRAS, extra_of, require

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_every_extra_in_pyproject_is_in_the_table_and_the_readme():
    extras = _pyproject_extras()
    assert set(extras) - {"test"} == set(EXTRAS)
    readme = (ROOT / "README.md").read_text()
    for extra in EXTRAS:
        assert f"kdkit[{extra}]" in readme, f"README does not name the extra {extra}"
    # the test extra brings every other one, so the suite exercises each feature
    brought = re.search(r"kdkit\[([^\]]+)\]", " ".join(extras["test"])).group(1).split(",")
    assert set(brought) == set(EXTRAS)


def test_extra_of_maps_import_names_and_submodules():
    assert extra_of("ranx") == "retrieval"
    assert extra_of("hydra_plugins.hydra_submitit_launcher.submitit_launcher") == "cluster"
    assert extra_of("torch") is None


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ranx", None)  # what Python does when it is not installed
    from kdkit.retrieval_metrics import evaluate

    with pytest.raises(KdkitError) as err:
        evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}})
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'kdkit[retrieval]'" in message and "'ranx'" in message


def test_faiss_search_without_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    from kdkit.retrieval_metrics import exact_search

    with pytest.raises(KdkitError, match=r"kdkit\[retrieval\]"):
        exact_search(torch.randn(2, 4), torch.randn(5, 4), k=2, backend="faiss")


def test_webdataset_datamodule_without_webdataset_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "webdataset", None)
    from kdkit.datamodules.webdataset_pairs import WebDatasetPairsDataModule

    with pytest.raises(KdkitError, match=r"kdkit\[webdataset\]"):
        WebDatasetPairsDataModule(train_urls=str(tmp_path / "a.tar"), test_urls=str(tmp_path / "b.tar"),
                                  train_samples=10)


def test_a_package_outside_the_table_is_named_by_itself(monkeypatch):
    monkeypatch.setitem(sys.modules, "some_unlisted_pkg", None)
    with pytest.raises(KdkitError, match="pip install some_unlisted_pkg"):
        require("some_unlisted_pkg", "a feature")


def test_a_submitit_launcher_without_its_plugin_names_the_cluster_extra(monkeypatch):
    """Without hydra-submitit-launcher Hydra has no hydra/launcher/submitit_* config; the
    pre-check turns Hydra's missing-config error into the install line. (The plugin is installed
    here, so its absence is simulated at the one place the check asks for it.)"""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from kdkit import cli_checks

    monkeypatch.setattr(cli_checks, "_importable", lambda module: False)
    with initialize_config_module(config_module="kdkit.conf", version_base="1.3"):
        message = cli_checks._unknown_choice("hydra/launcher/submitit_slurm",
                                             GlobalHydra.instance().config_loader())
    assert message == ("hydra/launcher=submitit_slurm comes with the package 'hydra-submitit-launcher', "
                       "which is not installed: pip install 'kdkit[cluster]'")
