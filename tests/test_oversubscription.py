"""CPU oversubscription: more ranks x threads than cores warns once, on rank 0, with the fix."""

import os

import lightning as L
import pytest

from kdkit import distributed
from kdkit.distributed import warn_if_oversubscribed


@pytest.fixture
def cores(monkeypatch):
    """cores(n): pretend this process may run on n cores; a fresh warn-once flag, no OMP setting."""
    monkeypatch.setattr(distributed, "_oversubscription_warned", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)

    def _set(n: int):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: n)

    return _set


def _ddp_trainer(devices: int) -> L.Trainer:
    # building a Trainer launches nothing: ranks start in fit()
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdkit: warning:")]


def test_three_ranks_on_two_cores_warn_once(cores, capsys):
    cores(2)
    trainer = _ddp_trainer(3)
    capsys.readouterr()  # Lightning's own info lines
    message = warn_if_oversubscribed(trainer)
    assert message == ("3 CPU ranks x 1 thread on 2 cores oversubscribes the CPU and runs many "
                       "times slower; use trainer.devices=2 so that ranks x threads <= 2")
    assert warn_if_oversubscribed(trainer) is None  # the next stage's trainer: no repeat
    assert _warnings(capsys) == [f"kdkit: warning: {message}"]


def test_ranks_that_fit_the_cores_do_not_warn(cores, capsys):
    cores(2)
    trainer = _ddp_trainer(2)
    capsys.readouterr()
    assert warn_if_oversubscribed(trainer) is None
    assert _warnings(capsys) == []


def test_omp_threads_count_per_rank(cores, monkeypatch, capsys):
    cores(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # Lightning keeps it: 2 ranks x 4 threads on 4 cores
    message = warn_if_oversubscribed(_ddp_trainer(2))
    assert message.startswith("2 CPU ranks x 4 threads on 4 cores")
    assert "trainer.devices=1" in message and "OMP_NUM_THREADS" in message and "now 4" in message


def test_single_process_with_too_many_threads(cores, monkeypatch):
    cores(2)
    monkeypatch.setattr(distributed.torch, "get_num_threads", lambda: 8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    message = warn_if_oversubscribed(trainer)
    assert message.startswith("1 CPU rank x 8 threads on 2 cores") and "trainer.devices" not in message


def test_other_ranks_stay_silent(cores, monkeypatch, capsys):
    cores(2)
    trainer = _ddp_trainer(3)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank relaunched by the ddp strategy
    capsys.readouterr()
    assert warn_if_oversubscribed(trainer) is None
    assert _warnings(capsys) == []
