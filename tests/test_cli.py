"""The command line: help without heavy imports, and one-line errors for bad input."""

import os
import subprocess
import sys

import pytest

from kdkit.compose import compose
from kdkit.train import run_or_explain
from tests.conftest import SMOKE


def test_help_is_light():
    code = "import sys, kdkit.train; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "kdkit.train", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "distiller" in out.stdout


def _explain(tmp_path, capsys, *overrides):
    cfg = compose([*SMOKE, *overrides], output_dir=str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_or_explain(cfg)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in stderr
    err = stderr.strip().splitlines()[-1]  # Lightning's own info lines may come before it
    assert err.startswith("kdkit: error:")
    return err


def test_missing_teacher_checkpoint(tmp_path, capsys):
    err = _explain(tmp_path, capsys, "teacher.ckpt_path=/nope/teacher.pt")
    assert "/nope/teacher.pt" in err and "not found" in err


def test_class_count_mismatch(tmp_path, capsys):
    err = _explain(tmp_path, capsys, "stages.baseline=false", "teacher.model.num_classes=7")
    assert "7" in err and "10" in err


def test_bad_feature_name_lists_close_names(tmp_path, capsys):
    err = _explain(tmp_path, capsys, "distiller=[fitnet]", "distiller.fitnet.student_feature=hiden.0",
                   "distiller.fitnet.teacher_feature=layer2", "stages.baseline=false")
    assert "'hiden.0'" in err and "hidden.0" in err


def test_feature_shape_mismatch_without_adapter(tmp_path, capsys):
    err = _explain(tmp_path, capsys, "distiller=[fitnet]", "distiller.fitnet.student_feature=hidden.0",
                   "distiller.fitnet.teacher_feature=layer2", "distiller.fitnet.adapter=false",
                   "stages.baseline=false")
    assert "student shape" in err and "teacher shape" in err


def test_missing_data_dir_says_how_to_get_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDKIT_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    err = _explain(tmp_path, capsys, "data=cifar10", "teacher=resnet56", "student=resnet8")
    assert "no-data" in err


@pytest.mark.slow
def test_cli_subprocess_error_exit_code(tmp_path):
    env = {**os.environ, "KDKIT_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "kdkit.train", f"hydra.run.dir={tmp_path}/run",
         "teacher.ckpt_path=/nope.pt", *SMOKE],
        capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("kdkit: error:")
