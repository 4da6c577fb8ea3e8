"""``benchmarks/teacher_data.py`` states each part's student epochs, read from the commands that
ran its rows (a part may run shorter than the default 30 epochs)."""

from pathlib import Path

from benchmarks.teacher_data import epochs_of


def test_epochs_come_from_the_rows_command():
    assert epochs_of({"command": "python benchmarks/teacher_data.py augment --epochs 8 --jobs 2"}) == 8
    assert epochs_of({"command": "python benchmarks/teacher_data.py select --epochs=12"}) == 12
    assert epochs_of({"command": "python benchmarks/teacher_data.py transfer --jobs 2"}) == 30
    restored = {"source_commands": ["kdkit-train experiment=cifar10_transfer",
                                    "python benchmarks/teacher_data.py budget --epochs 10"]}
    assert epochs_of(restored) == 10
    assert epochs_of({}) == 30


def test_each_teacher_names_the_parts_it_taught(tmp_path):
    from benchmarks._common import RunLog
    from benchmarks.teacher_data import teachers_note

    log = RunLog(tmp_path / "results.jsonl", key=lambda r: (r["part"], r["method"], r["seed"]), archive=False)
    rows = [{"part": "teacher", "method": "old/teacher.pt", "seed": 0, "test/acc": 0.806, "train_samples": 19000},
            {"part": "teacher", "method": "new/teacher.pt", "seed": 0, "test/acc": 0.8012, "train_samples": 19000,
             "machine": "vm: 2 cores (AMD EPYC), no GPU; torch 2.14.1"},
            {"part": "budget", "method": "b", "seed": 0, "teacher_ckpt": "old/teacher.pt"},
            {"part": "transfer", "method": "t", "seed": 0, "teacher_ckpt": "old/teacher.pt"},
            {"part": "augment", "method": "a", "seed": 0, "teacher_ckpt": "new/teacher.pt"},
            {"part": "select", "method": "s", "seed": 0, "teacher_ckpt": "mine.pt"}]
    for row in rows:
        log.record(row)
    note = teachers_note(log)
    assert note[2:5] == [
        "- `old/teacher.pt`: 80.60% test accuracy, 19000 training images; parts: transfer, budget.",
        "- `new/teacher.pt`: 80.12% test accuracy, 19000 training images, on AMD EPYC; parts: augment.",
        "- `mine.pt`: given by `--teacher-ckpt`, not trained by this benchmark; parts: select."]
    assert "not the same teacher" in note[6]  # two trained teachers: the note says they differ


def test_a_teacher_lost_with_its_machine_is_trained_again_under_a_fresh_name(tmp_path, monkeypatch):
    """The rows a lost teacher taught keep naming it; the retrained one gets its own key."""
    import argparse

    import torch

    import kdkit.pipeline
    from benchmarks._common import RunLog
    from benchmarks.teacher_data import train_teacher
    from kdkit.run_environment import record_start

    trained = []

    def fake_run(cfg):  # the naming is under test, not training: record where the teacher goes
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "teacher.pt").write_bytes(b"weights")
        record_start(out, resuming=False)  # as run does: the row reads the run's own record
        trained.append(out)
        return {"teacher": {"test/acc": 0.81}}

    monkeypatch.setattr(kdkit.pipeline, "run", fake_run)
    log = RunLog(tmp_path / "results.jsonl", key=lambda r: (r["part"], r["method"], r["seed"]), archive=False)
    args = argparse.Namespace(threads=1, teacher_epochs=1, retrain_teacher=False)
    first = train_teacher(args, [], tmp_path / "teacher", log)
    assert first == str(tmp_path / "teacher" / "teacher.pt") and len(trained) == 1
    assert train_teacher(args, [], tmp_path / "teacher", log) == first and len(trained) == 1  # present: reused
    Path(first).unlink()  # the checkpoint went with its machine; its row stays in the log
    second = train_teacher(args, [], tmp_path / "teacher", log)
    assert second == str(tmp_path / "teacher_2" / "teacher.pt") and len(trained) == 2
    assert {k[1] for k in log.done} == {first, second}
    args.retrain_teacher = True  # present, but asked again: a third name, its kernel set on record
    third = train_teacher(args, [], tmp_path / "teacher", log)
    assert third == str(tmp_path / "teacher_3" / "teacher.pt") and len(trained) == 3
    assert log.done[("teacher", third, 0)]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_augment_reading_states_gain_and_cost():
    from benchmarks.teacher_data import augment_cost

    rows = [{"method": "crop_flip", "test/acc": 0.675, "fit_seconds": 300.0},
            {"method": "crop_flip", "test/acc": 0.685, "fit_seconds": 340.0},
            {"method": "disagreement_aug", "test/acc": 0.6794, "fit_seconds": 1600.0,
             "selection/augment_select/candidates": 4}]
    line = augment_cost(rows)[0]
    assert line.startswith("- disagreement_aug - crop_flip: -0.06 points (2 / 1 seeds)")
    assert "5.0x the training time and 4x the teacher forwards" in line
    assert augment_cost(rows[:2]) == []
    seeded = [{**r, "seed": i} for i, r in enumerate(rows[:2])]
    learned = [{"method": "vae_aug", "test/acc": 0.6561, "seed": 0, "selection/vae_augment/teacher_forwards": 227328},
               {"method": "learned_aug", "test/acc": 0.70, "seed": 1},  # a restored row: no count recorded
               {"method": "learned_aug", "test/acc": 0.66, "seed": 5}]  # seed 5: no crop_flip to pair with
    assert augment_cost(seeded + learned) == [
        "- learned_aug - crop_flip: +1.50 points (1 paired seed), at the same student steps.",
        "- vae_aug - crop_flip: -1.89 points (1 paired seed), at the same student steps, 227,328 teacher "
        "forwards counted by its policy.", ""]


