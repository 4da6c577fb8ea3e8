"""Cluster launch: the shipped submitit configs, Lightning reading ranks from SLURM, the sweep
guard against DDP relaunches, and a real submitit-local sweep through the CLI (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from kdkit.compose import compose
from kdkit.distributed import refuse_relaunch_in_sweep
from kdkit.errors import KdkitError
from tests.conftest import SMOKE

SLURM_RANK_1_OF_2 = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "1",
                     "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "kdkit",
                     "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "gpu-node-7"}


def hydra_cfg(*overrides):
    with initialize_config_module(config_module="kdkit.conf", version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def ddp_trainer(devices: int = 2):
    cfg = compose(["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}"])
    return instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)


@pytest.fixture
def no_cluster_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")] + ["LOCAL_RANK", "WORLD_SIZE", "RANK"]:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def in_sweep():
    """Make this process look like a job of a ``-m`` sweep (HydraConfig in MULTIRUN mode)."""
    cfg = hydra_cfg()
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    yield
    HydraConfig.instance().cfg = None


def test_slurm_launcher_follows_the_trainer(no_cluster_env):
    cfg = hydra_cfg("hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4",
                    "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 1)
    assert (launcher["partition"], launcher["timeout_min"]) == ("gpu", 30)
    two_nodes = hydra_cfg("hydra/launcher=submitit_slurm", "+trainer.num_nodes=2")
    assert OmegaConf.to_container(two_nodes.hydra.launcher, resolve=True)["nodes"] == 2
    local = OmegaConf.to_container(hydra_cfg("hydra/launcher=submitit_local").hydra.launcher, resolve=True)
    assert local["_target_"].endswith("submitit_launcher.LocalLauncher") and local["tasks_per_node"] == 1


def test_lightning_reads_ranks_from_slurm_and_checks_tasks_per_node(no_cluster_env, monkeypatch):
    for key, value in SLURM_RANK_1_OF_2.items():
        monkeypatch.setenv(key, value)
    trainer = ddp_trainer(devices=2)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.creates_processes_externally
    assert (trainer.global_rank, trainer.local_rank, trainer.world_size) == (1, 1, 2)
    env.validate_settings(num_devices=2, num_nodes=1)
    with pytest.raises(ValueError, match="ntasks-per-node"):  # tasks_per_node != trainer.devices
        env.validate_settings(num_devices=4, num_nodes=1)


def test_ddp_relaunch_is_refused_inside_a_sweep_only(no_cluster_env, monkeypatch, in_sweep):
    with pytest.raises(KdkitError, match="re-runs the sweep"):
        refuse_relaunch_in_sweep(ddp_trainer(devices=2))
    refuse_relaunch_in_sweep(ddp_trainer(devices=1))  # nothing to relaunch
    for key, value in SLURM_RANK_1_OF_2.items():  # srun started the ranks: nothing relaunched
        monkeypatch.setenv(key, value)
    refuse_relaunch_in_sweep(ddp_trainer(devices=2))


def test_ddp_relaunch_is_fine_outside_a_sweep(no_cluster_env):
    refuse_relaunch_in_sweep(ddp_trainer(devices=2))


@pytest.mark.slow
def test_submitit_local_sweep_runs_one_job_per_config(tmp_path):
    """``kdkit-train -m seed=0,1 hydra/launcher=submitit_local``: two jobs, two results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kdkit.train", "-m", "seed=0,1", "hydra/launcher=submitit_local",
           f"hydra.sweep.dir={tmp_path}/sweep", "stages.baseline=false", *SMOKE]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for job, seed in ((0, 0), (1, 1)):
        run = tmp_path / "sweep" / str(job)
        results = json.loads((run / "results.json").read_text())
        assert list(results) == ["teacher", "student"]
        assert 0 <= results["student"]["test/acc"] <= 1
        assert OmegaConf.load(run / "config.yaml").seed == seed
    logs = list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # both jobs went through submitit
