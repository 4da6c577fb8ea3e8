"""Every distiller config has a test file and a README row, and every image-classification
distiller runs, all together, on the CIFAR experiment it is meant for."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "distiller").glob("*.yaml"))
# Distillers of other settings (graphs, retrieval, CLIP) or that need several teachers: each
# runs in its own setting's tests; every other config is an image-classification distiller.
OTHER_SETTINGS = {
    "ffg2m", "hidden",                               # GNN-to-MLP (node tasks)
    "embed", "margin_mse", "listwise", "matryoshka",  # dense retrieval
    "distilcse", "pairdistill",                      # dense retrieval
    "multi_exit", "lead",                            # dense retrieval, per-layer embeddings
    "clip_fd", "clip_icl", "clip_crd", "affinity",   # CLIP image-text
    "ensemble_kd", "ca_mkd", "unic", "teacher_schedule",  # several teachers (test_multi_teacher.py)
}
# Distillers for a ViT student (a distillation token, patch tokens, masked inputs): they run
# together on the CNN -> ViT experiment, with FitNet and AT through the token <-> map adapter.
VIT_STUDENT = ["deit", "cskd", "trg", "mfd"]
IMAGE_CLASSIFICATION = [name for name in CONFIGS if name not in OTHER_SETTINGS | set(VIT_STUDENT)]


def _target(name: str) -> str:
    node = yaml.safe_load((ROOT / "conf" / "distiller" / f"{name}.yaml").read_text())
    return node[name]["_target_"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_distiller_config_has_a_test_file(name):
    module = _target(name).split(".")[-2]  # kdkit.distillers.<module>.<Class>
    tested = [ROOT / "tests" / "distillers" / f"test_{name}.py", ROOT / "tests" / "distillers" / f"test_{module}.py"]
    assert any(p.exists() for p in tested), f"conf/distiller/{name}.yaml has no tests/distillers/test_{name}.py"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_distiller_config_has_a_readme_row(name):
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("|")]
    assert any(re.search(rf"`{re.escape(name)}`", row) for row in rows), f"README has no methods-table row for `{name}`"


def test_every_other_setting_name_is_a_config():
    assert OTHER_SETTINGS | set(VIT_STUDENT) <= set(CONFIGS)


SHORT = ["teacher.max_epochs=1", "data.train_limit=256", "data.val_size=32", "data.batch_size=32",
         "data.eval_batch_size=64", "stages.baseline=false", "trainer.log_every_n_steps=1"]


def test_every_image_distiller_runs_together_on_cifar(compose_run, data_dir):
    """One run of ``cifar10_resnet20_resnet8`` with every image-classification distiller at its
    config's defaults: each composes with the experiment, builds its adapters on the real
    models' taps, and logs a finite loss term in the student stage."""
    cfg, results = compose_run(
        "experiment=cifar10_resnet20_resnet8", f"distiller=[{','.join(IMAGE_CLASSIFICATION)}]", *SHORT)
    assert_finite_terms(cfg, results, IMAGE_CLASSIFICATION)


def test_vit_student_distillers_run_together_on_cnn_to_vit(compose_run, data_dir):
    """``cifar10_deit`` (resnet20 -> a ViT with a distillation token) with every ViT-student
    distiller, FitNet and AT reading the ViT's token grids against the CNN's maps, and OFA's
    branches on the ViT's blocks."""
    names = [*VIT_STUDENT, "fitnet", "at", "ofa"]
    cfg, results = compose_run(
        "experiment=cifar10_deit", f"distiller=[{','.join(names)}]", *SHORT,
        "distiller.cskd.distill_feature=null",  # deit already trains the distillation head
        "distiller.trg.student_feature=blocks.3", "distiller.trg.student_prefix_tokens=2",
        "distiller.mfd.student_feature=blocks.3", "distiller.mfd.student_prefix_tokens=2",
        "distiller.fitnet.student_feature=blocks.1", "distiller.fitnet.student_prefix_tokens=2",
        "distiller.at.pairs=[[blocks.0,layer2],[blocks.3,layer3]]", "distiller.at.student_prefix_tokens=2",
        "distiller.ofa.stages=[blocks.0,blocks.2]", "distiller.ofa.student_prefix_tokens=2")
    assert_finite_terms(cfg, results, names)


def assert_finite_terms(cfg, results: dict, names: list[str]) -> None:
    assert math.isfinite(results["student"]["test/acc"])
    with open(Path(cfg.paths.output_dir) / "logs" / "student" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in names:
        columns = [c for c in rows[0] if c == f"train/loss/{name}" or c.startswith(f"train/loss/{name}/")]
        assert columns, f"{name} logged no loss term"
        values = [float(r[c]) for r in rows for c in columns if r.get(c)]
        assert values and all(math.isfinite(v) for v in values), f"{name}: {values}"
