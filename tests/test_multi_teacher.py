"""Several teachers through the runner: config, routing, stages, fail-fast, per-teacher
pipelines and caches, born-again generations, the weaker-teacher warning."""

from __future__ import annotations

import functools
import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from kdkit.compose import compose
from kdkit.errors import KdkitError
from kdkit.pipeline import run
from kdkit.tasks.classification import ClassificationTask
from kdkit.teachers import results_key, stage_name, teacher_configs

from .helpers import TinyNet, image_batch

FAST = ["trainer.enable_progress_bar=false", "callbacks=none", "logger=none", "trainer.max_epochs=1"]
SECOND = ["+teacher@teachers.wide=digits_cnn", "teachers.wide.model.channels=[8,16,16]"]


def test_teacher_configs_shorthand_and_named():
    cfg = compose(SECOND)
    assert list(teacher_configs(cfg)) == ["teacher", "wide"]
    assert list(teacher_configs(compose(["~teacher", *SECOND]))) == ["wide"]
    assert (stage_name("teacher"), results_key("teacher")) == ("teacher", "teacher")
    assert (stage_name("wide"), results_key("wide")) == ("teacher-wide", "teacher/wide")
    bad = OmegaConf.create({"teacher": None, "teachers": {"bad-name": {"model": {}}}})
    with pytest.raises(KdkitError, match="Python identifier"):
        teacher_configs(bad)
    with pytest.raises(KdkitError, match="has no model"):
        teacher_configs(OmegaConf.create({"teacher": None, "teachers": {"x": {"ckpt_path": None}}}))
    with pytest.raises(KdkitError, match="collides"):
        teacher_configs(OmegaConf.create({"teacher": {"model": {}}, "teachers": {"teacher": {"model": {}}}}))


@pytest.mark.parametrize("overrides, expected", [
    ([], r"reads one teacher but this run has 2 \(teacher, wide\): set distiller.kd.teacher"),
    (["distiller.kd.teacher=nope"], r"reads teacher 'nope', which this run does not have; its teachers: teacher, wide"),
    (["distiller=[ensemble_kd]", "distiller.ensemble_kd.teachers=[wide,nope]"], r"reads teachers \['nope'\]"),
    (["distiller=[]"], "the student stage has no distillers"),
    (["distiller.kd.temperature=0"], "distiller.kd.temperature=0 must be a finite number > 0"),
    (["teachers.wide.model.num_classes=7", "distiller.kd.teacher=teacher"], "model predicts 7 classes"),
    (["distiller=[fitnet]", "distiller.fitnet.teacher=wide", "distiller.fitnet.student_feature=hidden.0",
      "distiller.fitnet.teacher_feature=no_such.layer"],
     "'no_such.layer' is not a module"),
])
def test_teacher_mistakes_fail_in_seconds_before_any_stage(tmp_path, overrides, expected):
    cfg = compose([*FAST, *SECOND, *overrides], output_dir=str(tmp_path / "run"))
    start = time.perf_counter()
    with pytest.raises(KdkitError, match=expected):
        run(cfg)
    assert time.perf_counter() - start < 30
    run_dir = tmp_path / "run"
    written = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert set(written) <= {"config.yaml", "environment.json"}  # no teacher weights, checkpoints, logs or stage results


def test_two_teachers_each_get_a_stage_and_a_results_entry(tmp_path):
    out = tmp_path / "run"
    cfg = compose([*FAST, *SECOND, "distiller=[ensemble_kd,kd]", "distiller.kd.teacher=wide"], output_dir=str(out))
    results = run(cfg)
    assert list(results) == ["teacher", "teacher/wide", "baseline", "student"]
    assert (out / "teacher.pt").exists() and (out / "teacher-wide.pt").exists()
    assert json.loads((out / "stages" / "teacher-wide.json").read_text())["test/acc"] == results["teacher/wide"]["test/acc"]
    wide = torch.load(out / "teacher-wide.pt")
    first_conv = next(v for v in wide.values() if v.dim() == 4)
    assert first_conv.shape[0] == 8  # the wide teacher's own architecture (channels 8-16-16)
    # a second run in the same directory finds every stage done, the teachers' weights included
    again = run(compose([*FAST, *SECOND, "distiller=[ensemble_kd,kd]", "distiller.kd.teacher=wide",
                         "ckpt_path=last"], output_dir=str(out)))
    assert again == json.loads((out / "results.json").read_text())
    assert again["student"]["test/acc"] == results["student"]["test/acc"]


