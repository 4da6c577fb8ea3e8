"""Resuming a really interrupted run: a real SIGINT mid-run, then ``ckpt_path=last``.

The interruption is the operating system's: ``tests.faults.signals`` sends SIGINT to this process
at the end of an epoch, Lightning's Ctrl-C handling runs and the checkpoint callback writes
``last.ckpt``; the kill -9 / SIGTERM / DDP variants run as subprocesses in ``tests/faults``.
"""

import csv
import json
import signal

import pytest
import torch

from kdkit.compose import compose
from kdkit.errors import KdkitError
from kdkit.pipeline import run

BASE = ["trainer.max_epochs=3", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        "report.latency_batch_size=8", "stages.baseline=false", "trainer.limit_train_batches=6",
        "trainer.log_every_n_steps=2", "student.model.dropout=0.3"]  # dropout: the random state must resume too
SIGINT_AFTER = ["+callbacks.interrupt._target_=tests.faults.signals.SignalAtEpochEnd",
                "+callbacks.interrupt.stage=student", "+callbacks.interrupt.epoch=1"]
ALLOW = ["resume.allow_changes=[callbacks.interrupt]"]


@pytest.fixture(autouse=True)
def ctrl_c_interrupts():
    """Ctrl-C as in a terminal: a process started in the background by a non-interactive shell
    (``cmd &``, as a CI script may launch the tests) inherits SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler, so the interrupted run would simply go on."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _metrics(results: dict) -> dict:
    return {stage: {k: v for k, v in m.items() if k.startswith(("test/", "val/"))}
            for stage, m in results.items()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return run(compose(BASE, output_dir=str(out))), out


@pytest.fixture(scope="module")
def straight(straight_run):
    return straight_run[0]


def _train_losses(run_dir) -> dict[int, str]:
    with open(run_dir / "logs" / "student" / "metrics.csv") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def test_sigint_then_resume_equals_an_uninterrupted_run(tmp_path, straight, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:  # Lightning exits 1 after a Ctrl-C
        run(compose([*BASE, *SIGINT_AFTER], output_dir=out))
    assert exit_info.value.code == 1
    assert "interrupted at epoch 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "stages" / "student.json").exists()  # really cut short

    resumed = run(compose([*BASE, "ckpt_path=last", *ALLOW], output_dir=out))
    err = capsys.readouterr().err
    assert "resuming stage 'student' from" in err and "after epoch 1" in err
    assert _metrics(resumed) == _metrics(straight)  # the same numbers, to the last digit
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == resumed

    with open(tmp_path / "run" / "logs" / "student" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val/acc")]
    assert val_epochs == [0, 1, 2]  # epochs before the interruption kept, none logged twice
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)) and steps[0] < 6 < steps[-1]
    starts = json.loads((tmp_path / "run" / "environment.json").read_text())["starts"]
    assert [s["resumed"] for s in starts] == [False, True]  # both starts on record
    assert "other arithmetic" not in err  # same process, same kernels and threads


def test_sigterm_mid_epoch_then_resume_continues_the_epoch_exactly(tmp_path, straight_run, capsys):
    """SIGTERM (a cluster's pre-emption) after 3 of epoch 1's 6 batches: the checkpoint is
    written mid-epoch, and the resumed stage trains the epoch's other 3 batches, not its first 3
    again (kdkit.resumable_loader), with the same dropout draws: the same numbers to the last
    digit, and the same training loss at every logged step."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run(compose([*BASE, *SIGINT_AFTER, "+callbacks.interrupt.signal_name=SIGTERM",
                     "+callbacks.interrupt.after_batches=3"], output_dir=str(out)))
    assert exit_info.value.code == 143
    assert "interrupted at epoch 1, step 9" in capsys.readouterr().err  # 6 + 3 batches

    resumed = run(compose([*BASE, "ckpt_path=last", *ALLOW], output_dir=str(out)))
    assert "resuming stage 'student' from" in capsys.readouterr().err
    assert _metrics(resumed) == _metrics(straight_run[0])
    assert _train_losses(out) == _train_losses(straight_run[1])  # step by step


def test_a_resume_with_other_arithmetic_warns_and_reports_both_starts(tmp_path, capsys):
    """Another thread count is another summation order: the finished epochs were computed with
    the old one, so the run says so rather than pass for an uninterrupted one."""
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    with pytest.raises(SystemExit):
        run(compose([*BASE, *SIGINT_AFTER], output_dir=str(out)))
    try:
        torch.set_num_threads(other)
        run(compose([*BASE, "ckpt_path=last", *ALLOW], output_dir=str(out)))
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "kdkit: warning: resuming" in err and f"torch_threads: {threads} -> {other}" in err
    summary = (out / "results.md").read_text()
    assert "the arithmetic changed on resume" in summary
    assert f"{threads} torch threads" in summary and f"{other} torch threads" in summary
    assert "<details id='environment' open>" in (out / "report.html").read_text()


