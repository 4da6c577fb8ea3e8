"""Teacher-labels files: written once, exact on read, refused when stale, and a run that writes
them never runs its teacher while the student trains."""

import functools
from pathlib import Path

import pytest
import torch

from kdkit.cache import weights_fingerprint
from kdkit.compose import compose
from kdkit.datamodules.digits import DigitsDataModule
from kdkit.errors import KdkitError
from kdkit.pipeline import run
from kdkit.tasks.base import DistillationTask
from kdkit.tasks.classification import ClassificationTask
from kdkit.teacher_labels import FORMAT, TeacherLabels, label_dataset
from tests.conftest import SMOKE
from tests.helpers import TinyNet


def _dm():
    dm = DigitsDataModule(labeled_fraction=0.2)
    dm.setup("fit")
    dm.use_train_view("transfer")
    return dm


def _task():
    torch.manual_seed(0)
    return ClassificationTask(TinyNet(in_channels=1, num_classes=10), TinyNet(in_channels=1, num_classes=10),
                              num_classes=10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def test_labels_are_the_teachers_outputs_on_every_plain_sample_and_round_trip(tmp_path):
    dm, task = _dm(), _task()
    tensors = label_dataset(task, "teacher", dm.plain_train_view, batch_size=100, progress=False)
    images = torch.stack([dm.plain_train_view[i]["image"] for i in range(len(dm.plain_train_view))])
    with torch.no_grad():
        want = task.teacher.model(images)
    assert torch.allclose(tensors["logits"], want, atol=1e-5) and len(tensors["logits"]) == len(images)
    meta = {"format": FORMAT, "num_samples": len(images), "teacher": "abc", "data": {"view": "transfer"},
            "topk": None, "classes": 10}
    TeacherLabels(tensors, meta).save(tmp_path / "t.safetensors")
    back = TeacherLabels.load(tmp_path / "t.safetensors")
    assert back.meta == meta
    out = back.lookup(torch.tensor([5, 0, 7]), "cpu")
    assert torch.equal(out.logits, tensors["logits"][[5, 0, 7]])
    with torch.no_grad():  # probe and evaluation forwards: the live teacher answers
        assert back.lookup(torch.tensor([0]), "cpu") is None


def test_topk_labels_keep_the_top_probabilities_and_the_tail_mass_exactly():
    dm, task = _dm(), _task()
    full = label_dataset(task, "teacher", dm.plain_train_view, progress=False)["logits"]
    parts = label_dataset(task, "teacher", dm.plain_train_view, topk=3, progress=False)
    labels = TeacherLabels(parts, {"num_samples": len(full), "classes": 10})
    restored = labels.lookup(torch.arange(len(full)), "cpu").logits
    p, q = full.softmax(-1), restored.softmax(-1)
    top = full.topk(3, dim=1).indices
    assert torch.allclose(p.gather(1, top), q.gather(1, top), atol=1e-5)
    assert torch.allclose(1 - p.gather(1, top).sum(1), 1 - q.gather(1, top).sum(1), atol=1e-5)


def test_stale_or_foreign_files_are_refused(tmp_path):
    labels = TeacherLabels({"logits": torch.zeros(4, 3)}, {"format": FORMAT, "num_samples": 4, "teacher": "t1",
                                                           "data": {"view": "transfer", "num_samples": 4}})
    with pytest.raises(KdkitError, match="another teacher"):
        labels.check_fits("t2", {"view": "transfer", "num_samples": 4}, "f")
    with pytest.raises(KdkitError, match="num_samples: file 4, run 5"):
        labels.check_fits("t1", {"view": "transfer", "num_samples": 5}, "f")
    labels.check_fits("t1", {"view": "transfer", "num_samples": 4}, "f")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(KdkitError, match="not a readable"):
        TeacherLabels.load(tmp_path / "junk.safetensors")
    with pytest.raises(KdkitError, match="no such file"):
        TeacherLabels.load(tmp_path / "missing.safetensors")
    with pytest.raises(KdkitError, match="outside 0..3"):
        labels.lookup(torch.tensor([4]), "cpu")


@pytest.fixture
def teacher_forwards_in_training(monkeypatch):
    """Counts rows the live teacher ran on with grad enabled (training steps, not probes)."""
    rows = []
    live = DistillationTask.run_teacher

    def counted(self, name, batch):
        if torch.is_grad_enabled():
            rows.append(len(batch["label"]))
        return live(self, name, batch)

    monkeypatch.setattr(DistillationTask, "run_teacher", counted)
    return rows


def test_a_run_with_the_labels_stage_never_runs_its_teacher_while_the_student_trains(
        tmp_path, teacher_forwards_in_training):
    over = [*SMOKE, "data.labeled_fraction=0.2", "stages.baseline=false"]
    cfg = compose([*over, "stages.teacher_labels=true"], output_dir=str(tmp_path / "a"))
    results = run(cfg)
    assert teacher_forwards_in_training == [] and "test/acc" in results["student"]
    path = Path(cfg.paths.output_dir) / "teacher_labels" / "teacher.safetensors"
    labels = TeacherLabels.load(path)
    dm = _dm()
    assert labels.num_samples == len(dm.plain_train_view) and labels.meta["data"]["view"] == "transfer"
    from hydra.utils import instantiate

    teacher = instantiate(cfg.teacher.model)
    teacher.load_state_dict(torch.load(Path(cfg.paths.output_dir) / "teacher.pt"))
    assert labels.meta["teacher"] == weights_fingerprint(teacher)

    # a later run reads the file with the same teacher ...
    reuse = [*over, "stages.teacher=false", f"teacher.ckpt_path={Path(cfg.paths.output_dir) / 'teacher.pt'}"]
    run(compose([*reuse, f"teacher.labels={path}"], output_dir=str(tmp_path / "b")))
    assert teacher_forwards_in_training == []
    # ... and refuses it for other training data before anything trains (the teacher stage included)
    stale = [*over, "data.labeled_fraction=0.3", f"teacher.labels={path}"]
    with pytest.raises(KdkitError, match="other training data"):
        run(compose(stale, output_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c" / "teacher.pt").exists() and not (tmp_path / "c" / "stages").exists()
    # without the file the teacher runs every step: the counter does see live forwards
    run(compose(reuse, output_dir=str(tmp_path / "d")))
    assert sum(teacher_forwards_in_training) > 0
