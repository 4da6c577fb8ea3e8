"""The command line: help without heavy imports, and one-line errors for bad input."""

import os
import subprocess
import sys
import textwrap
from importlib import resources

import pytest

from kdkit.cli_checks import check_argv
from kdkit.compose import compose
from kdkit.train import main, run_or_explain
from tests.conftest import SMOKE


def test_help_is_light():
    code = "import sys, kdkit.train; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "kdkit.train", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "distiller" in out.stdout


def _available(group: str) -> str:
    """The choices of ``conf/<group>`` as the CLI lists them (read here so new configs keep up)."""
    return ", ".join(sorted(p.name[:-5] for p in resources.files("kdkit.conf").joinpath(group).iterdir()
                            if p.name.endswith(".yaml")))


DISTILLERS = _available("distiller")


def test_unknown_distiller_lists_the_distillers(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kdkit-train", "distiller=[nope]"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"kdkit: error: no distiller 'nope'; available: {DISTILLERS}\n"
    assert {"at", "crd", "dist", "dkd", "kd", "rkd"} <= set(DISTILLERS.split(", "))


def test_key_typo_says_did_you_mean_in_a_subprocess():
    # the entry point as installed, and light: the check composes with Hydra alone (no torch)
    code = textwrap.dedent("""
        import sys
        from kdkit.train import main
        sys.argv = ["kdkit-train", "distiller.kd.temprature=4"]
        try:
            main()
        finally:
            assert "torch" not in sys.modules, "torch imported"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == ("kdkit: error: distiller.kd.temprature is not a key; "
                          "did you mean distiller.kd.temperature?\n")


@pytest.mark.parametrize("argv, message", [
    (["teacher=nope"], f"no teacher 'nope'; available: {_available('teacher')}"),
    (["data=cifar"], f"no data 'cifar'; did you mean cifar10? available: {_available('data')}"),
    (["experiment=cora_gln"],
     f"no experiment 'cora_gln'; did you mean cora_glnn? available: {_available('experiment')}"),
    (["distiller=[kd,kdd]"], f"no distiller 'kdd'; did you mean kd? available: {DISTILLERS}"),
    (["hydra/launcher=nope"], "no hydra/launcher 'nope'; available: basic, submitit_local, submitit_slurm"),
    (["trainer.devics=2"], "trainer.devics is not a key; did you mean trainer.devices?"),
    (["distiler=[kd]"], "distiler is not a key; did you mean distiller?"),
    (["distiller.kdd.temperature=2"], "distiller.kdd is not a key; did you mean distiller.kd?"),
    (["hydra.run.dri=/tmp/x"], "hydra.run.dri is not a key; did you mean hydra.run.dir?"),
    (["trainer.nope=1"], "trainer.nope is not a key; closest keys under trainer: precision "
                         "(to add it: +trainer.nope=1)"),
    (["distiller.kd.temperature.x=4"],
     "distiller.kd.temperature.x is not a key (to add it: +distiller.kd.temperature.x=4)"),
    # multirun: the first job (every sweep at its first value) is what Hydra composes first
    (["-m", "seed=0,1", "distiller.kd.temprature=4"],
     "distiller.kd.temprature is not a key; did you mean distiller.kd.temperature?"),
    (["-m", "distiller=rkd,kd", "distiller.kd.temperature=2"],
     "distiller.kd is not a key; did you mean distiller.rkd?"),
    (["--multirun", "seed=range(0,2)", "teacher=nope"],
     f"no teacher 'nope'; available: {_available('teacher')}"),
])
def test_bad_choices_and_keys_are_one_line(argv, message):
    assert check_argv(argv) == message


@pytest.mark.parametrize("argv", [
    [],                                                           # the default run
    ["distiller=[kd,fitnet]", "distiller.fitnet.adapter=false"],   # valid overrides
    ["experiment=cora_glnn", "hydra.run.dir=/tmp/x", "hydra.job.chdir=true"],
    ["+distiller.kd.extra=1"],                                    # adding a key is allowed
    ["--help", "distiller=[nope]"], ["--cfg", "job", "distiller=[nope]"],  # Hydra's to answer
    ["--info", "defaults", "teacher=nope"], ["--hydra-help"], ["--version"],
    ["--bogus", "distiller=[nope]"],                              # Hydra's argparse refuses it
    ["--config-dir", "/tmp/my_conf", "distiller=[mine]"],         # groups this check cannot see
    ["seed=0,1"],                                                 # Hydra says "ambiguous" itself
    ["seed=abc"],                                                 # not a composition error
    # sweeps whose later jobs differ: only the first job is checked, and it composes
    ["-m", "distiller=kd,rkd", "distiller.kd.temperature=2"],
    ["-m", "distiller=[kd],[kd,rkd]", "distiller.kd.temperature=2"],
    ["-m", "distiller=glob(k*)", "distiller.kd.temperature=2"],
    ["-m", "seed=shuffle(0,1)", "trainer.devics=2"],              # the first job is random
    ["-m", "seed=interval(0,1)", "trainer.devics=2"],             # not the basic sweeper's
])
def test_valid_or_not_ours_passes_through(argv):
    assert check_argv(argv) is None


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