def test_select_reading_at_equal_steps_and_equal_time():
    from benchmarks.teacher_data import equal_time_reference, select_reading

    def row(method, acc, secs, seed=0):
        return {"part": "clip_select", "method": method, "seed": seed, "test/zeroshot_acc": acc, "fit_seconds": secs}

    rows = [row("uniform", 0.60, 90.0), row("uniform", 0.62, 110.0, seed=1),
            row("select_learnability", 0.635, 250.0), row("select_random", 0.60, 200.0),
            row("uniform_equal_time", 0.64, 240.0)]
    assert equal_time_reference(rows, "clip_select", "test/zeroshot_acc") == "select_learnability"
    assert equal_time_reference(rows, "select", "test/zeroshot_acc") is None
    lines = select_reading(rows, "test/zeroshot_acc")
    assert lines[:3] == [  # select rows ran seed 0 alone: compared with uniform's seed 0 (0.60)
        "- select_learnability - uniform: +3.50 points at equal student steps (1 paired seed), 2.5x the training time.",
        "- select_random - uniform: +0.00 points at equal student steps (1 paired seed), 2.0x the training time.",
        "- At equal training time (uniform_equal_time: the epochs select_learnability's seed-0 time buys): "
        "select_learnability - uniform_equal_time -0.50 points (1 paired seed)."]
    assert select_reading(rows[2:4], "test/zeroshot_acc") == []  # no uniform row: nothing to read


def test_a_retrain_that_reproduced_its_teacher_is_named_with_its_kernels():
    import argparse

    from benchmarks.teacher_data import same_teachers, teachers_note

    epyc = "vm: 2 cores (AMD EPYC), no GPU"
    capped = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    trained = {"t/teacher.pt": {"test/acc": 0.8125, "val/acc": 0.819, "machine": epyc},
               "t_2/teacher.pt": {"test/acc": 0.8125, "val/acc": 0.819, "machine": epyc + "; torch"},
               "t_3/teacher.pt": {"test/acc": 0.8125, "val/acc": 0.819, "machine": epyc,
                                  "cpu_capability": "AVX2", "variables": capped},
               "x/teacher.pt": {"test/acc": 0.8111, "val/acc": 0.799, "machine": epyc,
                                "cpu_capability": "AVX512", "variables": {}},
               "old/teacher.pt": {"test/acc": 0.806}}  # restored: no validation score to compare
    assert same_teachers(trained) == [
        "`t/teacher.pt` and `t_2/teacher.pt` and `t_3/teacher.pt`: the same test and validation accuracy "
        "to every digit (trained on AMD EPYC; AMD EPYC, AVX2 kernels (capped: ATEN_CPU_CAPABILITY=avx2, "
        "ONEDNN_MAX_CPU_ISA=AVX2)): retrained by the same command, the teacher came back the same."]
    trained["t_2/teacher.pt"]["val/acc"] = 0.8191
    trained["t_3/teacher.pt"]["test/acc"] = 0.8124
    assert same_teachers(trained) == []  # a digit apart: not claimed

    log = argparse.Namespace(done={("teacher", c, 0): {"part": "teacher", "method": c, **r}
                                   for c, r in trained.items()})
    note = "\n".join(teachers_note(log))
    assert "- `x/teacher.pt`: 81.11% test accuracy, on AMD EPYC, AVX512 kernels; parts: none yet." in note


def test_gap_reading_says_when_transfer_data_fell_below_the_labelled_part():
    from benchmarks.teacher_data import gap_recovered

    rows = [{"method": m, "test/zeroshot_acc": v} for m, v in
            (("labeled_alone", 0.40), ("labeled_kd", 0.42), ("transfer_kd", 0.41), ("all_labels_kd", 0.44))]
    assert gap_recovered(rows, "test/zeroshot_acc") == [
        "- From labeled_alone to all_labels_kd: transfer_kd closes 25% of the 4.00-point gap.",
        "- transfer_kd is 1.00 points below labeled_kd: the unlabelled rest closed none of the gap to all_labels_kd.",
        ""]


def test_share_reading_pairs_each_share_row_with_its_uniform_row():
    from benchmarks.teacher_data import share_reading

    def row(method, acc, seed):
        return {"part": "clip_transfer", "method": method, "seed": seed, "test/zeroshot_acc": acc}

    rows = [row("transfer_kd", 0.34, 0), row("transfer_kd", 0.36, 1), row("transfer_kd_share64", 0.41, 0),
            row("transfer_kd_share64", 0.44, 1), row("transfer_kd_fd_share64", 0.40, 0), row("labeled_kd", 0.42, 0)]
    assert share_reading(rows, "test/zeroshot_acc") == [  # fd_share64 has no uniform transfer_kd_fd row
        "- transfer_kd_share64 (64 labelled rows in every batch instead of the data's share): +7.50 points vs "
        "transfer_kd (2 paired seeds); -1.00 points vs labeled_kd (1 paired seed).", ""]
    assert share_reading(rows[:2], "test/zeroshot_acc") == []


def test_every_augment_row_composes_on_its_experiment():
    from hydra.utils import instantiate

    from benchmarks.teacher_data import AUGMENT
    from kdkit.compose import compose

    for method, overrides in AUGMENT.items():
        cfg = compose(["experiment=cifar10_transfer", *overrides])
        policies = {name: instantiate(spec) for name, spec in (cfg.get("selection") or {}).items()}
        if method == "vae_aug":
            assert type(policies["vae_augment"]).__name__ == "VAEAugment"
