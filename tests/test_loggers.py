"""Logging: every loss term reaches the CSV log; W&B runs offline, one run per stage."""

import csv
from pathlib import Path


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
