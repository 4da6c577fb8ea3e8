"""Logging: every loss term reaches the CSV log; W&B runs offline, one run per stage, and falls
back to offline quickly when its host is unreachable."""

import csv
import socket
import time
from pathlib import Path

import pytest

from kdkit import loggers


def test_every_loss_term_is_logged_per_stage(compose_run):
    cfg, _ = compose_run("distiller=[kd,rkd]", "trainer.log_every_n_steps=1")
    rows = list(csv.DictReader(open(Path(cfg.paths.output_dir) / "logs" / "student" / "metrics.csv")))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss/task", "train/loss/kd", "train/loss/rkd/distance", "train/loss/rkd/angle",
            "train/loss", "test/acc"} <= logged


def test_wandb_logs_offline_one_run_per_stage(compose_run, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg, _ = compose_run("logger=wandb", "trainer.log_every_n_steps=1")
    runs = sorted((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 3  # teacher, baseline, student
    assert all(any(r.glob("*.wandb")) for r in runs)  # each has its event log, syncable later


def test_loss_terms_are_logged_only_on_logging_steps(compose_run, monkeypatch):
    # self.log costs milliseconds per call; the task skips it on steps Lightning would not write
    from kdkit.tasks.base import DistillationTask

    calls = []
    original = DistillationTask.log_dict
    monkeypatch.setattr(DistillationTask, "log_dict",
                        lambda self, metrics, **kw: (calls.append((self.global_step, set(metrics)))
                                                     or original(self, metrics, **kw)))
    cfg, _ = compose_run("stages.teacher=true", "stages.baseline=false", "trainer.limit_train_batches=6",
                         "trainer.log_every_n_steps=3")
    train_steps = [step for step, keys in calls if any(k.startswith("train/loss/") for k in keys)]
    # teacher and student stages, 6 steps each: logged after steps 3 and 6 (global_step 2, 5)
    assert train_steps == [2, 5, 2, 5]
    rows = list(csv.DictReader(open(Path(cfg.paths.output_dir) / "logs" / "student" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/loss/kd")] == [2, 5]


# --- W&B without a network: a short probe, then offline (loopback addresses only) -------------

def _closed_port() -> int:
    """A loopback port nothing listens on: bound by the OS, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def online_wandb(monkeypatch):
    """An API key (fake), no WANDB_MODE, a fresh probe cache: wandb_logger would go online."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers, "_REACHABLE", {})


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdkit: warning:")]


def test_unreachable_wandb_host_falls_back_to_offline_quickly(online_wandb, monkeypatch, tmp_path, capsys):
    port = _closed_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    first = loggers.wandb_logger("teacher", group="g", save_dir=str(tmp_path))
    second = loggers.wandb_logger("student", group="g", save_dir=str(tmp_path))  # next stage
    elapsed = time.perf_counter() - start
    assert first._wandb_init["mode"] == "offline" and second._wandb_init["mode"] == "offline"
    assert elapsed < 10  # wandb.init's own retries stall ~120 s
    warnings = _warnings(capsys)
    assert len(warnings) == 1  # once per process, not once per stage
    assert f"127.0.0.1:{port}" in warnings[0] and "offline" in warnings[0]
    assert f"wandb sync {tmp_path}" in warnings[0]


def test_unreachable_host_run_logs_offline_and_is_syncable(online_wandb, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    logger = loggers.wandb_logger("student", group="g", save_dir=str(tmp_path))
    logger.log_metrics({"x": 1.0})
    logger.experiment.finish()
    assert time.perf_counter() - start < 60
    assert logger.experiment.settings.mode == "offline"
    assert any((tmp_path / "wandb").glob("offline-run-*/*.wandb"))


def test_reachable_wandb_host_stays_online(online_wandb, monkeypatch, tmp_path, capsys):
    with socket.socket() as server:  # a loopback listener stands in for the W&B host
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        logger = loggers.wandb_logger("student", save_dir=str(tmp_path))
    assert logger._wandb_init["mode"] == "online"
    assert _warnings(capsys) == []


@pytest.mark.parametrize("mode, env_mode, key, probed", [
    (None, None, True, True),          # key configured: online, so probe the host first
    ("online", None, False, True),     # asked for online in the config
    ("online", "offline", True, True),  # wandb.init's mode= wins over WANDB_MODE
    (None, "online", True, False),     # WANDB_MODE=online insists: no fallback
    (None, None, False, False),        # no key: offline anyway
    ("offline", None, True, False),
    ("disabled", None, True, False),
])
def test_probe_only_when_going_online(monkeypatch, tmp_path, mode, env_mode, key, probed):
    calls = []
    monkeypatch.setattr(loggers, "_REACHABLE", {})
    monkeypatch.setattr(loggers, "_unreachable_reason", lambda url: calls.append(url))  # no DNS
    monkeypatch.setattr(loggers, "_has_wandb_key", lambda: key)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    loggers.wandb_logger("student", save_dir=str(tmp_path), mode=mode)
    assert calls == (["https://api.wandb.ai"] if probed else [])


def test_a_resumed_log_keeps_exactly_the_rows_its_checkpoint_covers():
    """Rows as Lightning writes them for 6-batch epochs: training rows after batch k at step k - 1,
    epoch 0's validation at step 5, the learning-rate row of epoch 1 at step 6 (no epoch)."""
    from kdkit.csv_logger import _keep

    rows = [{"epoch": "0", "step": str(s), "train/loss": "1"} for s in range(6)]
    rows += [{"epoch": "0", "step": "5", "val/acc": "0.5"}, {"epoch": "", "step": "6", "lr-SGD": "0.04"},
             {"epoch": "1", "step": "6", "train/loss": "1"}]
    kept = lambda step: [(r["step"], "val/acc" in r) for r in rows if _keep(r, step)]  # noqa: E731
    # at epoch 0's end (6 batches): every row of epoch 0, validation included, nothing of epoch 1
    assert kept(6) == [(str(s), False) for s in range(6)] + [("5", True)]
    # mid-epoch after 5 batches: batch 6's row and the validation after it run again
    assert kept(5) == [(str(s), False) for s in range(5)]
