"""VAEAugment: the editor starts at the VAE's reconstruction and stays within `strength` of the
posterior mean, its step trains the editor alone (the VAE frozen), it climbs the teacher-student
disagreement, the VAE is trained once when missing (without touching the run's random stream)
and loaded after, and a composed run works end to end."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.models.vae import ConvVAE, save_vae
from kdkit.selection.base import StepPlan
from kdkit.selection.vae_augment import LatentAugmentor, VAEAugment
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import BNNet, TinyNet, image_batch
from tests.test_cache import TinyImages


def _vae(seed: int = 0) -> ConvVAE:
    torch.manual_seed(seed)
    return ConvVAE(in_channels=1, latent_channels=2, width=4)


def _policy(tmp_path, **kwargs) -> VAEAugment:
    """A policy whose VAE is already on disk: random weights (the tests are about the editor), its
    decoder's scaled up so that a moved latent changes the image visibly, as a trained one's does."""
    vae = _vae()
    with torch.no_grad():
        vae.decoder[0].weight.mul_(3)
        vae.decoder[-1].weight.mul_(30)
    path = save_vae(vae, tmp_path / "vae.pt")
    policy = VAEAugment(vae=str(path), latent_channels=2, vae_width=4, **kwargs)
    policy.check_data(TinyImages(n=8, batch_size=4))
    return policy


def _task(student=None):
    torch.manual_seed(0)
    task = ClassificationTask(student or TinyNet(), TinyNet(), distillers={}, num_classes=3,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    task.build(image_batch(4))
    return task


def test_the_editor_starts_at_the_vaes_reconstruction_for_any_noise():
    vae = _vae()
    editor = LatentAugmentor(vae, noise_dim=3, strength=0.7, generator=torch.Generator().manual_seed(0))
    images = torch.rand(5, 1, 8, 8)
    reconstruction = vae.decode(vae.encode(images)[0])
    for seed in range(3):
        noise = 10 * torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(editor(images, noise), reconstruction, atol=1e-6)


def test_the_moved_latent_stays_within_strength_of_the_mean_and_reaches_it():
    editor = LatentAugmentor(_vae(), noise_dim=3, strength=0.4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        editor.edit2.weight.fill_(1e3)
        editor.edit2.bias.fill_(-1e3)
    mu, moved = editor.latents(torch.rand(6, 1, 8, 8), torch.randn(6, 3))
    assert moved.shape == mu.shape == (6, 2, 2, 2)
    assert ((moved - mu).abs() <= 0.4 + 1e-6).all()
    assert (moved - mu).abs().max() > 0.99 * 0.4


def test_the_vae_inside_is_frozen_and_stays_in_eval_mode():
    editor = LatentAugmentor(_vae(), generator=torch.Generator().manual_seed(0))
    editor.train()
    assert not editor.vae.training
    assert all(not p.requires_grad for p in editor.vae.parameters())
    assert {n.split(".")[0] for n, p in editor.named_parameters() if p.requires_grad} == {"edit1", "edit2"}


def test_a_step_trains_the_editor_alone(tmp_path):
    task = _task(student=BNNet())
    batch = image_batch(6)
    policy = _policy(tmp_path, lr=1e-2)
    editor = policy.build(batch["image"])
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    student_before = {k: v.clone() for k, v in task.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in task.teacher.model.state_dict().items()}
    out = policy.plan(task, StepPlan(batch))
    after = editor.state_dict()
    assert not torch.equal(after["edit2.weight"], before["edit2.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("vae."))
    assert all(p.grad is None for p in editor.parameters())
    assert all(p.grad is None for p in task.student.parameters())
    assert all(p.grad is None for p in task.teacher.model.parameters())
    assert all(torch.equal(v, task.student.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(v, task.teacher.model.state_dict()[k]) for k, v in teacher_before.items())
    # half the rows are the VAE's decoded images, the others the originals
    changed = (out.batch["image"] != batch["image"]).flatten(1).any(1)
    assert changed.sum().item() == 3
    assert policy.teacher_forwards == 12


def test_the_editor_climbs_the_teacher_student_disagreement(tmp_path):
    task = _task()
    batch = image_batch(8)
    policy = _policy(tmp_path, consistency=0.0, lr=5e-2, strength=2.0, seed=1)  # x1.28 in 15 steps when written
    noise, _ = policy.draws(8, 0, batch["image"].device)

    def disagreement() -> float:
        with torch.no_grad():
            x_hat = policy.augment(batch["image"], noise)
            t = task.teacher.model(x_hat).log_softmax(-1)
            s = task.student(x_hat).log_softmax(-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean").item()

    start = disagreement()
    curve = []
    for _ in range(15):
        policy.plan(task, StepPlan(batch))
        curve.append(disagreement())
    assert curve[-1] > start * 1.2, (start, curve)
    assert sum(b > a for a, b in zip([start, *curve], curve)) >= 10, (start, curve)  # mostly step by step


def test_a_missing_vae_is_trained_once_saved_and_then_loaded(tmp_path, capsys):
    path = tmp_path / "runs" / "vae.pt"
    dm = TinyImages(n=16, batch_size=8)
    torch.manual_seed(123)
    trained = VAEAugment(vae=str(path), pretrain_epochs=2, latent_channels=2, vae_width=4)
    trained.check_data(dm)
    after_training = torch.rand(3)
    assert path.is_file() and len(trained.pretrain_history) == 2
    err = capsys.readouterr().err  # said in lines, since the bar shows on a terminal only
    assert f"no VAE at {path}; training one (2 passes" in err and f"VAE saved to {path}" in err
    from PIL import Image

    with Image.open(path.with_name("vae.pt.png")) as preview:  # 8 images over 8 reconstructions, 8x8 each
        assert preview.size == (8 * 9 + 1, 2 * 9 + 1)
    assert trained.summary()["vae_pretrain_final_loss"] == trained.pretrain_history[-1]
    assert trained.summary()["vae_pretrain_epochs"] == 2
    assert not torch.equal(trained.vae.encoder[0].weight, _vae_like(trained, seed=0).encoder[0].weight)

    torch.manual_seed(123)
    loaded = VAEAugment(vae=str(path), pretrain_epochs=2, latent_channels=2, vae_width=4)
    loaded.check_data(dm)
    after_loading = torch.rand(3)
    assert loaded.pretrain_history == []
    assert loaded.summary()["vae_pretrain_final_loss"] == trained.pretrain_history[-1]  # from <vae>.json
    assert all(torch.equal(a, b) for a, b in zip(trained.vae.state_dict().values(), loaded.vae.state_dict().values()))
    # training the VAE drew from its own random stream: the run's numbers are the same either way
    assert torch.equal(after_training, after_loading)


def _vae_like(policy, seed):
    torch.manual_seed(seed)
    return ConvVAE(1, policy.latent_channels, policy.vae_width)


def test_the_same_seed_trains_the_same_vae(tmp_path):
    dm = TinyImages(n=16, batch_size=8)
    vaes = []
    for name in ("a.pt", "b.pt"):
        policy = VAEAugment(vae=str(tmp_path / name), pretrain_epochs=1, latent_channels=2, vae_width=4)
        policy.check_data(dm)
        vaes.append(policy.vae)
    assert all(torch.equal(a, b) for a, b in zip(vaes[0].state_dict().values(), vaes[1].state_dict().values()))


def test_no_file_and_no_training_or_another_rank_is_an_error_naming_the_file(tmp_path, monkeypatch):
    dm = TinyImages(n=16, batch_size=8)
    with pytest.raises(KdkitError, match=r"vae_augment.vae=.*nothing.pt: no such file, and pretrain_epochs=0"):
        VAEAugment(vae=str(tmp_path / "nothing.pt"), pretrain_epochs=0).check_data(dm)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(KdkitError, match="no such file on this rank; rank 0 trains it"):
        VAEAugment(vae=str(tmp_path / "nothing.pt")).check_data(dm)
    assert not (tmp_path / "nothing.pt").exists()


def test_images_the_vae_cannot_read_are_refused_before_training(tmp_path):
    class Odd(TinyImages):
        def example_batch(self, n=None):
            return {"image": torch.rand(4, 1, 6, 6), "label": torch.zeros(4, dtype=torch.long)}

    with pytest.raises(KdkitError, match=r"selection.vae_augment: the VAE needs .*divisible by 4"):
        VAEAugment(vae=str(tmp_path / "v.pt")).check_data(Odd())
    assert not (tmp_path / "v.pt").exists()


@pytest.mark.parametrize("knob,value", [("vae", ""), ("pretrain_epochs", -1), ("pretrain_lr", 0.0),
                                        ("latent_channels", 0), ("beta", -1.0), ("recon_sigma", 0.0),
                                        ("strength", 0.0), ("fraction", 1.5)])
def test_bad_knobs_are_refused_by_name(knob, value):
    kwargs = {"vae": "v.pt", knob: value}
    with pytest.raises(KdkitError, match=f"selection.vae_augment.{knob}="):
        VAEAugment(**kwargs)


def test_a_composed_run_trains_the_vae_in_its_run_dir_and_counts_teacher_forwards(compose_run):
    from pathlib import Path

    cfg, results = compose_run("stages.baseline=false", "selection=[vae_augment]", "data.batch_size=16",
                               "selection.vae_augment.pretrain_epochs=1")
    student = results["student"]
    assert student["selection/vae_augment/teacher_forwards"] == 2 * 2 * 16  # 2 smoke batches, 2 passes a row
    assert student["selection/vae_augment/vae"] == str(Path(cfg.paths.output_dir) / "vae.pt")
    assert (Path(cfg.paths.output_dir) / "vae.pt").is_file()
    assert student["selection/vae_augment/vae_pretrain_epochs"] == 1
    assert math.isfinite(student["selection/vae_augment/vae_pretrain_final_loss"])


@pytest.mark.ddp
def test_under_ddp_every_rank_loads_the_vae_and_keeps_the_same_editor(tmp_path):
    import json

    import torch.multiprocessing as mp

    from tests.selection.test_learned_augment import WORLD, _ddp_worker, _free_port

    vae = save_vae(_vae(), tmp_path / "vae.pt")
    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path), str(vae)), nprocs=WORLD, join=True,
                       start_method="fork")
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank in facts:
        assert rank["augmentor_equal_across_ranks"] and rank["student_equal_across_ranks"]
        assert rank["augmentor_trained"]
        assert rank["teacher_forwards"] == 2 * 2 * 8
        assert rank["job_teacher_forwards"] == WORLD * 2 * 2 * 8
