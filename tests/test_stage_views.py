"""Each stage of a transfer run trains on its own view: the teacher on every label, the baseline
on the labelled part, the student on the labelled part plus the unlabelled rest."""

import json

from kdkit.datamodules.digits import DigitsDataModule


def test_each_stage_reads_its_view_and_reports_it(compose_run):
    cfg, results = compose_run("data.labeled_fraction=0.2", "stages.baseline_max_epochs=equal_steps")
    dm = DigitsDataModule(labeled_fraction=0.2)
    dm.setup("fit")
    n, labelled = len(dm.train_set), round(0.2 * len(dm.train_set))
    assert results["teacher"]["train_samples"] == n and results["teacher"]["train_unlabeled"] == 0
    assert results["baseline"]["train_samples"] == labelled and results["baseline"]["train_unlabeled"] == 0
    assert results["student"]["train_samples"] == n and results["student"]["train_unlabeled"] == n - labelled
    stage = json.loads(open(f"{cfg.paths.output_dir}/stages/student.json").read())
    assert stage["train_unlabeled"] == n - labelled  # kept with the stage, for resumed runs
    # equal_steps: the baseline trains as many epochs as give it the student's steps per epoch
    epochs = -(-(n // 64) // (labelled // 64))
    rows = [line.split(",") for line in open(f"{cfg.paths.output_dir}/logs/baseline/metrics.csv").read().splitlines()]
    validated = {int(r[0]) for r in rows[1:] if r[rows[0].index("val/acc")]}
    assert validated == set(range(epochs)) and epochs == 6


def test_without_transfer_options_results_carry_no_view_facts(compose_run):
    _, results = compose_run()
    assert all("train_unlabeled" not in r for r in results.values())
