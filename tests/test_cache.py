"""Teacher-output cache: equal to the live teacher, no teacher forward after the first epoch,
keyed by teacher weights and input pipeline, refused on random data, persistent on disk, top-k."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdkit.datamodules.base import ImageDataModule, TensorImageDataset
from kdkit.cache import TeacherCache, build_teacher_cache, topk_compress, topk_restore
from kdkit.distillers.fitnet import FitNet
from kdkit.distillers.kd import KD, kd_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import TinyNet


class TinyImages(ImageDataModule):
    """``n`` random 1x8x8 images in memory, 3 classes; ``augment`` flips them at random."""

    def __init__(self, n: int = 24, n_eval: int = 24, batch_size: int = 8, augment: bool = False,
                 seed: int = 0, **kwargs):
        super().__init__(batch_size=batch_size, seed=seed, num_classes=3, mean=(0.5,), std=(0.25,), **kwargs)
        self.n, self.n_eval, self.augment = n, n_eval, augment

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(1234)
        images = torch.rand(self.n + self.n_eval, 1, 8, 8, generator=g)
        labels = torch.randint(0, 3, (self.n + self.n_eval,), generator=g)
        flip = (lambda x: x.flip(-1) if torch.rand(()) < 0.5 else x) if self.augment else None
        self.train_set = TensorImageDataset(images[: self.n], labels[: self.n], flip)
        self.plain_train_set = TensorImageDataset(images[: self.n], labels[: self.n])
        self.val_set = self.test_set = TensorImageDataset(images[self.n :], labels[self.n :])
        self.classes = ["a", "b", "c"]


def cache_cfg(tmp_path, **teacher):
    return OmegaConf.create({
        "teacher": {"cache": True, "normalize": None, "precision": None, **teacher},
        "data": {"_target_": "TinyImages", "batch_size": 8},
        "task": {"_target_": "ClassificationTask", "mean": [0.5], "std": [0.25]},
        "paths": {"cache_dir": str(tmp_path / "cache")},
    })


def make_task(teacher, cache, fitnet: bool = True):
    torch.manual_seed(0)
    distillers = {"kd": KD(temperature=2.0)}
    if fitnet:  # a tapped teacher feature is cached too
        distillers["fitnet"] = FitNet(weight=1.0, student_feature="conv", teacher_feature="conv")
    opt = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    return ClassificationTask(TinyNet(width=4), teacher, distillers=distillers, num_classes=3,
                              mean=(0.5,), std=(0.25,), optimizer=opt, teacher_cache=cache)


def fit(task, dm, epochs: int) -> None:
    L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0).fit(task, datamodule=dm)


def count_forwards(model) -> list:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def live(task, batch) -> Outputs:
    """Teacher outputs from a forward (no cache), as the task computes them."""
    with torch.no_grad():
        return task.teacher_outputs(batch)


def test_second_epoch_runs_no_teacher_forward_and_cached_equals_live(tmp_path):
    dm = TinyImages()
    teacher = TinyNet(width=8)
    cache = build_teacher_cache(cache_cfg(tmp_path), teacher, dm)
    assert dm.fixed_shards  # under DDP each rank would keep the shard it caches
    task = make_task(teacher, cache)
    calls = count_forwards(teacher)
    fit(task, dm, epochs=1)
    first = len(calls)
    assert first == 1 + 3  # the probe forward (no_grad, bypasses the cache) + 24 / 8 batches
    assert (cache.stores, cache.hits) == (3, 0)
    fit(task, dm, epochs=2)  # a fresh trainer: one more probe, then 2 epochs from the cache
    assert len(calls) - first == 0  # the probe is skipped: task already built
    assert cache.hits == 6 and cache.stores == 3

    batch = dm.example_batch(n=24)
    with torch.enable_grad():
        cached = cache.lookup(batch["index"], torch.device("cpu"))
    fresh = live(task, batch)
    assert set(cached.flat()) == set(fresh.flat()) == {"logits", "embedding", "features.conv"}
    for name, value in fresh.flat().items():
        assert cached.flat()[name].dtype == value.dtype
        # the cache was filled from batches of 8, the fresh forward runs on all 24 at once: BLAS
        # may block the two shapes differently (seen: 3e-8 on an AVX-512 CPU, 0 on an AVX2 one)
        torch.testing.assert_close(cached.flat()[name], value, rtol=1e-6, atol=1e-6)


def test_partially_cached_batch_is_a_miss_and_no_grad_bypasses(tmp_path):
    cache = TeacherCache(10, "fp")
    out = Outputs(logits=torch.randn(4, 3))
    cache.store(torch.tensor([0, 1, 2, 3]), out)
    assert cache.lookup(torch.tensor([2, 3, 4]), "cpu") is None  # 4 was never stored
    torch.testing.assert_close(cache.lookup(torch.tensor([3, 1]), "cpu").logits, out.logits[[3, 1]])
    with torch.no_grad():  # probe and evaluation forwards never read nor write the cache
        assert cache.lookup(torch.tensor([0]), "cpu") is None
        cache.store(torch.tensor([5]), Outputs(logits=torch.randn(1, 3)))
    assert cache.lookup(torch.tensor([5]), "cpu") is None
    with pytest.raises(KdkitError, match="outside 0..9"):
        cache.store(torch.tensor([10]), Outputs(logits=torch.randn(1, 3)))


def test_half_precision_storage_is_cast_back(tmp_path):
    for dtype in (torch.float16, torch.bfloat16):
        for mode in ("memory", "disk"):
            cache = TeacherCache(8, "fp", mode=mode, directory=tmp_path / mode, dtype=dtype)
            logits = torch.randn(8, 5) * 3
            cache.store(torch.arange(8), Outputs(logits=logits))
            got = cache.lookup(torch.arange(8), "cpu").logits
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, logits.to(dtype).float(), rtol=0, atol=0)


def test_fingerprint_changes_with_teacher_weights_and_input_pipeline(tmp_path):
    dm = TinyImages()
    teacher = TinyNet(width=8)
    base = build_teacher_cache(cache_cfg(tmp_path), teacher, dm).fingerprint
    assert build_teacher_cache(cache_cfg(tmp_path), teacher, dm).fingerprint == base
    changed = cache_cfg(tmp_path, normalize={"mean": [0.4], "std": [0.2]})
    assert build_teacher_cache(changed, teacher, dm).fingerprint != base
    half = cache_cfg(tmp_path, cache_dtype="float16")  # stored values differ: another key
    assert build_teacher_cache(half, teacher, dm).fingerprint != base
    loader_only = cache_cfg(tmp_path)
    loader_only.data.batch_size = 64  # batching never changes what the teacher sees
    assert build_teacher_cache(loader_only, teacher, dm).fingerprint == base
    with torch.no_grad():
        teacher.fc.bias[0] += 1e-3
    assert build_teacher_cache(cache_cfg(tmp_path), teacher, dm).fingerprint != base


def test_stale_teacher_misses_the_disk_cache_of_the_old_one(tmp_path):
    dm = TinyImages()
    teacher = TinyNet(width=8)
    cfg = cache_cfg(tmp_path, cache="disk")
    old = build_teacher_cache(cfg, teacher, dm)
    old.store(torch.arange(24), Outputs(logits=teacher(torch.rand(24, 1, 8, 8)).detach()))
    with torch.no_grad():
        teacher.fc.weight.mul_(2)  # the teacher changed (e.g. retrained)
    new = build_teacher_cache(cfg, teacher, dm)
    new.store(torch.tensor([0]), Outputs(logits=torch.zeros(1, 3)))  # fixes the layout
    assert new.path != old.path
    assert new.lookup(torch.arange(1, 24), "cpu") is None  # nothing of the old teacher is read


def test_disk_cache_persists_across_cache_objects(tmp_path):
    dm = TinyImages()
    teacher = TinyNet(width=8)
    cfg = cache_cfg(tmp_path, cache="disk")
    flat = {"logits": torch.randn(24, 3), "embedding": torch.randn(24, 8),
            "features.conv": torch.randn(24, 8, 8, 8)}
    first = build_teacher_cache(cfg, teacher, dm)
    first.store(torch.arange(12), Outputs.from_flat({k: v[:12] for k, v in flat.items()}))
    first.store(torch.arange(12, 24), Outputs.from_flat({k: v[12:] for k, v in flat.items()}))
    files = sorted(p.name for p in first.path.iterdir())
    assert files == ["embedding.npy", "features.conv.npy", "filled.npy", "layout.json", "logits.npy"]
    assert first.path.parent.parent.parent == tmp_path / "cache" / "teacher"
    del first

    second = build_teacher_cache(cfg, teacher, dm)  # e.g. the next run
    assert second.lookup(torch.arange(24), "cpu") is None  # layout unknown before a store
    second.store(torch.tensor([0]), Outputs.from_flat({k: v[:1] for k, v in flat.items()}))
    order = torch.tensor([23, 5, 11, 12])
    got = second.lookup(order, "cpu").flat()
    for name, value in flat.items():
        torch.testing.assert_close(got[name], value[order], rtol=0, atol=0)
    assert np.load(second.path / "filled.npy").all()


def test_refused_when_the_teacher_input_is_random(tmp_path):
    with pytest.raises(KdkitError, match="random augmentation"):
        build_teacher_cache(cache_cfg(tmp_path), TinyNet(), TinyImages(augment=True))
    with pytest.raises(KdkitError, match="cache_dtype"):
        build_teacher_cache(cache_cfg(tmp_path, cache_dtype="int8"), TinyNet(), TinyImages())
    with pytest.raises(KdkitError, match="teacher.cache='ram'"):
        build_teacher_cache(cache_cfg(tmp_path, cache="ram"), TinyNet(), TinyImages())


def test_outputs_without_one_row_per_sample_are_refused():
    cache = TeacherCache(8, "fp")
    with pytest.raises(KdkitError, match="logit_scale"):
        cache.store(torch.arange(4), Outputs(logits=torch.randn(4, 3),
                                             features={"logit_scale": torch.tensor(10.0)}))


def test_topk_restore_keeps_topk_probabilities_and_tail_mass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 100, generator=g) * 3
    values, indices, tail = topk_compress(logits, 10)
    restored = topk_restore(values, indices, tail, 100)
    p, q = logits.softmax(1).double().numpy(), restored.softmax(1).double().numpy()
    top = indices.numpy()
    rows = np.arange(6)[:, None]
    np.testing.assert_allclose(q[rows, top], p[rows, top], rtol=1e-5)
    rest = np.ones_like(p, dtype=bool)
    rest[rows, top] = False
    np.testing.assert_allclose(q[rest].reshape(6, 90).sum(1), p[rest].reshape(6, 90).sum(1), rtol=1e-5)
    # the tail is flat: every non-top-k class holds (tail mass) / 90
    tail = q[rest].reshape(6, 90)
    np.testing.assert_allclose(tail, np.broadcast_to(tail.mean(1, keepdims=True), tail.shape), rtol=1e-5)


def test_topk_cache_gives_a_close_kd_loss_and_gradient():
    """A peaked teacher over 1000 classes (as trained classifiers are at T = 1) keeps ~90% of
    its mass in the top 20: the KD loss moves by < 3%, and the student gradient error obeys the
    bound of ``topk_restore``: per row, sum_j |p_j - p^_j| <= 2 * tail mass (then / B)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 1000, generator=g) * 2
    teacher[torch.arange(16), torch.randint(0, 1000, (16,), generator=g)] += 12
    student = torch.randn(16, 1000, generator=g) * 2
    cache = TeacherCache(16, "fp", topk=20)
    cache.store(torch.arange(16), Outputs(logits=teacher))
    restored = cache.lookup(torch.arange(16), "cpu").logits
    assert restored.shape == teacher.shape and restored.dtype == torch.float32

    s = student.clone().requires_grad_(True)
    exact, approx = kd_loss(s, teacher, 1.0), kd_loss(s, restored, 1.0)
    grad_exact, = torch.autograd.grad(exact, s)
    grad_approx, = torch.autograd.grad(approx, s)
    assert abs(approx.item() - exact.item()) / exact.item() < 0.03
    p = teacher.double().softmax(1)
    tail_mass = 1 - p.topk(20, dim=1).values.sum(1)
    assert 0.05 < float(tail_mass.mean()) < 0.2  # a real tail, not a trivial case
    row_l1 = (grad_exact - grad_approx).abs().sum(1).double() * 16
    assert bool((row_l1 <= 2 * tail_mass + 1e-5).all())
    # float16 storage on top of top-k: the T=1 top-k probabilities stay within 1%
    half = TeacherCache(16, "fp", topk=20, dtype=torch.float16)
    half.store(torch.arange(16), Outputs(logits=teacher))
    top = teacher.topk(20, dim=1).indices
    torch.testing.assert_close(F.softmax(half.lookup(torch.arange(16), "cpu").logits, 1).gather(1, top),
                               F.softmax(teacher, 1).gather(1, top), rtol=1e-2, atol=1e-6)


def test_pipeline_distils_from_the_disk_cache(compose_run, tmp_path, monkeypatch):
    """``kdkit-train teacher.cache=disk`` on the digits demo: the student stage reads the teacher
    from files under ``${paths.cache_dir}/teacher/<fingerprint>/``."""
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg, results = compose_run("teacher.cache=disk", "++teacher.cache_dtype=float16",
                                  "stages.baseline=false")
    assert list(results) == ["teacher", "student"] and 0 <= results["student"]["test/acc"] <= 1
    files = list((tmp_path / "cache" / "teacher").glob("*/*/rank0-of-1/*.npy"))
    assert {f.name for f in files} >= {"logits.npy", "embedding.npy", "filled.npy"}
    filled = np.load(next(f for f in files if f.name == "filled.npy"))
    assert filled.sum() == 2 * cfg.data.batch_size  # SMOKE: 2 training batches were cached
