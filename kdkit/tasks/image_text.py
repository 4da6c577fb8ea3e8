"""Vision-language (CLIP) distillation: images + captions -> embeddings; zero-shot and retrieval."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.data_contract import ImageTextData
from kdkit.errors import KdkitError
from kdkit.models.clip import class_text_embeddings
from kdkit.losses.contrastive import contrastive_loss
from kdkit.outputs import Outputs
from kdkit.tasks.base import DistillationTask
from kdkit.tasks.image_inputs import ImageInputs
from kdkit.tasks.image_text_metrics import EvalEmbeddings, recall_at_k, zero_shot_accuracy


class ImageTextTask(ImageInputs, DistillationTask):
    """CLIP distillation (CLIP-KD, Yang et al. 2024; TinyCLIP, Wu et al. 2023 settings).

    Batches are dicts ``{"image": float [B, 3, H, W] in [0, 1], "text": long [B, L] token ids,
    "index": long [B]}``, plus ``"label"`` (class id, for zero-shot accuracy) and ``"pair_id"``
    (which pairs match for retrieval; default: ``index``, i.e. only a sample's own caption).
    Each model gets the images resized to its own input size and normalised with its own
    open_clip preprocessing mean/std, and the tokens padded/trimmed to its context length.

    ``Outputs``: ``embedding`` = L2-normalised image embedding, ``features["text_embedding"]``
    = L2-normalised text embedding, ``features["logit_scale"]`` = the model's scale exp(log s)
    (a 0-dim tensor). The task loss is CLIP's symmetric InfoNCE over the global batch (local
    rows vs. embeddings gathered from every rank; ``kdkit.losses.contrastive``). On transfer data
    (``kdkit.datamodules.transfer``) batches carry ``"captioned"`` (bool): the CLIP loss runs over
    the captioned pairs alone, and the CLIP distillers teach the other images from the teacher.

    Optimizer groups (``param_groups``): as CLIP and open_clip's trainer, only matrices
    (ndim >= 2) decay; gains, biases and the logit scale get ``weight_decay = 0``.

    Metrics (``test/...``): ``zeroshot_acc`` (class names x a prompt ensemble, class text
    embeddings computed by the student at the start of each evaluation) and ``i2t_r@k`` /
    ``t2i_r@k``: a query is a hit at k when one of its k nearest items has the query's
    ``pair_id``. Evaluation embeddings are gathered from all ranks and de-duplicated by
    ``index`` (DistributedSampler pads with repeats), so the numbers do not depend on N.

    Args:
        tokenizer: callable list[str] -> token ids, for the zero-shot prompts; default: the
            datamodule's ``tokenizer`` attribute.
        class_names: names for zero-shot classification; default: the datamodule's
            ``class_names`` (no zero-shot metric when neither is set).
        templates: prompt templates with one ``{}`` (the class name), averaged per class;
            default: the datamodule's ``templates``, else ``("a photo of a {}.",)``.
        recall_ks: the k of the retrieval Recall@k metrics.
        max_logit_scale: the student's logit scale is clamped to this after every step (CLIP).
        channels_last: see ``ImageInputs``.
        **kwargs: see ``DistillationTask`` (``teacher_cache`` is not supported here).
    """

    primary_metric = "zeroshot_acc"  # compared across stages on validation data (warn_weaker_teachers)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        tokenizer: Callable | None = None,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        recall_ks: Sequence[int] = (1, 5, 10),
        max_logit_scale: float = 100.0,
        **kwargs,
    ):
        if kwargs.get("teacher_cache") is not None:
            raise KdkitError("image_text: teacher.cache is not supported (captions are re-drawn "
                             "and images augmented every epoch); set teacher.cache=false")
        super().__init__(student, teacher, **kwargs)
        self.tokenizer = tokenizer
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates) if templates else None
        self.recall_ks = tuple(int(k) for k in recall_ks)
        self.max_logit_scale = float(max_logit_scale)
        from kdkit.models.clip import preprocess_stats

        self.model_specs = {"student": preprocess_stats(student)}
        for name, frozen in self.teachers.items():
            self.model_specs[name] = preprocess_stats(frozen.model)
        self.register_image_pipelines({
            role: {**spec, **(self.inputs[role].get("normalize") or {}),
                   "size": self.inputs[role].get("image_size") or spec["size"]}
            for role, spec in self.model_specs.items()})
        self.eval_store = nn.ModuleDict({stage: EvalEmbeddings() for stage in ("val", "test")})
        self._class_embeddings: Tensor | None = None

    # ---- inputs -----------------------------------------------------------------------------
    def text_input(self, tokens: Tensor, role: str) -> Tensor:
        return fit_context(tokens, self.model_specs[role]["context_length"])

    # ---- outputs ----------------------------------------------------------------------------
    def forward_outputs(self, model, batch: dict, role: str) -> Outputs:
        out = model(image=self.image_input(batch, role), text=self.text_input(batch["text"], role))
        if isinstance(out, dict):
            image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            image, text, scale = out[0], out[1], out[2]
        return Outputs(embedding=image, features={"text_embedding": text, "logit_scale": scale})

    def task_loss(self, outputs: Outputs, batch: dict) -> Tensor:
        # float32 losses under bf16/fp16 autocast; forward_outputs made all three fields.
        # On transfer data the CLIP loss sees the captioned pairs alone.
        features = outputs.features
        return contrastive_loss(outputs.embedding.float(), features["text_embedding"].float(),
                                features["logit_scale"].float(), keep=batch.get("captioned"))

    def check_data(self, datamodule) -> None:
        """On transfer data (images without captions) every distiller must honour
        ``batch["captioned"]``, and no selection policy runs (they score pairs by caption).
        Mixup / CutMix are refused: a mixed image has no caption of its own."""
        if getattr(datamodule, "mixes_samples", False):
            raise KdkitError("data.mixup_alpha / cutmix_alpha mix images but not their captions: image-text "
                             "training needs them at 0")
        if not getattr(datamodule, "has_unlabeled", False):
            return
        blind = [name for name, d in self.distillers.items() if not d.handles_uncaptioned]
        if blind:
            raise KdkitError(
                f"distillers {blind} would read the padding caption of an image without one: on "
                "image-text transfer data (data.labeled_fraction / labeled_count / unlabeled) use "
                "clip_fd, clip_crd, clip_icl or affinity, or drop the transfer options")
        if self.selection:
            raise KdkitError(
                f"selection {list(self.selection)} scores image-text pairs by their captions; it does "
                "not run on image-text transfer data (images without captions): drop one of the two")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # CLIP bounds its temperature the same way: clamp the parameter, not the gradient.
        log_scale = getattr(self.student, "logit_scale", None)
        if isinstance(log_scale, Tensor):
            with torch.no_grad():
                log_scale.clamp_(0, math.log(self.max_logit_scale))

    def param_groups(self) -> list[dict]:
        # CLIP (and open_clip's trainer) exempt gains, biases and the logit scale from weight
        # decay: only matrices (ndim >= 2) decay.
        (group,) = super().param_groups()
        params = group["params"]
        return [{"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    # ---- evaluation -------------------------------------------------------------------------
    def _eval_setting(self, name: str, default=None):
        value = getattr(self, name)
        dm = self._trainer.datamodule if self._trainer is not None else None
        if value is None and isinstance(dm, ImageTextData):
            value = {"class_names": dm.class_names, "tokenizer": dm.tokenizer, "templates": dm.templates}[name]
        return default if value is None else value

    @torch.no_grad()
    def class_embeddings(self) -> Tensor | None:
        """[C, D] student text embeddings of each class, averaged over the prompt templates."""
        names = self._eval_setting("class_names")
        if not names:
            return None
        tokenizer = self._eval_setting("tokenizer")
        if tokenizer is None:
            raise KdkitError("image_text: zero-shot needs a tokenizer (task.tokenizer or the "
                             "datamodule's tokenizer attribute)")
        templates = list(self._eval_setting("templates", ("a photo of a {}.",)))
        was_training = self.student.training
        self.student.eval()
        embeddings = class_text_embeddings(
            self.student.encode_text, lambda prompts: self.text_input(tokenizer(prompts).to(self.device), "student"),
            names, templates, batch_size=len(names) * len(templates))
        self.student.train(was_training)
        return embeddings

    def on_validation_epoch_start(self) -> None:
        self._class_embeddings = self.class_embeddings()

    def on_test_epoch_start(self) -> None:
        self._class_embeddings = self.class_embeddings()

    def update_metrics(self, stage: str, outputs: Outputs, batch: dict) -> None:
        label = batch.get("label")
        self.eval_store[stage].update(
            image=outputs.embedding.float(),
            text=outputs.features["text_embedding"].float(),
            index=batch["index"],
            pair_id=batch.get("pair_id", batch["index"]),
            label=label if label is not None else torch.full_like(batch["index"], -1),
        )

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        data = self.eval_store[stage].compute()  # gathered over ranks, de-duplicated by index
        self.eval_store[stage].reset()
        metrics: dict[str, Tensor] = {}
        if self._class_embeddings is not None and bool((data["label"] >= 0).all()):
            metrics["zeroshot_acc"] = zero_shot_accuracy(data["image"], self._class_embeddings,
                                                         data["label"])
        i2t = recall_at_k(data["image"], data["text"], data["pair_id"], data["pair_id"], self.recall_ks)
        t2i = recall_at_k(data["text"], data["image"], data["pair_id"], data["pair_id"], self.recall_ks)
        for k in self.recall_ks:
            metrics[f"i2t_r@{k}"] = i2t[k]
            metrics[f"t2i_r@{k}"] = t2i[k]
        return metrics

    # ---- export -----------------------------------------------------------------------------
    def export(self, directory, with_adapters: bool = False, datamodule=None) -> list:
        """``DistillationTask.export``, plus the student as an open_clip ``local-dir:`` folder
        (``open_clip/``: model config, preprocessing, weights; see ``kdkit.exports``) that loads
        without kdkit. ``datamodule`` lends its tokenizer when the task has none (default: the
        Trainer's). A format that cannot be written costs a warning line only."""
        from kdkit.exports.settings import clip_exports

        return super().export(directory, with_adapters) + clip_exports(self, directory, datamodule)

    # ---- report -----------------------------------------------------------------------------
    def inference_report(self, batch: dict) -> dict:
        """Parameters (total, image and text towers) and image / text encoding throughput."""
        from kdkit.report import count_parameters, latency_ms

        report = super().inference_report(batch)
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        was_training = self.student.training
        self.student.eval()
        images = self.image_input(batch, "student")
        tokens = self.text_input(batch["text"], "student")
        image_ms = latency_ms(self.student.encode_image, images)
        text_ms = latency_ms(self.student.encode_text, tokens)
        self.student.train(was_training)
        n = images.shape[0]
        visual = getattr(self.student, "visual", None)
        report.update({
            "params_image": count_parameters(visual) if visual is not None else None,
            "params_text": report["params"] - count_parameters(visual) if visual is not None else None,
            "images_per_s": round(n / (image_ms / 1e3), 1),
            "texts_per_s": round(n / (text_ms / 1e3), 1),
        })
        return report


def fit_context(tokens: Tensor, context_length: int | None) -> Tensor:
    """Pad (with 0) or trim ``tokens`` [B, L] to a model's context length.

    Trimming only drops padding: a text that does not fit raises instead of losing its end
    token (which CLIP pools at).
    """
    if context_length is None or tokens.shape[-1] == context_length:
        return tokens
    if tokens.shape[-1] < context_length:
        return F.pad(tokens, (0, context_length - tokens.shape[-1]))
    if bool(tokens[:, context_length:].any()):
        raise KdkitError(f"texts of {tokens.shape[-1]} tokens do not fit a model with context "
                         f"length {context_length}: tokenize with context_length={context_length}")
    return tokens[:, :context_length]
