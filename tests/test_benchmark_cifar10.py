"""benchmarks/cifar10.py's bookkeeping: a retrained teacher that differs never serves the
students of the one it replaces, and the report's convergence column reads the logged losses."""

import pytest

from benchmarks._common import epoch_means
from benchmarks.cifar10 import check_reproduced, convergence


def test_a_teacher_that_came_back_the_same_serves_the_old_students(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"weights")
    row = {"test/acc": 0.8139, "val/acc": 0.819}
    check_reproduced(None, row, tmp_path, ckpt)  # nothing recorded before: any teacher will do
    check_reproduced(dict(row), row, tmp_path, ckpt)
    assert ckpt.read_bytes() == b"weights"


def test_a_different_teacher_is_set_aside_and_the_benchmark_stops(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"weights")
    before = {"test/acc": 0.8168, "val/acc": 0.81, "machine": "vm: 2 cores (Intel Xeon), no GPU"}
    with pytest.raises(SystemExit, match=r"0\.8139.*0\.8168.*Intel Xeon"):
        check_reproduced(before, {"test/acc": 0.8139, "val/acc": 0.819}, tmp_path, ckpt)
    # a resumed run must not pick the new checkpoint up as the old teacher
    assert not ckpt.exists() and (tmp_path / "teacher.pt.not-reproduced").read_bytes() == b"weights"


def test_epoch_means_average_each_epochs_logged_steps(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/acc\n"
                   "0,0,2.0,\n0,1,1.0,\n0,1,,0.5\n"  # the validation row has no train loss
                   "1,2,0.5,\n1,3,0.25,\n")
    assert epoch_means(csv) == [1.5, 0.375]
    assert epoch_means(tmp_path / "missing.csv") == []


def test_convergence_is_the_last_epoch_and_its_change_over_the_last_tenth():
    falling = [float(20 - e) for e in range(20)]  # 20 epochs: the last tenth is 2 epochs
    flat = [5.0] * 10 + [1.0] * 10
    assert convergence([{"train_loss_by_epoch": falling}]) == "1.000 (-2.000)"
    assert convergence([{"train_loss_by_epoch": falling}, {"train_loss_by_epoch": flat}]) == "1.000 (-1.000)"
    assert convergence([{"test/acc": 0.5}]) == "-"  # rows recorded before the losses were


def test_repeats_known_in_advance_queue_with_seed_0_and_the_best_method_follows(tmp_path, monkeypatch):
    """Seed 0 of every method, then the repeats that do not depend on it (baseline, KD, the
    --more-seeds methods) in the same queue; once seed 0 is in, the best method's repeats."""
    from benchmarks import cifar10

    acc = {"baseline": 0.78, "kd": 0.81, "dkd": 0.80, "at": 0.78, "sp": 0.82}
    queued: list[list[tuple[str, int]]] = []

    def fake_jobs(jobs, n_jobs, threads, failed=None):
        queued.append([(m, s) for m, s, _over, _dir in jobs])
        for m, s, _over, _dir in jobs:
            yield {"method": m, "seed": s, "test/acc": acc[m], "wall_s": 1.0}

    monkeypatch.setattr(cifar10, "run_all_jobs", fake_jobs)
    monkeypatch.setattr(cifar10, "report", lambda *a: None)
    monkeypatch.setattr(cifar10, "machine", lambda: "test")
    monkeypatch.setattr(cifar10, "steps_per_epoch", lambda common: 148)
    monkeypatch.setattr("sys.argv", ["cifar10.py", "--teacher-ckpt", str(tmp_path / "teacher.pt"), "--seeds", "3",
                                     "--methods", "kd,dkd,at,sp", "--more-seeds", "dkd,crd",
                                     "--out", str(tmp_path / "runs")])
    cifar10.main()
    assert queued == [
        [(m, 0) for m in acc] + [("baseline", 1), ("kd", 1), ("dkd", 1), ("baseline", 2), ("kd", 2), ("dkd", 2)],
        [("sp", 1), ("sp", 2)],  # crd was not asked for: no repeats of it
    ]


def test_the_report_names_the_best_single_method_of_the_whole_log_not_of_this_invocation(tmp_path, monkeypatch):
    """A run asked for one combination (``--methods kd+at``) over a log whose KD is better: the
    report's best single method is KD (it once named the run's own ``kd+at``). Which method gets
    the repeats is the test above's."""
    import json

    from benchmarks import cifar10

    out = tmp_path / "runs"
    out.mkdir()
    old = [{"method": m, "seed": 0, "test/acc": a, "params": 78042}
           for m, a in [("baseline", 0.78), ("kd", 0.81), ("at", 0.77)]]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))

    def fake_jobs(jobs, n_jobs, threads, failed=None):
        for m, s, _over, _dir in jobs:
            yield {"method": m, "seed": s, "test/acc": 0.80, "params": 78042, "wall_s": 1.0}

    written = {}
    monkeypatch.setattr(cifar10, "run_all_jobs", fake_jobs)
    monkeypatch.setattr(cifar10, "write", lambda name, text: written.update({name: text}))
    monkeypatch.setattr(cifar10, "machine", lambda: "test")
    monkeypatch.setattr(cifar10, "steps_per_epoch", lambda common: 148)
    monkeypatch.setattr("sys.argv", ["cifar10.py", "--teacher-ckpt", str(tmp_path / "teacher.pt"), "--seeds", "1",
                                     "--methods", "kd+at", "--out", str(out),
                                     "--notes", str(tmp_path / "none.md")])
    cifar10.main()
    assert "Best single method at seed 0: `kd`." in written["runs.md"]


def test_the_report_compares_each_method_with_the_baseline_at_its_own_seeds(tmp_path, monkeypatch):
    """A method run at seed 0 only is compared with the baseline's seed 0, not with a mean over
    baseline seeds it never ran (they share the student's init and data order seed by seed)."""
    import argparse

    from benchmarks import cifar10

    written = {}
    monkeypatch.setattr(cifar10, "write", lambda name, text: written.update({name: text}))
    row = lambda m, s, acc: {"method": m, "seed": s, "test/acc": acc, "params": 78042}  # noqa: E731
    done = {("baseline", 0): row("baseline", 0, 0.70), ("baseline", 1): row("baseline", 1, 0.74),
            ("kd", 0): row("kd", 0, 0.73), ("at", 0): row("at", 0, 0.71), ("at", 1): row("at", 1, 0.73),
            ("sp", 2): row("sp", 2, 0.75)}
    args = argparse.Namespace(experiment="cifar10_resnet20_resnet8", epochs=60, teacher_epochs=40, extra=[],
                              steps_per_epoch=148, notes=str(tmp_path / "none.md"), out=str(tmp_path / "cifar10_x"))
    cifar10.report(args, done)
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")[3] for line in written["cifar10_x.md"].splitlines()
             if line.startswith("| ") and not line.startswith("| method")}
    assert table == {"baseline": "+0.00", "kd": "+3.00", "at": "+0.00",
                     "sp": "+3.00"}  # sp's seed 2 has no baseline: the baseline's mean, 0.72
