import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from kdkit.data_contract import ImageTextData
from kdkit.distillers.clip_fd import ClipFD
from kdkit.errors import KdkitError
from kdkit.models.clip import clip_model, clip_tokenizer
from kdkit.tasks.image_text import ImageTextTask, fit_context
from kdkit.tasks.image_text_metrics import EvalEmbeddings, recall_at_k, zero_shot_accuracy

TINY = "kdkit-vit-p8-d32"
CLASSES = ["cat", "dog", "ship"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]


class Pairs(Dataset):
    """Random images with captions "a photo of a <class>." and labels; pair_id = label."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g)
        self.labels = torch.arange(n) % len(CLASSES)
        self.tokens = clip_tokenizer(TINY)([f"a photo of a {c}." for c in CLASSES])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = self.labels[i]
        return {"image": self.images[i], "text": self.tokens[label], "label": label,
                "pair_id": label, "index": torch.tensor(i)}


class PairsModule(L.LightningDataModule, ImageTextData):
    num_classes = None
    static_for_teacher = False  # captions drawn per sample
    teacher_input_fingerprint = None
    fixed_shards = False
    num_train_samples = tokenizer = class_names = templates = None  # plain attributes, set below

    def use_fixed_shards(self):
        self.fixed_shards = True

    def __init__(self):
        super().__init__()
        self.train, self.test = Pairs(16, 0), Pairs(10, 1)
        self.tokenizer, self.class_names, self.templates = clip_tokenizer(TINY), CLASSES, TEMPLATES
        self.num_train_samples = len(self.train)

    def example_batch(self, n: int | None = None):
        return default_collate([self.train[i] for i in range(n or 4)])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8, shuffle=True, drop_last=True)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=4)  # 10 = 4 + 4 + 2: uneven last batch


def make_task(teacher=None, **kwargs) -> ImageTextTask:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    return ImageTextTask(clip_model(TINY), teacher, **kwargs)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_outputs_are_normalised_clip_embeddings():
    task = make_task()
    batch = PairsModule().example_batch()
    out = task.student_outputs(batch)
    assert out.embedding.shape == (4, 32) and out.features["text_embedding"].shape == (4, 32)
    torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(4))
    assert out.features["logit_scale"].item() == pytest.approx(task.student.logit_scale.exp().item())
    # each model its own open_clip normalisation
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(task.image_input(batch, "student"), (batch["image"] - mean) / std)
    expected = task.student.encode_image((batch["image"] - mean) / std, normalize=True)
    torch.testing.assert_close(out.embedding, expected)


def test_teacher_gets_its_own_size_and_normalisation():
    teacher = clip_model(TINY, image_size=48)
    task = make_task(teacher, teacher_normalize={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    batch = PairsModule().example_batch()
    x = task.image_input(batch, "teacher")
    resized = F.interpolate(batch["image"], size=(48, 48), mode="bilinear", antialias=True)
    torch.testing.assert_close(x, (resized - 0.5) / 0.25)
    assert task.teacher_outputs(batch).embedding.shape == (4, 32)


def test_fit_context_pads_trims_padding_and_refuses_cutting_text():
    tokens = torch.tensor([[5, 6, 7, 0, 0], [5, 7, 0, 0, 0]])
    assert fit_context(tokens, 7).tolist() == [[5, 6, 7, 0, 0, 0, 0], [5, 7, 0, 0, 0, 0, 0]]
    assert fit_context(tokens, 3).tolist() == [[5, 6, 7], [5, 7, 0]]
    with pytest.raises(KdkitError, match="context length 2"):
        fit_context(tokens, 2)


def test_task_loss_is_clip_infonce_by_loops():
    task = make_task()
    out = task.student_outputs(PairsModule().example_batch())
    img, txt = out.embedding.tolist(), out.features["text_embedding"].tolist()
    s = out.features["logit_scale"].item()

    def ce(rows, cols):
        total = 0.0
        for i, r in enumerate(rows):
            logits = [s * sum(a * b for a, b in zip(r, c)) for c in cols]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
        return total / len(rows)

    assert task.task_loss(out, {}).item() == pytest.approx((ce(img, txt) + ce(txt, img)) / 2, rel=1e-5)


def test_recall_at_k_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])
    # nearest gallery items: q0 -> 1, 2, 0, 3; q1 -> 0, 2, {1, 3}; q2 -> 2, 0, 1, 3
    # ids of those items:   q0 (7): 1, 7, ..  q1 (8): 8, ..  q2 (9): 7, 8, 1, 9
    r = recall_at_k(q, g, torch.tensor([7, 8, 9]), torch.tensor([8, 1, 7, 9]), ks=(1, 2, 4), chunk=2)
    assert {k: v.item() for k, v in r.items()} == pytest.approx({1: 1 / 3, 2: 2 / 3, 4: 1.0})


def test_zero_shot_accuracy_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert zero_shot_accuracy(image, classes, torch.tensor([0, 0, 1])).item() == pytest.approx(1 / 3)


def test_eval_store_drops_repeated_samples():
    store = EvalEmbeddings()
    emb = torch.eye(3)
    store.update(emb[:2], emb[:2], torch.tensor([4, 2]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    store.update(emb[1:], emb[1:], torch.tensor([2, 9]), torch.tensor([1, 2]), torch.tensor([1, 2]))
    data = store.compute()
    assert data["index"].tolist() == [2, 4, 9] and data["pair_id"].tolist() == [1, 0, 2]
    torch.testing.assert_close(data["image"], emb[[1, 0, 2]])


def test_fit_then_test_metrics_match_an_independent_evaluation():
    dm = PairsModule()
    task = make_task()
    trainer(max_epochs=1).fit(task, datamodule=dm)
    assert task.student.logit_scale.item() <= math.log(100.0)
    metrics = trainer().test(task, datamodule=dm, verbose=False)[0]
    assert set(metrics) == {"test/zeroshot_acc", *(f"{d}_r@{k}" for d in ("test/i2t", "test/t2i") for k in (1, 5, 10))}

    # independent: encode everything by hand, build the prompt-ensemble classifier by hand
    student, tok = task.student.eval(), clip_tokenizer(TINY)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = student.encode_image((dm.test.images - mean) / std, normalize=True)
        txt = student.encode_text(dm.test.tokens[dm.test.labels], normalize=True)
        classes = []
        for c in CLASSES:
            e = student.encode_text(tok([t.format(c) for t in TEMPLATES]), normalize=True).mean(0)
            classes.append(e / e.norm())
        classes = torch.stack(classes)
    labels = dm.test.labels
    acc = ((img @ classes.T).argmax(1) == labels).float().mean().item()
    assert metrics["test/zeroshot_acc"] == pytest.approx(acc, abs=1e-6)
    # class-level retrieval: a caption of the same class in the top k
    for k in (1, 5):
        i2t = sum(labels[(img[i] @ txt.T).topk(k).indices].eq(labels[i]).any().item() for i in range(10)) / 10
        t2i = sum(labels[(txt[i] @ img.T).topk(k).indices].eq(labels[i]).any().item() for i in range(10)) / 10
        assert metrics[f"test/i2t_r@{k}"] == pytest.approx(i2t, abs=1e-6)
        assert metrics[f"test/t2i_r@{k}"] == pytest.approx(t2i, abs=1e-6)


def test_distillation_step_trains_only_student_and_adapters():
    teacher = clip_model("kdkit-vit-p8-d64")
    task = make_task(teacher, distillers={"clip_fd": ClipFD()})
    dm = PairsModule()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer(max_steps=1).fit(task, datamodule=dm)
    assert task.distillers["clip_fd"].image_proj.proj.weight.shape == (64, 32)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in task.state_dict())


def test_optimizer_decays_only_matrices():
    task = make_task()
    opt = task.configure_optimizers()
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert any(p is task.student.logit_scale for p in no_decay["params"])
    from kdkit.tasks.base import DistillationTask

    assert "configure_optimizers" not in vars(ImageTextTask)  # only the param_groups hook differs
    assert ImageTextTask.configure_optimizers is DistillationTask.configure_optimizers


def test_channels_last_is_an_image_option():
    teacher = clip_model(TINY)
    task = make_task(teacher, channels_last=True)
    assert task.channels_last
    conv = task.student.visual.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert task.teacher.model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = task.image_input(PairsModule().example_batch(), "student")
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert not make_task().channels_last


def test_teacher_cache_is_refused_and_report_has_throughput():
    with pytest.raises(KdkitError, match="teacher.cache"):
        make_task(clip_model(TINY), teacher_cache=object())
    report = make_task().inference_report(PairsModule().example_batch(8))
    assert report["params"] == report["params_image"] + report["params_text"]
    assert report["images_per_s"] > 0 and report["texts_per_s"] > 0 and report["latency_ms"] > 0


def test_experiment_cifar10_clip_smoke(compose_run, data_dir):
    cfg, results = compose_run("experiment=cifar10_clip", "teacher.max_epochs=1", "data.eval_batch_size=50")
    assert cfg.task._target_ == "kdkit.tasks.image_text.ImageTextTask" and list(cfg.distiller) == ["clip_crd", "clip_icl"]
    assert list(results) == ["teacher", "baseline", "student"]
    for stage in results.values():
        assert 0 <= stage["test/zeroshot_acc"] <= 1 and 0 <= stage["test/t2i_r@10"] <= 1
        assert stage["images_per_s"] > 0
    assert results["teacher"]["params"] > results["student"]["params"]


def test_transfer_data_refuses_distillers_blind_to_missing_captions():
    from types import SimpleNamespace

    from kdkit.distillers.base import Distiller
    from kdkit.distillers.clip_crd import ClipCRD

    class ReadsEveryText(Distiller):  # e.g. a distiller written before transfer data existed
        def forward(self, student, teacher, batch):
            return {"loss": student.features["text_embedding"].sum() * 0}

    transfer, plain = SimpleNamespace(has_unlabeled=True), SimpleNamespace(has_unlabeled=False)
    task = make_task(clip_model(TINY), distillers={"crd": ClipCRD(), "mine": ReadsEveryText()})
    with pytest.raises(KdkitError, match=r"\['mine'\] would read the padding caption"):
        task.check_data(transfer)
    task.check_data(plain)  # every image has its caption: anything goes
    make_task(clip_model(TINY), distillers={"crd": ClipCRD()}).check_data(transfer)


def test_experiment_cifar10_clip_on_transfer_data(compose_run, data_dir):
    """cifar10_clip with 200 captioned images: the baseline sees those alone, the student every
    image with the others' captions hidden, the CLIP loss on the captioned pairs only."""
    cfg, results = compose_run("experiment=cifar10_clip", "teacher.max_epochs=1", "data.eval_batch_size=50",
                               "data.labeled_count=200")
    assert results["baseline"]["train_samples"] == 200 and results["baseline"]["train_unlabeled"] == 0
    student = results["student"]
    assert student["train_unlabeled"] == student["train_samples"] - 200 > 0
    for stage in results.values():
        assert 0 <= stage["test/zeroshot_acc"] <= 1


def test_selection_is_refused_on_clip_transfer_data_before_any_training(compose_run, data_dir, tmp_path):
    with pytest.raises(KdkitError, match="does not run on image-text transfer data"):
        compose_run("experiment=cifar10_clip", "selection=[batch_select]", "data.labeled_count=200")
    assert not (tmp_path / "run" / "teacher.pt").exists()
