"""CIFAR-10 as image-caption pairs for CLIP: each image with a prompt template filled with its
class name; the templates double as the zero-shot prompt ensemble.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdkit.data_contract import ImageTextData
from kdkit.datamodules.cifar10 import CIFAR10DataModule
from kdkit.errors import KdkitError

# The 18 CIFAR-10 prompts of CLIP's zero-shot evaluation (Radford et al. 2021, notebook
# "Prompt_Engineering_for_ImageNet" / CIFAR templates).
CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)



class ClassCaptions(Dataset):
    """Adds a caption ``template.format(class name)`` to each sample of a labelled image set.

    Args:
        images: a dataset of ``{"image", "label", "index"}`` dicts.
        tokens: ``[C, T, L]`` token ids of every (class, template) caption.
        random_template: draw a template per access (training: captions vary every epoch);
            otherwise template ``index mod T`` (a fixed caption per image for evaluation).
    """

    def __init__(self, images: Dataset, tokens: Tensor, random_template: bool):
        self.images, self.tokens, self.random_template = images, tokens, random_template

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = dict(self.images[index])
        n = self.tokens.shape[1]
        t = int(torch.randint(0, n, ())) if self.random_template else index % n
        sample["text"] = self.tokens[sample["label"], t]
        sample["pair_id"] = sample["label"]  # class-level retrieval: captions name only the class
        return sample


class CIFAR10PairsDataModule(CIFAR10DataModule, ImageTextData):
    """CIFAR-10 (see ``CIFAR10DataModule`` for splits and archives) as image-caption pairs
    (``kdkit.data_contract.ImageTextData``).

    A caption is a prompt template filled with the class name ("a blurry photo of a cat.").
    Training draws a template per sample and epoch; evaluation uses template ``index mod T``.
    As captions only name the class, retrieval is class-level (``pair_id`` = label): an
    image->text query is a hit when a retrieved caption names the image's class. Zero-shot
    classification uses ``class_names`` with every template (prompt ensemble).

    Transfer options (``data.labeled_count`` / ``labeled_fraction`` / ``unlabeled``, see
    ``kdkit.datamodules.transfer``) hide the captions of the other images: the student learns
    those images from teacher outputs alone (``batch["captioned"]`` is False there).

    Args:
        tokenizer: callable list[str] -> [N, L] token ids (``kdkit.models.clip.clip_tokenizer``).
        templates: caption templates with one ``{}``, also the zero-shot prompt ensemble
            (default: the 18 CIFAR-10 templates of CLIP).
        **kwargs: see ``CIFAR10DataModule`` (archives, cache, val split, loaders).
    """

    tokenizer: Callable | None = None
    templates: list[str] | None = None
    static_for_teacher = False  # a training caption is drawn anew at every access

    def __init__(self, tokenizer: Callable, templates: Sequence[str] | None = None, **kwargs):
        kwargs.setdefault("mean", (0.0, 0.0, 0.0))  # unused: each CLIP normalises its own way
        kwargs.setdefault("std", (1.0, 1.0, 1.0))
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.templates = list(templates or CIFAR_TEMPLATES)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise KdkitError("data.templates: give templates with exactly one '{}' each")

    @property
    def class_names(self) -> list[str]:
        self._require_setup()
        return list(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if isinstance(self.train_set, ClassCaptions):
            return
        super().setup(stage)
        captions = [t.format(name) for name in self.classes for t in self.templates]
        tokens = self.tokenizer(captions).view(len(self.classes), len(self.templates), -1)
        self.blank_text = torch.zeros_like(tokens[0, 0])  # the caption of a transfer image: none
        self.train_set = ClassCaptions(self.train_set, tokens, random_template=True)
        self.plain_train_set = ClassCaptions(self.plain_train_set, tokens, random_template=False)
        test = ClassCaptions(self.test_set, tokens, random_template=False)
        self.val_set = test if self.val_set is self.test_set else ClassCaptions(self.val_set, tokens, False)
        self.test_set = test
