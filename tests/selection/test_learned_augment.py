"""LearnedAugment: the augmentor starts at the identity and stays within `strength` of it, its
step touches nothing but itself, it climbs the teacher-student disagreement, the plan warps exactly
`fraction` of the rows with matching teacher outputs, its state resumes, and under DDP every rank
keeps the same augmentor."""

import csv
import functools
import io
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.selection.base import StepPlan
from kdkit.selection.learned_augment import (
    AffineAugmentor,
    LearnedAugment,
    affine_theta,
    merge_rows,
    warp,
)
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import BNNet, TinyNet, image_batch


def _task(student=None):
    torch.manual_seed(0)
    teacher = TinyNet()
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    task = ClassificationTask(student or TinyNet(), teacher, distillers={}, num_classes=3,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    task.build(image_batch(4))
    calls.clear()
    return task, calls


def _disagreement(task, images):
    """mean KL(teacher || student) on ``images``, from the models themselves."""
    with torch.no_grad():
        t = task.teacher.model(images).log_softmax(-1)
        s = task.student(images).log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean").item()


def test_the_augmentor_starts_at_the_identity_for_any_noise():
    images = torch.rand(5, 3, 12, 10)
    augmentor = AffineAugmentor(3, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        noise = 10 * torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(augmentor.theta(images, noise), affine_theta(torch.zeros(5, 6), 0.5))
        assert torch.allclose(augmentor(images, noise), images, atol=1e-6)


def test_theta_stays_within_strength_of_the_identity_even_for_huge_offsets():
    delta = 1e6 * torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for strength in (0.1, 0.5, 2.0):
        theta = affine_theta(delta, strength)
        assert theta.shape == (64, 2, 3)
        assert ((theta - identity).abs() <= strength + 1e-6).all()
        assert (theta - identity).abs().max() > 0.99 * strength  # and the bound is reached
    augmentor = AffineAugmentor(1, strength=0.3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in augmentor.parameters():
            p.fill_(1e4)
    theta = augmentor.theta(torch.rand(4, 1, 8, 8), torch.randn(4, 8))
    assert ((theta - identity).abs() <= 0.3 + 1e-6).all()


def test_warp_is_a_real_affine_resampling():
    images = torch.arange(16.0).view(1, 1, 4, 4)
    mirror = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert torch.allclose(warp(images, mirror), images.flip(-1), atol=1e-5)
    shift = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # one pixel (of 4) to the left
    want = torch.cat([images[..., 1:], torch.zeros(1, 1, 4, 1)], -1)
    assert torch.allclose(warp(images, shift), want, atol=1e-5)


def test_the_initial_weights_come_from_the_seed_not_the_global_rng():
    images = image_batch(4)["image"]
    torch.manual_seed(1)
    a = LearnedAugment(seed=3).build(images)
    torch.manual_seed(2)
    b = LearnedAugment(seed=3).build(images)
    c = LearnedAugment(seed=4).build(images)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_a_step_trains_the_augmentor_alone():
    task, _ = _task(student=BNNet())
    batch = image_batch(6)
    teacher_before = {k: v.clone() for k, v in task.teacher.model.state_dict().items()}
    buffers_before = {k: v.clone() for k, v in task.student.named_buffers()}
    student_before = {k: v.clone() for k, v in task.student.named_parameters()}
    policy = LearnedAugment(lr=1e-2)
    augmentor = policy.build(batch["image"])
    augmentor_before = {k: v.clone() for k, v in augmentor.state_dict().items()}
    policy.plan(task, StepPlan(batch))
    assert all(p.grad is None for p in task.student.parameters())
    assert all(p.grad is None for p in task.teacher.model.parameters())
    assert all(torch.equal(v, task.teacher.model.state_dict()[k]) for k, v in teacher_before.items())
    assert all(torch.equal(v, dict(task.student.named_buffers())[k]) for k, v in buffers_before.items())
    assert all(torch.equal(v, dict(task.student.named_parameters())[k]) for k, v in student_before.items())
    after = augmentor.state_dict()
    assert not torch.equal(after["head.weight"], augmentor_before["head.weight"])
    assert all(p.grad is None for p in augmentor.parameters())  # the optimizer cleared them
    assert not task._taps["teacher"].pop() and not task._taps["student"].pop()  # no feature left behind
    stats = policy.step_stats()
    assert set(stats) == {"disagreement", "teacher_shift"}
    assert not any(v.requires_grad for v in stats.values())


def test_the_augmentor_climbs_the_teacher_student_disagreement():
    task, _ = _task()
    batch = image_batch(8, size=16)
    policy = LearnedAugment(consistency=0.0, lr=5e-2, strength=1.0, seed=1)
    noise, _ = policy.draws(8, 0, batch["image"].device)  # no trainer: the step stays 0, so does the noise
    # At the identity the sample points sit on pixel centres, where bilinear sampling has one-sided
    # gradients; measure from a point off the identity.
    for _ in range(2):
        policy.plan(task, StepPlan(batch))
    start = _disagreement(task, policy.augment(batch["image"], noise).detach())
    curve = []
    for _ in range(15):
        policy.plan(task, StepPlan(batch))
        curve.append(_disagreement(task, policy.augment(batch["image"], noise).detach()))
    assert curve[-1] > start * 1.2, (start, curve)  # x1.5 when written
    assert sum(b > a for a, b in zip([start, *curve], curve)) >= 10, (start, curve)  # mostly step by step
    assert abs(policy.step_stats()["disagreement"].item() - curve[-2]) < 1e-5  # before the last step


def test_the_plan_warps_a_fraction_of_the_rows_and_hands_on_matching_teacher_outputs():
    task, calls = _task()
    batch = image_batch(10)
    policy = LearnedAugment(fraction=0.3, lr=1e-2)
    for _ in range(3):  # off the identity, so warped rows differ from the plain ones
        plan = policy.plan(task, StepPlan(batch))
    assert calls == [10, 10] * 3  # per step: the teacher on x (no grad), then on x_hat (with autograd)
    assert policy.summary() == {"fraction": 0.3, "strength": 0.5, "teacher_forwards": 3 * 2 * 10}
    changed = (plan.batch["image"] != batch["image"]).flatten(1).any(1)
    assert changed.sum().item() == round(0.3 * 10)
    _, rows = policy.draws(10, 0, batch["image"].device)
    assert torch.equal(changed.nonzero().flatten(), rows)
    assert torch.equal(plan.batch["label"], batch["label"]) and torch.equal(plan.batch["index"], batch["index"])
    assert plan.distill_rows is None and set(plan.teacher) == {"teacher"}
    with torch.no_grad():
        fresh = task.teacher.model(plan.batch["image"])
    assert torch.allclose(plan.teacher["teacher"].logits, fresh, atol=1e-5)
    assert not plan.teacher["teacher"].logits.requires_grad and not plan.batch["image"].requires_grad


def test_the_whole_batch_is_warped_at_fraction_one():
    task, _ = _task()
    batch = image_batch(5)
    policy = LearnedAugment(fraction=1.0, lr=1e-2)
    for _ in range(2):
        plan = policy.plan(task, StepPlan(batch))
    assert (plan.batch["image"] != batch["image"]).flatten(1).any(1).all()


def test_each_step_and_each_rank_draw_their_own_noise_and_rows(monkeypatch):
    import kdkit.selection.learned_augment as module

    policy = LearnedAugment(fraction=0.5)
    noise, rows = policy.draws(8, 3, "cpu")
    assert noise.shape == (8, 8) and rows.tolist() == sorted(rows.tolist()) and len(rows) == 4
    assert torch.equal(noise, policy.draws(8, 3, "cpu")[0])  # deterministic (a resume draws the same)
    assert not torch.equal(noise, policy.draws(8, 4, "cpu")[0])
    monkeypatch.setattr(module, "world", lambda: (1, 2))
    assert not torch.equal(noise, policy.draws(8, 3, "cpu")[0])


def test_merge_rows_takes_the_augmented_rows_and_keeps_scalars():
    from kdkit.outputs import Outputs

    plain = Outputs(logits=torch.zeros(4, 2), features={"scale": torch.tensor(3.0)})
    hat = Outputs(logits=torch.ones(4, 2), features={"scale": torch.tensor(5.0)})
    merged = merge_rows(plain, hat, torch.tensor([1, 3]))
    assert merged.logits[:, 0].tolist() == [0, 1, 0, 1] and merged.features["scale"].item() == 3.0


def test_its_state_resumes_the_augmentor_and_its_optimizer():
    task, _ = _task()
    batch = image_batch(6)
    policy = LearnedAugment(lr=1e-2, seed=5)
    for _ in range(3):
        policy.plan(task, StepPlan(batch))
    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)  # as in a Lightning checkpoint
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = LearnedAugment(lr=1e-2, seed=5)
    resumed.load_state_dict(state)  # before the augmentor exists: kept until it is built
    assert resumed.state_dict()["teacher_forwards"] == 3 * 2 * 6
    assert torch.equal(resumed.state_dict()["augmentor"]["head.weight"], state["augmentor"]["head.weight"])
    for _ in range(2):  # the same warps, and the same Adam steps (moments and step count restored)
        a, b = policy.plan(task, StepPlan(batch)), resumed.plan(task, StepPlan(batch))
        assert torch.equal(a.batch["image"], b.batch["image"])
        assert torch.equal(a.teacher["teacher"].logits, b.teacher["teacher"].logits)
    assert all(torch.equal(x, y) for x, y in zip(policy.augmentor.state_dict().values(),
                                                 resumed.augmentor.state_dict().values()))
    assert resumed.summary()["teacher_forwards"] == policy.summary()["teacher_forwards"] == 5 * 2 * 6
    fresh = LearnedAugment(lr=1e-2, seed=5)
    fresh.plan(task, StepPlan(batch))
    fresh.load_state_dict(policy.state_dict())  # once built: applied at once
    noise, _ = policy.draws(6, 0, batch["image"].device)
    assert torch.equal(fresh.augment(batch["image"], noise), policy.augment(batch["image"], noise))


def test_it_must_come_first_and_needs_images():
    from kdkit.outputs import Outputs

    task, _ = _task()
    batch = image_batch(4)
    with pytest.raises(KdkitError, match="must come first"):
        LearnedAugment().plan(task, StepPlan(batch, distill_rows=torch.tensor([0, 1])))
    with pytest.raises(KdkitError, match="must come first"):
        LearnedAugment().plan(task, StepPlan(batch, {"teacher": Outputs(logits=torch.zeros(4, 3))}))
    with pytest.raises(KdkitError, match="'image'"):
        LearnedAugment().plan(task, StepPlan({"input_ids": torch.zeros(4, 5, dtype=torch.long)}))


@pytest.mark.parametrize("knob, value", [("fraction", 0.0), ("fraction", 1.5), ("strength", 0.0),
                                         ("lr", 0.0), ("lr", -1e-3), ("temperature", 0.0),
                                         ("consistency", -0.1)])
def test_bad_knobs_are_refused_by_name(knob, value):
    with pytest.raises(KdkitError, match=rf"selection\.learned_augment\.{knob}="):
        LearnedAugment(**{knob: value})


def test_a_composed_run_counts_its_teacher_forwards(compose_run):
    cfg, results = compose_run("stages.baseline=false", "selection=[learned_augment]", "data.batch_size=16",
                               "trainer.log_every_n_steps=1")
    student = results["student"]
    # 2 smoke batches of 16 rows, each row through the teacher twice (on x_hat and on x)
    assert student["selection/learned_augment/teacher_forwards"] == 2 * 2 * 16
    assert student["selection/learned_augment/fraction"] == 0.5
    with open(Path(cfg.paths.output_dir) / "logs" / "student" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("disagreement", "teacher_shift"):
        values = [float(r[f"train/selection/learned_augment/{key}"]) for r in rows
                  if r.get(f"train/selection/learned_augment/{key}")]
        assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values), (key, values)


# ---- DDP: two gloo ranks through Lightning, each on its own rows -------------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str, vae: str | None = None) -> None:
    """One rank of a 2-rank fit with ``LearnedAugment`` (or ``VAEAugment`` around the VAE file
    ``vae``), writing what the test checks to ``rank<r>.json``."""
    import torch.distributed as dist
    from hydra.utils import instantiate

    from kdkit.compose import compose
    from kdkit.distillers.fitnet import FitNet
    from kdkit.distillers.kd import KD
    from tests.test_cache import TinyImages

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank),
                      NODE_RANK="0", WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if vae is None:
        policy = LearnedAugment(lr=1e-2)
    else:
        from kdkit.selection.vae_augment import VAEAugment

        policy = VAEAugment(vae=vae, pretrain_epochs=0, latent_channels=2, vae_width=4, lr=1e-2)
    distillers = {"kd": KD(temperature=2.0),  # fitnet: the teacher's tapped features go through the plan too
                  "fitnet": FitNet(weight=1.0, student_feature="conv", teacher_feature="conv")}
    task = ClassificationTask(TinyNet(width=4), TinyNet(width=4), distillers=distillers, num_classes=3,
                              mean=(0.5,), std=(0.25,), selection={policy.name: policy},
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    cfg = compose(["trainer=ddp", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, max_epochs=1,
                          limit_train_batches=2, limit_val_batches=0)
    trainer.fit(task, datamodule=TinyImages(n=32, batch_size=8))
    flat = lambda module: torch.cat([p.detach().flatten() for p in module.parameters()])
    facts = {"teacher_forwards": policy.teacher_forwards,
             "job_teacher_forwards": task.fit_summary()[f"selection/{policy.name}/teacher_forwards"]}
    for part, module in (("augmentor", policy.augmentor), ("student", task.student)):
        mine = flat(module)
        everyone = [torch.empty_like(mine) for _ in range(WORLD)]
        dist.all_gather(everyone, mine)
        facts[f"{part}_equal_across_ranks"] = all(torch.equal(everyone[0], x) for x in everyone)
    last_layer = policy.trainable()[-2]  # zero at the start (head / edit2 weight)
    facts["augmentor_trained"] = last_layer.abs().sum().item() > 0
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)


@pytest.mark.ddp
def test_under_ddp_every_rank_keeps_the_same_augmentor(tmp_path):
    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="fork")
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank in facts:
        assert rank["augmentor_equal_across_ranks"] and rank["student_equal_across_ranks"]
        assert rank["augmentor_trained"]
        assert rank["teacher_forwards"] == 2 * 2 * 8  # its own 2 batches of 8 rows, twice each
        assert rank["job_teacher_forwards"] == WORLD * 2 * 2 * 8  # results.json: both ranks' rows