def test_born_again_generations(tmp_path):
    out = tmp_path / "run"
    results = run(compose([*FAST, "stages.generations=3", "stages.teacher=false"], output_dir=str(out)))
    assert list(results) == ["baseline", "student", "student/gen2", "student/gen3"]
    assert (out / "export" / "gen2" / "student.pt").exists() and (out / "export" / "gen3" / "student.pt").exists()
    gen1, gen2 = torch.load(out / "export" / "student.pt"), torch.load(out / "export" / "gen2" / "student.pt")
    assert any(not torch.equal(gen1[k], gen2[k]) for k in gen1)
    with pytest.raises(KdkitError, match="generations"):
        run(compose([*FAST, "stages.generations=0"], output_dir=str(tmp_path / "bad")))
    with pytest.raises(KdkitError, match="needs several teachers, but a born-again generation has one"):
        run(compose([*FAST, *SECOND, "stages.generations=2", "distiller=[ca_mkd]"], output_dir=str(tmp_path / "ca")))
    assert not (tmp_path / "ca" / "stages").exists()  # refused before any stage


def test_generation_k_is_taught_by_generation_k_minus_1(tmp_path, monkeypatch):
    import kdkit.pipeline as pipeline

    seen = []
    real = pipeline.make_task

    def spy(cfg, student, teachers=None, **kwargs):
        if teachers and not kwargs.get("probe"):
            seen.append({name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in teachers.items()})
        return real(cfg, student, teachers, **kwargs)

    monkeypatch.setattr(pipeline, "make_task", spy)
    out = tmp_path / "run"
    run(compose([*FAST, "stages.generations=2", "stages.teacher=false", "stages.baseline=false"], output_dir=str(out)))
    assert list(seen[-1]) == ["gen1"]
    gen1 = torch.load(out / "export" / "student.pt")
    assert all(torch.equal(seen[-1]["gen1"][k], v) for k, v in gen1.items())


def test_a_teacher_weaker_than_the_baseline_is_reported(tmp_path, capfd):
    # pretrained=true without weights: an untrained network evaluated as if it were trained
    cfg = compose([*FAST, "teacher.pretrained=true", "trainer.max_epochs=2"], output_dir=str(tmp_path))
    results = run(cfg)
    assert results["teacher"]["val/acc"] < results["baseline"]["val/acc"]
    assert results["teacher"]["weaker_than_baseline"] is True
    assert json.loads((tmp_path / "results.json").read_text())["teacher"]["weaker_than_baseline"] is True
    assert "warning: teacher scores val/acc=" in capfd.readouterr().err


def test_a_trained_teacher_is_not_reported_weaker(tmp_path, capfd):
    results = run(compose([*FAST, "trainer.max_epochs=2"], output_dir=str(tmp_path)))
    assert results["teacher"]["weaker_than_baseline"] is False
    assert "below the student trained alone" not in capfd.readouterr().err


# ---- the task with several teachers ---------------------------------------------------------
class Recorder(TinyNet):
    """TinyNet that records the input it was given."""

    def forward(self, x):
        self.seen = x.detach().clone()
        return super().forward(x)


def two_teacher_task(**kwargs) -> ClassificationTask:
    from kdkit.distillers.ensemble_kd import EnsembleKD

    torch.manual_seed(0)
    return ClassificationTask(TinyNet(4), teachers={"a": Recorder(6), "b": Recorder(8)},
                              distillers={"ens": EnsembleKD()}, num_classes=3, mean=(0.5,), std=(0.25,),
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1), **kwargs)


