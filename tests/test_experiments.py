"""Every experiment config composes, instantiates and runs a few steps of every stage."""

from pathlib import Path

import pytest

# Experiments whose real data is too costly for the default suite run the same config on toy
# data in their setting's test file instead (named here, so none goes untested silently).
ON_TOY_DATA = {
    # encoding the 5,183-document corpus with the real teacher takes ~10 CPU minutes
    "scifact_minilm": "tests/tasks/test_retrieval.py::test_pipeline_smoke_run",
    "scifact_minilm_sentences": "tests/tasks/test_retrieval.py::test_pipeline_smoke_run",
    "scifact_minilm_scorer": "tests/tasks/test_retrieval_scorers.py::test_pipeline_smoke_run",
    "scifact_minilm_exits": "tests/tasks/test_retrieval_exits.py::test_pipeline_smoke_run",
    "scifact_minilm_matryoshka": "tests/tasks/test_retrieval_compact.py::test_matryoshka_pipeline_smoke_run",
}
ALL = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))
EXPERIMENTS = [name for name in ALL if name not in ON_TOY_DATA]

# Experiments whose smoke run needs smaller data than their real one (kept here, next to the
# smoke overrides, so the experiment files themselves stay what users run).
SMALLER = {
    "cifar10_resnet56_resnet8": ["data.train_limit=256", "data.val_size=32", "data.batch_size=16",
                                 "data.eval_batch_size=32"],
    "cifar10_resnet56_resnet20": ["data.train_limit=256", "data.val_size=32", "data.batch_size=16",
                                  "data.eval_batch_size=32"],
    "cifar10_deit": ["data.train_limit=256", "data.val_size=32", "data.batch_size=32", "data.eval_batch_size=64"],
    "cifar10_vit_vit": ["data.train_limit=256", "data.val_size=32", "data.batch_size=32", "data.eval_batch_size=64"],
    "cifar10_resnet32x4_resnet8x4": ["data.train_limit=256", "data.val_size=32", "data.batch_size=8",
                                     "data.eval_batch_size=8", "trainer.precision=32-true"],
}


def one_teacher_epoch(name: str) -> list[str]:
    """``max_epochs=1`` for every teacher the experiment trains (the shorthand and named ones)."""
    from kdkit.compose import compose
    from kdkit.teachers import teacher_configs

    cfg = compose([f"experiment={name}"])
    return [("teacher" if t == "teacher" else f"teachers.{t}") + ".max_epochs=1" for t in teacher_configs(cfg)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_a_few_steps(name, compose_run, data_dir):
    extra = [*SMALLER.get(name, []), *one_teacher_epoch(name)]
    cfg, results = compose_run(f"experiment={name}", *extra)
    assert set(results) >= {"student"}
    for stage, metrics in results.items():
        assert metrics, stage
        assert all(v == v for v in metrics.values() if isinstance(v, float)), f"NaN in {stage}"


def test_toy_data_runs_exist():
    root = Path(__file__).resolve().parents[1]
    for name, test in ON_TOY_DATA.items():
        path, func = test.split("::")
        assert name in ALL and f"def {func}(" in (root / path).read_text()
