"""benchmarks/vit.py: every CNN -> ViT row it runs is a config that builds and trains a step, and
a teacher given by checkpoint is named in the results with the accuracy its own run measured."""

import json

import pytest
import torch
from hydra.utils import instantiate

from benchmarks._common import RunLog
from benchmarks.vit import CNN_METHODS, TIMED, record_given_teacher


@pytest.mark.parametrize("method", TIMED)
def test_every_cnn_row_builds_and_takes_a_training_step(method):
    """Every distilling row (the rows ``vit.py steps`` times) builds and trains a step."""
    from kdkit.compose import compose
    from kdkit.pipeline import make_task
    from kdkit.student_init import make_student
    from kdkit.teachers import make_distillers

    torch.manual_seed(0)
    cfg = compose(["experiment=cifar10_deit", *CNN_METHODS[method]])
    task = make_task(cfg, student=make_student(cfg), teachers={"teacher": instantiate(cfg.teacher.model)},
                     distillers=make_distillers(cfg), teacher_cfgs={"teacher": cfg.teacher}, probe=True)
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4)}
    task.build(batch, 100, 10)
    losses, _ = task.losses(batch)
    assert set(losses) >= {"task"} and len(losses) >= 2 and all(torch.isfinite(v) for v in losses.values())


def test_a_given_teacher_is_recorded_once_with_its_own_runs_accuracy_and_machine(tmp_path):
    teacher_dir = tmp_path / "cifar10_20k" / "teacher"
    teacher_dir.mkdir(parents=True)
    (teacher_dir / "results.json").write_text(json.dumps({"teacher": {"test/acc": 0.8139, "params": 272474,
                                                                      "fit_seconds": 1761.4}}))
    (tmp_path / "cifar10_20k" / "results.jsonl").write_text(json.dumps(
        {"method": "teacher", "seed": 0, "machine": "vm: 2 cores (AMD EPYC), no GPU"}) + "\n")

    def key(row):
        return row["part"], row["method"], row["seed"]

    log = RunLog(tmp_path / "vit_cnn" / "results.jsonl", key=key, archive=False)
    record_given_teacher("cnn", teacher_dir / "teacher.pt", log)
    record_given_teacher("cnn", teacher_dir / "teacher.pt", log)
    rows = (tmp_path / "vit_cnn" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1
    row = json.loads(rows[0])
    assert (row["method"], row["test/acc"], row["machine"]) == ("teacher", 0.8139, "vm: 2 cores (AMD EPYC), no GPU")
    assert row["teacher_ckpt"] == str(teacher_dir / "teacher.pt")
    record_given_teacher("cnn", tmp_path / "elsewhere" / "teacher.pt", RunLog(tmp_path / "x.jsonl", key=key,
                                                                               archive=False))
    assert not (tmp_path / "x.jsonl").exists()  # no results.json beside it: nothing to name
    # a teacher that came out different (retrained elsewhere) is refused: its rows would mix teachers
    (teacher_dir / "results.json").write_text(json.dumps({"teacher": {"test/acc": 0.8127, "params": 272474}}))
    with pytest.raises(SystemExit, match=r"test/acc 0.8127.*distilled a teacher of test/acc 0.8139"):
        record_given_teacher("cnn", teacher_dir / "teacher.pt", log)


def test_repeats_fill_free_workers_and_go_to_the_best_two_besides_kd(tmp_path, monkeypatch):
    """Seed 0 of every row, then the baseline's and KD's repeats in the same queue (a worker
    freed early takes one); once seed 0 is in, the repeats of the best two rows other than KD.
    A run that fails holds back neither the later phase nor the report; it is raised after them."""
    from benchmarks import vit

    acc = {"baseline": 0.65, "kd": 0.68, "cskd": 0.69, "fitnet": 0.76, "trg": 0.75, "at": 0.67, "mfd": 0.66}
    queued: list[list[tuple[str, int]]] = []
    reports = []

    def fake_jobs(jobs, n_jobs, threads, failed=None):
        queued.append([(m, s) for m, s, _over, _dir in jobs])
        for m, s, _over, _dir in jobs:
            if m == "mfd" and not reports:  # fails before the first report only
                failed.append(f"{m} seed {s}: KeyError: 'student'")
                continue
            yield {"method": m, "seed": s, "test/acc": acc[m], "wall_s": 1.0}

    monkeypatch.setattr(vit, "run_all_jobs", fake_jobs)
    monkeypatch.setattr(vit, "report", lambda logs: reports.append(len(logs["cnn"].done)))
    monkeypatch.setattr(vit, "machine", lambda: "test")
    ckpt = tmp_path / "teacher.pt"
    monkeypatch.setattr("sys.argv", ["vit.py", "cnn", "--teacher-ckpt", str(ckpt), "--seeds", "3",
                                     "--methods", ",".join(acc), "--out", str(tmp_path / "runs")])
    with pytest.raises(RuntimeError, match=r"(?s)1 run failed.*mfd seed 0"):
        vit.main()
    assert queued == [
        [(m, 0) for m in acc] + [("baseline", 1), ("kd", 1), ("baseline", 2), ("kd", 2)],
        [("fitnet", 1), ("trg", 1), ("fitnet", 2), ("trg", 2)],
    ]
    assert reports == [len(acc) - 1 + 8]  # the report came before the error, every finished row in it
    queued.clear()
    vit.main()  # a rerun runs only what is missing: the failed row
    assert queued == [[("mfd", 0)], []]


def test_steps_refuses_a_baseline_row_before_building_anything(monkeypatch):
    from benchmarks import vit

    assert set(CNN_METHODS) - set(TIMED) == {"baseline", "baseline_strong_aug"}
    monkeypatch.setattr("sys.argv", ["vit.py", "steps", "--methods", "baseline_strong_aug"])
    with pytest.raises(SystemExit, match="untimed rows.*baseline_strong_aug"):
        vit.main()