def test_each_teacher_has_its_own_input_pipeline():
    task = two_teacher_task(inputs={"a": {"normalize": {"mean": [0.0], "std": [1.0]}, "image_size": 16}})
    batch = image_batch(size=8)
    task.losses(batch)
    a, b = task.teachers["a"].model.seen, task.teachers["b"].model.seen
    assert a.shape[-2:] == (16, 16) and b.shape[-2:] == (8, 8)
    assert torch.allclose(b, (batch["image"] - 0.5) / 0.25)  # b: the data's statistics
    expected = torch.nn.functional.interpolate(batch["image"], size=(16, 16), mode="bilinear",
                                               antialias=True, align_corners=False)
    assert torch.allclose(a, expected, atol=1e-6)  # a: its own size and statistics


def test_each_teacher_is_frozen_and_outside_the_checkpoint():
    task = two_teacher_task()
    task.train()
    for frozen in task.teachers.values():
        assert not frozen.training and not any(p.requires_grad for p in frozen.model.parameters())
    assert not any(k.startswith(("teacher", "_teacher")) or ".seen" in k for k in task.state_dict())
    assert {id(p) for p in task.parameters()}.isdisjoint(
        id(p) for t in task.teachers.values() for p in t.model.parameters())


def test_each_teacher_has_its_own_cache_and_fingerprint(tmp_path):
    from kdkit.cache import TeacherCache, cache_fingerprint, describe_teacher_input

    caches = {name: TeacherCache(6, f"fp-{name}") for name in ("a", "b")}
    task = two_teacher_task(teacher_cache=caches)
    batch = image_batch()
    task.losses(batch)
    assert all(c.stores == 1 for c in caches.values())
    task.losses(batch)
    assert all(c.hits == 1 for c in caches.values())
    cfg = compose(SECOND)

    class Data:
        teacher_input_fingerprint = None

    one = cache_fingerprint(task.teachers["a"].model, describe_teacher_input(cfg, Data(), cfg.teacher))
    other_weights = cache_fingerprint(task.teachers["b"].model, describe_teacher_input(cfg, Data(), cfg.teacher))
    other_model = cache_fingerprint(task.teachers["a"].model, describe_teacher_input(cfg, Data(), cfg.teachers.wide))
    other_input = cache_fingerprint(task.teachers["a"].model, describe_teacher_input(
        cfg, Data(), OmegaConf.merge(OmegaConf.to_container(cfg.teacher, resolve=True), {"image_size": 16})))
    assert len({one, other_weights, other_input, other_model}) == 4


def test_per_teacher_options_name_known_teachers():
    with pytest.raises(KdkitError, match="unknown teachers"):
        two_teacher_task(teacher_precision={"c": "bf16"})
    with pytest.raises(KdkitError, match="one value for 2 teachers"):
        two_teacher_task(teacher_precision="bf16")
    with pytest.raises(KdkitError, match="inputs for unknown models"):
        two_teacher_task(inputs={"c": {}})
    task = two_teacher_task(teacher_precision={"a": "bf16"})
    assert task.teachers["a"].dtype == torch.bfloat16 and task.teachers["b"].dtype is None


def test_the_same_distiller_twice_on_two_teachers(tmp_path):
    from hydra.utils import instantiate

    from kdkit.pipeline import make_task
    from kdkit.teachers import make_distillers

    cfg = compose([*SECOND, "distiller.kd.teacher=teacher",
                   "+distiller.kd_wide={_target_:kdkit.distillers.kd.KD,teacher:wide,temperature:2}"],
                  output_dir=str(tmp_path))
    tcfgs = teacher_configs(cfg)
    teachers = {name: instantiate(c.model) for name, c in tcfgs.items()}
    task = make_task(cfg, instantiate(cfg.student.model), teachers, make_distillers(cfg), teacher_cfgs=tcfgs)
    assert task.routes == {"kd": ["teacher"], "kd_wide": ["wide"]}
    assert task.distillers["kd_wide"].temperature == 2.0
    dm = instantiate(cfg.data)
    dm.setup("fit")
    task.probe(dm)
    losses, _ = task.losses(dm.example_batch())
    assert set(losses) == {"task", "kd", "kd_wide"} and all(torch.isfinite(v) for v in losses.values())
