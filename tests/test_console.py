"""What a run prints: its directory, stage-named bars, Lightning's lines once, results.md."""

import io
import logging
import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from rich.console import Console
from rich.progress import Progress
from torch import nn

from kdkit.callbacks.progress import StageProgressBar
from kdkit.compose import RunResults, compose, run
from kdkit.console import tame_lightning_logs
from kdkit.report import table_cells
from kdkit.run_environment import describe, environment
from kdkit.stage_fit import make_trainer


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bar_names_the_stage_and_drops_v_num(tmp_path):
    bar = StageProgressBar(stage="teacher")
    trainer = L.Trainer(max_epochs=2, callbacks=[bar], logger=CSVLogger(tmp_path, name="logs", version="teacher"),
                        enable_checkpointing=False, enable_model_summary=False)
    module = Tiny()
    trainer.fit(module)
    metrics = bar.get_metrics(trainer, module)
    assert "v_num" not in metrics and "train/loss" in metrics
    assert bar._get_train_description(1).strip() == "teacher | epoch 2/2"
    assert bar.test_description == "teacher | testing"


def test_make_trainer_names_each_stage_and_one_switch_turns_bars_off(tmp_path):
    cfg = compose([], output_dir=str(tmp_path))
    bars = [cb for cb in make_trainer(cfg, tmp_path, "baseline").callbacks if isinstance(cb, StageProgressBar)]
    assert [bar.stage for bar in bars] == ["baseline"]
    cfg = compose(["trainer.enable_progress_bar=false"], output_dir=str(tmp_path))
    assert not [cb for cb in make_trainer(cfg, tmp_path, "baseline").callbacks if isinstance(cb, ProgressBar)]


def test_lightning_lines_come_once_per_run(capsys):
    tame_lightning_logs()
    for _ in range(3):  # three stages' Trainers
        rank_zero_info("GPU available: False, used: False")
    assert capsys.readouterr().err.count("GPU available") == 1
    tame_lightning_logs()  # the next run says it again
    rank_zero_info("GPU available: False, used: False")
    assert capsys.readouterr().err.count("GPU available") == 1


def test_lines_logged_under_a_live_bar_are_printed_above_it(capsys):
    # the cause of the doubled bar: Lightning's handler wrote to the stderr of import time, under
    # rich's live display, which then redrew from the wrong line
    tame_lightning_logs()
    screen = io.StringIO()
    with Progress(console=Console(file=screen, force_terminal=True, width=80)) as progress:
        progress.add_task("teacher | epoch 1/1", total=1)
        rank_zero_info("`Trainer.fit` stopped: `max_epochs=1` reached.")
    assert "`Trainer.fit` stopped" in screen.getvalue()  # through rich, which moves the bar down
    assert "`Trainer.fit` stopped" not in capsys.readouterr().err
    assert all(type(h) is not logging.StreamHandler for h in logging.getLogger("lightning.pytorch").handlers)


def test_run_returns_its_directory_and_writes_results_md(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = run(["stages.teacher=false", "stages.student=false", "trainer.max_epochs=1",
                   "trainer.enable_progress_bar=false", "report.latency_batch_size=16"])
    assert isinstance(results, RunResults) and isinstance(results, dict)
    assert list(results) == ["baseline"] and results["baseline"]["test/acc"] > 0.3
    # the CLI's directory: <paths.log_dir>/<name>/<date>_<time> under the current directory
    assert results.run_dir.parent == tmp_path / "outputs" / "digits_demo"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", results.run_dir.name)
    assert (results.run_dir / "results.json").exists()
    err = capsys.readouterr().err
    assert err.count(f"kdkit: run directory: {results.run_dir}") == 2  # at the start and the end
    header, rows = table_cells(dict(results))
    md = (results.run_dir / "results.md").read_text().splitlines()
    assert md[2] == "| " + " | ".join(header) + " |"
    assert md[4:4 + len(rows)] == ["| " + " | ".join(row) + " |" for row in rows]
    assert md[4 + len(rows):] == ["", f"Environment (environment.json): {describe(environment())}"]
    # a second run in the same second gets its own directory instead of resuming this one
    cfg = compose([], output_dir=None)
    assert Path(cfg.paths.output_dir) != results.run_dir
