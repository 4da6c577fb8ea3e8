"""Whole runs on the offline digits demo: stages, results.json, export, resume, loading."""

import json

import pytest
import torch
from hydra.utils import instantiate

from kdkit.compose import compose
from kdkit.pipeline import run


def test_default_run_writes_results_for_every_stage(compose_run):
    cfg, results = compose_run()
    out = cfg.paths.output_dir
    assert list(results) == ["teacher", "baseline", "student"]
    for metrics in results.values():
        assert 0.0 <= metrics["test/acc"] <= 1.0
        assert metrics["params"] > 0 and metrics["latency_ms"] > 0
        assert 0.0 <= metrics["val/acc"] <= 1.0  # the last validation, recorded for tuning
    assert results["teacher"]["params"] > results["student"]["params"]
    # conftest: trainer.max_epochs=1 and 2 train batches per epoch
    assert results["baseline"]["fit_steps"] == results["student"]["fit_steps"] == 2
    assert results["teacher"]["fit_steps"] % 2 == 0 and results["teacher"]["fit_steps"] >= 2
    assert json.loads(open(f"{out}/results.json").read()) == results
    assert "distiller" in open(f"{out}/config.yaml").read()


def test_callbacks_none_writes_no_checkpoints(compose_run, tmp_path):
    # Without a configured ModelCheckpoint, Lightning would add its own and save every epoch.
    compose_run("trainer.max_epochs=2")
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_exported_student_loads_into_bare_class_without_teacher(compose_run):
    cfg, _ = compose_run()
    state = torch.load(f"{cfg.paths.output_dir}/export/student.pt", weights_only=True)
    from safetensors.torch import load_file

    same = load_file(f"{cfg.paths.output_dir}/export/student.safetensors")
    assert same.keys() == state.keys() and all(torch.equal(same[k], state[k]) for k in state)
    student = instantiate(cfg.student.model)
    student.load_state_dict(state)  # strict: exactly the student's keys
    teacher_keys = set(instantiate(cfg.teacher.model).state_dict())
    assert teacher_keys.isdisjoint(state) or set(state) == set(student.state_dict())


def test_teacher_checkpoint_is_loaded_not_trained(compose_run, tmp_path):
    cfg = compose(["stages.baseline=false", "stages.student=false", "trainer.max_epochs=1",
                   "callbacks=none", "trainer.enable_progress_bar=false"],
                  output_dir=str(tmp_path / "first"))
    first = run(cfg)
    ckpt = tmp_path / "first" / "teacher.pt"
    assert ckpt.exists()
    cfg2, second = compose_run(f"teacher.ckpt_path={ckpt}", "stages.baseline=false",
                               "stages.student=false")
    # evaluated on the full test set both times with the same weights: identical accuracy
    assert second["teacher"]["test/acc"] == pytest.approx(first["teacher"]["test/acc"])
    assert "fit_seconds" not in second["teacher"] and "fit_steps" not in second["teacher"]


