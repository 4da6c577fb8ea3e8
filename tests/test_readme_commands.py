"""Every command in README.md's code blocks runs, so the README cannot drift from the code.

Each ```bash block runs in order, in one working directory shared by the whole README (a later
command may read what an earlier one wrote, e.g. a teacher's weights), through bash as a user
would type it, with short-run overrides appended to ``kdkit-train`` commands (one epoch, two
batches, one teacher epoch, a small train subset). The install and test commands are not run
here: ``.ci/run`` runs them, and this file checks it runs the README's. The one command that
cannot run here, a sweep submitted to SLURM, is composed instead (its first job, with Hydra's own
settings: the launcher and its options must exist), which is said where it stands in the README.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHORT_RUN = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "report.latency_batch_size=8",
    "export.programs=[]",  # ~5 s per run; tests/test_exports.py writes and loads them
]
TRAIN = ("kdkit-train", "python -m kdkit.train")
NOT_RUN_HERE = "hydra/launcher=submitit_slurm"  # no SLURM cluster where the tests run


def readme_blocks(text: str) -> list[tuple[str, list[list[str]]]]:
    """``(section heading, commands)`` per ```bash block; each command a token list (comments
    dropped, ``\\`` continuations joined, ``&&`` chains split)."""
    blocks, heading, lines, inside = [], "", [], False
    for line in text.splitlines():
        if line.startswith("#") and not inside:
            heading = line.lstrip("#").strip()
        elif line.strip() == "```bash":
            inside, lines = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append((heading, _commands("\n".join(lines))))
        elif inside:
            lines.append(line)
    return blocks


def _commands(source: str) -> list[list[str]]:
    commands = []
    for line in source.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            commands.append(tokens[:cut])
            tokens = tokens[cut + 1:]
    return [c for c in commands if c]


def _is_train(command: list[str]) -> bool:
    return " ".join(command[:3]).startswith(TRAIN)


def _overrides(command: list[str]) -> list[str]:
    start = 1 if command[0] == "kdkit-train" else 3
    return [t for t in command[start:] if not t.startswith("-")]


def _first_job(overrides: list[str]) -> list[str]:
    """A sweep's first job (``a=1,2`` -> ``a=1``), to look at the config it composes."""
    job = []
    for item in overrides:
        key, equals, value = item.partition("=")
        if equals and "," in value and not value.startswith(("[", "{")) and not key.startswith("hydra"):
            item = f"{key}={value.split(',')[0]}"
        job.append(item)
    return job


def short_run(command: list[str]) -> list[str]:
    """The overrides that make ``command`` a smoke run of the same config."""
    from kdkit.compose import compose
    from kdkit.teachers import teacher_configs

    cfg = compose([o for o in _first_job(_overrides(command)) if not o.startswith("hydra")])
    extra = list(SHORT_RUN)
    for name, tcfg in teacher_configs(cfg).items():  # teachers may train longer than students
        if tcfg.get("max_epochs"):
            extra.append(("teacher" if name == "teacher" else f"teachers.{name}") + ".max_epochs=1")
    if "train_limit" in cfg.data:
        extra += ["data.train_limit=256", "data.val_size=64"]
        if cfg.data.get("labeled_count"):  # a count of labels out of the full set: keep the share instead
            extra += ["data.labeled_count=null", "data.labeled_fraction=0.25"]
    extra += [f"data.{key}={size}" for key, size in (("batch_size", 32), ("eval_batch_size", 64))
              if isinstance(cfg.data.get(key), int) and cfg.data[key] > size]
    return extra


def compose_slurm_sweep(command: list[str]):
    """The SLURM sweep's first job, composed with Hydra's config (launcher included)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="kdkit.conf", version_base="1.3"):
        return compose(config_name="train", overrides=_first_job(_overrides(command)), return_hydra_config=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    if not Path(os.environ["KDKIT_DATA_DIR"]).exists():  # the README's runs read the shared data
        pytest.skip(f"shared data not found at {os.environ['KDKIT_DATA_DIR']} (set KDKIT_DATA_DIR)")
    return tmp_path_factory.mktemp("readme")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    # the test's interpreter and its console scripts (kdkit-train, kdkit-report, python) first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    if _is_train(command):
        command = [*command, *short_run(command)]
    line = shlex.join(os.path.expandvars(t) for t in command)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=900)


BLOCKS = readme_blocks(README.read_text())


def test_the_readme_has_the_commands_this_file_expects():
    sections = [heading for heading, _ in BLOCKS]
    assert "The two commands" in sections and "Running experiments" in sections
    assert sum(len(commands) for _, commands in BLOCKS) >= 15


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text().replace(" -q", "")
    install = [c for _, commands in BLOCKS for c in commands if c[0] == "pip"]
    assert install, "README has no install command"
    for command in install:
        line = shlex.join(command)
        with_extras = re.sub(r"-e (\S+)", lambda m: '-e ".[test]"' if m.group(1) == "." else m.group(0), line)
        assert line in ci or with_extras.replace("'", '"') in ci, f".ci/run does not run README's `{line}`"
    assert re.search(r"^pytest\b", ci, re.M), ".ci/run does not run README's test command"


@pytest.mark.parametrize("heading,commands", BLOCKS, ids=[re.sub(r"\W+", "_", h)[:40] for h, _ in BLOCKS])
def test_readme_block_runs(heading, commands, workdir):
    ran = 0
    for command in commands:
        if command[0] in ("pip", "pytest"):  # .ci/run runs these (test above)
            continue
        if NOT_RUN_HERE in command:
            cfg = compose_slurm_sweep(command)
            assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
            assert cfg.hydra.launcher.partition == "gpu" and cfg.trainer.devices == 4
            ran += 1
            continue
        result = _run(command, workdir)
        shown = shlex.join(command)
        assert result.returncode == 0, (f"README ({heading}): `{shown}` exited {result.returncode}:\n"
                                        f"{result.stderr[-3000:]}")
        assert "Traceback" not in result.stderr, f"README ({heading}): `{shown}`:\n{result.stderr[-3000:]}"
        ran += 1
    assert ran or all(c[0] in ("pip", "pytest") for c in commands)
