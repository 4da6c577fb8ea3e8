"""KeepBestWeights: the trained state of the best validation epoch comes back when fitting ends."""

import pytest
import torch

from kdkit.callbacks import KeepBestWeights
from kdkit.checkpoint_io import AtomicCheckpointIO
from kdkit.errors import KdkitError
from tests.tasks.tiny_task import Snapshots, VectorData, scripted_task, trained_state, trainer


def assert_same(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for k, v in state.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


@pytest.mark.parametrize("mode, scores, best", [
    ("max", [0.3, 0.7, 0.5, 0.7, 0.2, 0.6], 3),  # ties: the later epoch wins (GLNN, FF-G2M)
    ("min", [0.3, 0.1, 0.5, 0.1, 0.4, 0.6], 3),
])
def test_restores_student_and_adapters_of_the_best_epoch(mode, scores, best):
    keep = KeepBestWeights("val/acc", mode=mode)
    task = scripted_task(scores, callbacks={"keep_best": keep})
    snaps = Snapshots()
    tr = trainer(len(scores), callbacks=[snaps])
    tr.fit(task, datamodule=VectorData())
    assert len(snaps.states) == len(scores) and keep.best_epoch == best
    assert any(not torch.equal(v, snaps.states[best][k]) for k, v in snaps.states[-1].items())
    assert "distillers.mse.adapter.weight" in snaps.states[best]
    assert_same(trained_state(task), snaps.states[best])
    assert task.fit_summary() == {"val/acc_selected": pytest.approx(scores[best])}
    assert sum(cb is keep for cb in tr.callbacks) == 1
    tr.validate(task, datamodule=VectorData(), verbose=False)  # not a fit: selects nothing
    assert keep.best_epoch == best and sum(cb is keep for cb in tr.callbacks) == 1


def test_without_the_callback_the_last_epoch_stays():
    task = scripted_task([0.9, 0.1, 0.2])
    snaps = Snapshots()
    trainer(3, callbacks=[snaps]).fit(task, datamodule=VectorData())
    assert_same(trained_state(task), snaps.states[-1])
    assert task.fit_summary() == {}


def test_a_trainer_callback_reports_through_the_task_too():
    keep = KeepBestWeights("val/acc")
    task = scripted_task([0.2, 0.9, 0.1], distill=False)
    snaps = Snapshots()
    trainer(3, callbacks=[snaps, keep]).fit(task, datamodule=VectorData())
    assert_same(trained_state(task), snaps.states[1])
    assert task.fit_summary() == {"val/acc_selected": pytest.approx(0.9)}


def test_teacher_stage_selects_only_when_asked():
    for teacher_stage, kept in ((False, -1), (True, 0)):
        keep = KeepBestWeights("val/acc", teacher_stage=teacher_stage)
        task = scripted_task([0.9, 0.1, 0.2], distill=False, callbacks=[keep])
        task.student_role = "teacher"
        snaps = Snapshots()
        trainer(3, callbacks=[snaps]).fit(task, datamodule=VectorData())
        assert_same(trained_state(task), snaps.states[kept])
        assert bool(task.fit_summary()) == teacher_stage


def test_a_resumed_fit_restores_the_best_epoch_seen_before_the_interruption(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    scores = [0.3, 0.5, 0.9, 0.4, 0.2, 0.6]  # the best epoch is the last one before the stop
    snaps = Snapshots()
    first = scripted_task(scores, callbacks=[KeepBestWeights("val/acc")])
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(3, callbacks=[snaps, ckpt], enable_checkpointing=True,
            plugins=[AtomicCheckpointIO()]).fit(first, datamodule=VectorData())
    keep = KeepBestWeights("val/acc")  # a new process: nothing in memory
    resumed = scripted_task(scores, callbacks=[keep])
    trainer(6, plugins=[AtomicCheckpointIO()]).fit(resumed, datamodule=VectorData(),
                                                    ckpt_path=str(tmp_path / "last.ckpt"))
    assert keep.best_epoch == 2
    assert_same(trained_state(resumed), snaps.states[2])
    assert resumed.fit_summary() == {"val/acc_selected": pytest.approx(0.9)}


def test_state_dict_round_trip_and_bad_mode():
    keep = KeepBestWeights("val/loss", mode="min")
    assert keep.state_dict() == {}  # nothing selected: nothing in checkpoints
    state = {"student": {"weight": torch.ones(2)}, "distillers": {}}
    keep.best_score, keep.best_epoch, keep.best_state = 0.5, 4, state
    other = KeepBestWeights("val/loss", mode="min")
    other.load_state_dict(keep.state_dict())
    assert (other.best_score, other.best_epoch, other.best_state) == (0.5, 4, state)
    assert other.state_key != KeepBestWeights("val/acc").state_key
    with pytest.raises(KdkitError, match="mode"):
        KeepBestWeights(mode="best")