def test_timm_student_export_loads_with_timm_checkpoint_path(compose_run):
    import timm

    name = "test_resnet"
    cfg, results = compose_run("student=timm", f"student.model.name={name}", "+student.model.in_chans=1",
                               "student.normalize=null", "stages.baseline=false")
    path = f"{cfg.paths.output_dir}/export/student.pt"
    model = timm.create_model(name, num_classes=10, in_chans=1, checkpoint_path=path)
    saved = torch.load(path)
    assert set(model.state_dict()) == set(saved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert 0.0 <= results["student"]["test/acc"] <= 1.0


def test_role_optimizer_overrides_task_optimizer_for_that_role_only(tmp_path):
    from kdkit.compose import compose
    from kdkit.pipeline import make_task

    cfg = compose(["experiment=digits_demo", "+student.optimizer.weight_decay=0.123"],
                  output_dir=str(tmp_path))
    student_task = make_task(cfg, student=instantiate(cfg.student.model))
    teacher_task = make_task(cfg, student=instantiate(cfg.teacher.model), role_of_student="teacher",
                             student_cfg=cfg.teacher)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert student_task.optimizer_factory(params).defaults["weight_decay"] == 0.123
    teacher_wd = teacher_task.optimizer_factory(params).defaults["weight_decay"]
    assert teacher_wd == cfg.task.optimizer.weight_decay != 0.123


@pytest.mark.parametrize("overrides, expected", [
    (["distiller=[fitnet]", "distiller.fitnet.student_feature=hiden.0",
      "distiller.fitnet.teacher_feature=layer2"], "'hiden.0' is not a module"),
    (["distiller=[fitnet]", "distiller.fitnet.student_feature=hidden.0",
      "distiller.fitnet.teacher_feature=layer2", "distiller.fitnet.adapter=false"], "student shape"),
    (["teacher.model.num_classes=7"], "7"),
])
def test_student_stage_mistakes_fail_before_the_teacher_trains(tmp_path, overrides, expected):
    from kdkit.errors import KdkitError

    cfg = compose(["trainer.enable_progress_bar=false", "callbacks=none", *overrides],
                  output_dir=str(tmp_path / "run"))
    with pytest.raises(KdkitError, match=expected):
        run(cfg)
    # nothing trained: no teacher weights, no stage logs, no stage results
    assert not (tmp_path / "run" / "teacher.pt").exists()
    assert not (tmp_path / "run" / "logs").exists() and not (tmp_path / "run" / "stages").exists()


@pytest.mark.parametrize("overrides, expected", [
    # a ViT student's token grid against a CNN teacher's map, no adapter allowed: both shapes
    (["experiment=cifar10_deit", "student=vit_tiny", "distiller=[fitnet]", "distiller.fitnet.adapter=false",
      "distiller.fitnet.student_feature=blocks.1", "distiller.fitnet.teacher_feature=layer2"],
     r"student shape \(65, 128\) does not match teacher shape \(32, 16, 16\).*student tokens, teacher a map"),
    # the adapter needs the token side's prefix count: the values that fit are named
    (["experiment=cifar10_deit", "student=vit_tiny", "distiller=[fitnet]",
      "distiller.fitnet.student_feature=blocks.1", "distiller.fitnet.teacher_feature=layer2"],
     r"fitnet.student_prefix_tokens; prefix counts that leave a square grid: \[1\]"),
    # weight inheritance into a student whose head width the teacher's heads cannot give
    (["experiment=cifar10_vit_vit", "student.model.num_heads=4"], "head"),
])
def test_vit_mistakes_fail_before_the_teacher_trains(tmp_path, data_dir, overrides, expected):
    from kdkit.errors import KdkitError

    cfg = compose(["trainer.enable_progress_bar=false", "callbacks=none", "data.train_limit=256",
                   "data.val_size=32", *overrides], output_dir=str(tmp_path / "run"))
    with pytest.raises(KdkitError, match=expected):
        run(cfg)
    assert not (tmp_path / "run" / "teacher.pt").exists()
    assert not (tmp_path / "run" / "logs").exists() and not (tmp_path / "run" / "stages").exists()


def test_the_probe_leaves_the_teacher_trainable_and_in_train_mode(tmp_path):
    from kdkit.pipeline import check_before_training

    cfg = compose(["distiller=[kd,rkd]"], output_dir=str(tmp_path))  # RKD taps the embeddings
    dm = instantiate(cfg.data)
    dm.setup("fit")
    teacher = instantiate(cfg.teacher.model)
    check_before_training(cfg, dm, {"teacher": (teacher, False)}, {"teacher": cfg.teacher})
    assert all(p.requires_grad for p in teacher.parameters())
    assert all(m.training for m in teacher.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())  # taps gone


def test_a_baseline_alone_inherits_from_a_given_teacher(tmp_path, data_dir, capsys):
    """`stages.student=false` with a trained teacher given: the baseline still starts from the
    teacher's weights (student.init). It failed with "this run has no teacher" before, because
    the teacher was only loaded for the teacher and student stages."""
    from tests.conftest import SMOKE

    common = [*SMOKE, "experiment=cifar10_vit_vit", "data.train_limit=256", "data.val_size=32"]
    run(compose([*common, "stages.baseline=false", "stages.student=false"], output_dir=str(tmp_path / "t")))
    ckpt = tmp_path / "t" / "teacher.pt"
    results = run(compose([*common, f"teacher.ckpt_path={ckpt}", "stages.teacher=false", "stages.student=false"],
                          output_dir=str(tmp_path / "b")))
    assert set(results) == {"baseline"}
    assert "student.init: inherited 56 of 56 tensors from teacher blocks [1, 2, 4, 5]" in capsys.readouterr().err
