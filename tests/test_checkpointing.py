"""kdkit.checkpointing: a checkpoint every epoch, the previous one kept, and the resume choice."""

import csv
import random

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from kdkit.checkpoint_io import save_atomically
from kdkit.checkpointing import LAST, PREVIOUS, find_resume_point, rng_state, set_rng_state
from kdkit.compose import compose
from kdkit.errors import KdkitError
from kdkit.pipeline import run


def _ckpt(epoch: int) -> dict:
    return {"epoch": epoch, "global_step": 10 * (epoch + 1), "state_dict": {"w": torch.full((3,), float(epoch))}}


def test_newest_good_checkpoint_is_chosen(tmp_path):
    save_atomically(_ckpt(1), tmp_path / PREVIOUS)
    save_atomically(_ckpt(2), tmp_path / LAST)
    point = find_resume_point(tmp_path)
    assert (point.path.name, point.epoch, point.global_step, point.fell_back) == (LAST, 2, 30, False)


def test_corrupt_last_falls_back_to_previous_and_is_moved_aside(tmp_path, capsys):
    save_atomically(_ckpt(1), tmp_path / PREVIOUS)
    save_atomically(_ckpt(2), tmp_path / LAST)
    data = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 3])  # truncated, as a full disk leaves it
    point = find_resume_point(tmp_path)
    assert (point.path.name, point.epoch, point.fell_back) == (PREVIOUS, 1, True)
    # moved aside, so the next write cannot rotate it over the good previous.ckpt
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST + ".corrupt", PREVIOUS]
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("kdkit: warning:") and "last.ckpt" in warning and len(warning.splitlines()) == 1


def test_no_loadable_checkpoint_is_one_line_naming_the_files(tmp_path):
    (tmp_path / LAST).write_bytes(b"")
    (tmp_path / PREVIOUS).write_bytes(b"garbage" * 50)
    with pytest.raises(KdkitError) as err:
        find_resume_point(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / LAST) in message and str(tmp_path / PREVIOUS) in message


def test_nothing_to_resume_is_none(tmp_path):
    assert find_resume_point(tmp_path / "never-ran") is None


def test_random_state_round_trips_through_a_safe_checkpoint(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    save_atomically({"rng": rng_state()}, tmp_path / "s.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(torch.load(tmp_path / "s.ckpt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_every_epoch_writes_last_and_keeps_previous(compose_run, tmp_path):
    compose_run("callbacks=default", "~callbacks.progress_bar", "trainer.max_epochs=3",
                "stages.baseline=false", "stages.student=false")
    directory = tmp_path / "run" / "checkpoints" / "teacher"
    last = torch.load(directory / LAST, weights_only=True)
    previous = torch.load(directory / PREVIOUS, weights_only=True)
    assert (previous["epoch"], last["epoch"]) == (1, 2)  # one per epoch, the newest two kept
    assert last["global_step"] == 3 * 2 and previous["global_step"] == 2 * 2


def test_every_n_train_steps(compose_run, tmp_path):
    compose_run("callbacks=default", "~callbacks.progress_bar", "callbacks.checkpoint.every_n_epochs=0",
                "callbacks.checkpoint.every_n_train_steps=3", "trainer.max_epochs=2",
                "trainer.limit_train_batches=4", "stages.baseline=false", "stages.student=false")
    directory = tmp_path / "run" / "checkpoints" / "teacher"
    steps = (torch.load(directory / PREVIOUS, weights_only=True)["global_step"],
             torch.load(directory / LAST, weights_only=True)["global_step"])
    assert steps == (3, 6)


def test_resuming_removes_every_temporary_of_a_killed_writer(tmp_path):
    save_atomically(_ckpt(1), tmp_path / LAST)
    for name in (".last.ckpt.x1.tmp", ".previous.ckpt.123.tmp"):  # just killed: seconds old
        (tmp_path / name).write_bytes(b"half")
    assert find_resume_point(tmp_path).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


class DieBeforeValidation(Callback):
    """Raises as ``epoch``'s validation starts: the run dies between the epoch's last training
    step and its validation (a crash, or a kill at that moment)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            raise RuntimeError("died before validation")


def test_a_step_checkpoint_on_an_epochs_last_batch_waits_for_its_validation(tmp_path):
    """Lightning resumes a checkpoint written at an epoch's last batch past that epoch's
    validation, which then never runs (found by the fault suite: a kill -9 right after such a
    checkpoint lost epoch 0's validation row). So that checkpoint is written after validation."""
    over = ["callbacks=default", "~callbacks.progress_bar", "callbacks.checkpoint.every_n_epochs=0",
            "callbacks.checkpoint.every_n_train_steps=3", "trainer.max_epochs=3", "trainer.limit_train_batches=6",
            "trainer.enable_progress_bar=false", "report.latency_batch_size=8", "export.programs=[]",
            "stages.baseline=false", "stages.student=false"]
    straight = run(compose(over, output_dir=str(tmp_path / "straight")))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="died before validation"):
        run(compose([*over, "+callbacks.die._target_=tests.test_checkpointing.DieBeforeValidation",
                     "+callbacks.die.epoch=1"], output_dir=str(out)))
    # step 12 ends epoch 1: its checkpoint was due but waits for the validation that never came
    assert torch.load(out / "checkpoints" / "teacher" / LAST, weights_only=True)["global_step"] == 9
    resumed = run(compose([*over, "ckpt_path=last", "resume.allow_changes=[callbacks.die]"], output_dir=str(out)))
    with open(out / "logs" / "teacher" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/acc")] == [0, 1, 2]
    assert resumed["teacher"]["test/acc"] == straight["teacher"]["test/acc"]
    assert resumed["teacher"]["val/acc"] == straight["teacher"]["val/acc"]