def test_resume_with_other_settings_is_refused_with_the_differences(tmp_path, straight):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit):
        run(compose([*BASE, *SIGINT_AFTER], output_dir=out))
    changed = [b for b in BASE if not b.startswith("trainer.max_epochs")] + ["trainer.max_epochs=5"]
    with pytest.raises(KdkitError) as err:
        run(compose([*changed, "ckpt_path=last", *ALLOW], output_dir=out))
    message = str(err.value)
    assert "\n" not in message and "trainer.max_epochs: 3 -> 5" in message
    assert "resume.allow_changes=[trainer.max_epochs]" in message
    # allowed explicitly: the interrupted stage continues to the new epoch count
    results = run(compose([*changed, "ckpt_path=last", "resume.allow_changes=[callbacks.interrupt,trainer.max_epochs]"],
                          output_dir=out))
    assert json.loads((tmp_path / "run" / "stages" / "student.json").read_text()) == results["student"]


def test_ckpt_path_last_on_a_new_directory_says_there_is_nothing_to_resume(tmp_path, capsys):
    run(compose([*BASE, "trainer.max_epochs=1", "stages.student=false", "ckpt_path=last"],
                output_dir=str(tmp_path / "new")))
    assert "no checkpoint of stage 'teacher'" in capsys.readouterr().err


def test_config_changes_ignore_where_things_go_and_allowed_keys():
    from kdkit.resume import config_changes

    saved = {"paths": {"output_dir": "/a"}, "trainer": {"max_epochs": 40, "enable_progress_bar": True},
             "distiller": {"kd": {"weight": 1.0}}, "logger": {"csv": {}}}
    current = {"paths": {"output_dir": "/b"}, "trainer": {"max_epochs": 10, "enable_progress_bar": False},
               "distiller": {"kd": {"weight": 1.0}, "fitnet": {"weight": 2.0}}, "logger": {}}
    assert config_changes(saved, current) == ["distiller.fitnet.weight: <absent> -> 2.0",
                                              "trainer.max_epochs: 40 -> 10"]
    assert config_changes(saved, current, allowed=["trainer.max_epochs"]) == [
        "distiller.fitnet.weight: <absent> -> 2.0"]


@pytest.mark.parametrize("damaged, expected", [
    ("stages/teacher.json", "the results of the finished stage 'teacher'"),
    ("config.yaml", "the interrupted run's config"),
])
def test_damaged_run_files_are_one_line_naming_them(tmp_path, damaged, expected):
    out = tmp_path / "run"
    overrides = [*BASE, "trainer.max_epochs=1", "stages.student=false"]
    run(compose(overrides, output_dir=str(out)))
    (out / damaged).write_bytes(b"\x00\xff{[: garbage\n\tline two: [")
    with pytest.raises(KdkitError) as err:
        run(compose([*overrides, "ckpt_path=last"], output_dir=str(out)))
    message = str(err.value)
    assert "\n" not in message and str(out / damaged) in message and expected in message


def test_a_damaged_metrics_csv_is_set_aside_and_the_stage_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        run(compose([*BASE, *SIGINT_AFTER], output_dir=str(out)))
    log = out / "logs" / "student" / "metrics.csv"
    log.write_bytes(b"\xff\xfe garbage \x00")
    results = run(compose([*BASE, "ckpt_path=last", *ALLOW], output_dir=str(out)))
    assert "student" in results and (out / "logs" / "student" / "metrics.csv.corrupt").exists()
    assert "metrics.csv is unreadable" in capsys.readouterr().err
    with open(log) as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/acc")] == [2]  # after resume


def test_settings_added_since_the_run_started_are_named_and_all_listed(tmp_path):
    """A kdkit upgrade adds settings the interrupted run's config.yaml lacks: the error says so and
    its allow_changes list holds every key, so one retry with it resumes."""
    from omegaconf import OmegaConf

    from kdkit.resume import check_resume_config

    OmegaConf.save(OmegaConf.create({"data": {"augment": True}, "trainer": {"max_epochs": 3}}), tmp_path / "config.yaml")
    cfg = OmegaConf.create({"data": {"augment": True, "mixup_alpha": 0.0, "mix_prob": 1.0, "a": 1, "b": 2,
                                     "c": 3, "d": 4}, "trainer": {"max_epochs": 5}})
    with pytest.raises(KdkitError) as err:
        check_resume_config(tmp_path, cfg)
    message = str(err.value)
    assert "6 of them are absent from config.yaml: settings kdkit added after this run started" in message
    assert ("resume.allow_changes=[data.a,data.b,data.c,data.d,data.mix_prob,data.mixup_alpha,"
            "trainer.max_epochs]") in message
    allowed = OmegaConf.merge(cfg, {"resume": {"allow_changes": [
        "data.a", "data.b", "data.c", "data.d", "data.mix_prob", "data.mixup_alpha", "trainer.max_epochs"]}})
    check_resume_config(tmp_path, allowed)  # the suggested list lets it through
