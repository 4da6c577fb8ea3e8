"""kdkit.callbacks.agreed_sigterm: SIGTERM on one DDP rank stops every rank after the same step
(two real gloo processes agree through the callback's all-reduce), and on one process a real
SIGTERM mid-epoch stops the fit with its interrupt checkpoint. The full DDP job under SLURM-style
SIGTERM is a fault case (``tests/faults``, ``benchmarks/results/faults.md``)."""

import os
import signal
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdkit.callbacks.agreed_sigterm import AgreedSigterm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_trainer():
    return SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu"), launcher=None),
                           _signal_connector=SimpleNamespace(received_sigterm=False))


def _rank(rank: int, port: int, noted_on: int, steps: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        trainer, cb = _fake_trainer(), AgreedSigterm()
        stopped_after = None
        for step in range(steps):
            if rank == noted_on and step == 2:
                cb._noted = True  # what the handler does when the signal lands on this rank
            cb.on_train_batch_end(trainer, None, None, None, step)
            if trainer._signal_connector.received_sigterm:
                stopped_after = step
                break
        out.put((rank, stopped_after))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("noted_on", [0, 1])
def test_a_signal_on_one_rank_stops_both_after_the_same_step(noted_on):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, noted_on, 5, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(out.get(timeout=5) for _ in procs) == [(0, 2), (1, 2)]


def test_on_one_process_a_real_sigterm_stops_the_fit_and_the_handler_is_given_back(compose_run, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        compose_run("trainer.max_epochs=3", "trainer.limit_train_batches=6", "stages.baseline=false",
                    "callbacks=default", "~callbacks.progress_bar",
                    "+callbacks.interrupt._target_=tests.faults.signals.SignalAtEpochEnd",
                    "+callbacks.interrupt.stage=student", "+callbacks.interrupt.epoch=1",
                    "+callbacks.interrupt.signal_name=SIGTERM", "+callbacks.interrupt.after_batches=2")
    assert exit_info.value.code == 143
    assert "interrupted at epoch 1, step 8" in capsys.readouterr().err  # after the batch it came in
    assert signal.getsignal(signal.SIGTERM) == before
