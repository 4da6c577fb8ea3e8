"""Teacher-written datasets: the teacher labels a training pool once, later runs read the file.

The offline form of knowledge distillation (Bucilua et al. 2006 label an unlabelled pool with the
ensemble; FKD, Shen & Xing 2022, stores soft labels so the teacher never runs during training):
for users whose teacher is too expensive to run every epoch, or whose student trains on data it
never had labels for. A cousin of the teacher cache (``kdkit.cache``): the cache fills itself
during training and lives under a fingerprinted directory; a teacher-labels file is written in
one pass before training, named by the user, portable (one ``.safetensors`` file) and checked
against the run that reads it.

The file holds one row per sample of the training view, by position (the batches' ``index``):
``logits`` (or, with ``topk``, the top-k logits and the log-mass of the rest, see
``kdkit.cache.topk_compress``), ``embedding`` when the teacher has one, and the intermediate
features the run's distillers tap. Its metadata names the format, the teacher's weights
fingerprint and the data it labelled, so a stale file (another teacher, another split, another
labelled fraction) is refused instead of silently distilling the wrong targets.

The teacher labels the *plain* images; with ``data.augment=true`` each augmented view of a sample
is distilled towards the teacher's output on the plain sample, as in offline KD.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kdkit.cache import LOADER_KEYS, TOPK_SUFFIXES, topk_compress, topk_restore, weights_fingerprint
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

FORMAT = "kdkit-teacher-labels/1"


class TeacherLabels:
    """A teacher's stored outputs, served by sample index (the teacher-cache interface).

    ``lookup`` answers training batches from the table (rows by ``batch["index"]``); forwards
    without grad (the task's probe, evaluation) get None, so the live teacher answers them, as
    with the cache. ``store`` keeps nothing: the file is complete.

    Args:
        tensors: flat outputs, ``[N, ...]`` each (``Outputs.flat`` names, top-k parts suffixed).
        meta: the file's metadata (``FORMAT``, ``num_samples``, ``teacher``, ``data``, ``topk``).
    """

    def __init__(self, tensors: dict[str, Tensor], meta: dict):
        self.tensors = tensors
        self.meta = meta
        self.num_samples = int(meta["num_samples"])
        self.hits = self.misses = self.stores = 0

    # ---- the cache interface --------------------------------------------------------------------
    def lookup(self, index: Tensor, device) -> Outputs | None:
        if not torch.is_grad_enabled():
            return None
        idx = index.detach().to("cpu", torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise KdkitError(f"teacher labels: batch index outside 0..{self.num_samples - 1}: the file "
                             "was written for another training set")
        self.hits += 1
        flat = {k: v[idx].to(device) for k, v in self.tensors.items() if not k.endswith(TOPK_SUFFIXES)}
        for name in {k.rsplit(".", 1)[0] for k in self.tensors if k.endswith(".topk_values")}:
            parts = [self.tensors[f"{name}{s}"][idx].to(device) for s in TOPK_SUFFIXES]
            flat[name] = topk_restore(*parts, int(self.meta["classes"]))
        return Outputs.from_flat(flat)

    def store(self, index: Tensor, outputs: Outputs) -> None:
        """Nothing to keep: every row was written before training."""

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One ``.safetensors`` file, written atomically."""
        from safetensors.torch import save

        from kdkit.checkpoint_io import write_atomically

        meta = {k: v if k == "format" else json.dumps(v) for k, v in self.meta.items()}
        return write_atomically(path, save({k: v.contiguous() for k, v in self.tensors.items()}, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> TeacherLabels:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise KdkitError(f"teacher.labels={path}: no such file (write one with stages.teacher_labels=true)")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # a truncated or foreign file
            raise KdkitError(f"teacher.labels={path} is not a readable safetensors file: {err}") from None
        if raw.get("format") != FORMAT:
            raise KdkitError(f"teacher.labels={path} is not a kdkit teacher-labels file "
                             f"(format {raw.get('format')!r}, expected {FORMAT!r})")
        meta = {k: v if k == "format" else json.loads(v) for k, v in raw.items()}
        return cls(tensors, meta)

    def check_fits(self, teacher_fingerprint: str | None, data: dict, where: str) -> None:
        """Refuse a file written by another teacher or for other training data than ``data``."""
        if teacher_fingerprint is not None and self.meta["teacher"] != teacher_fingerprint:
            raise KdkitError(f"{where} was written by another teacher (weights {self.meta['teacher']}, "
                             f"this run's teacher {teacher_fingerprint}): write it again "
                             "(stages.teacher_labels=true) or use that teacher")
        differs = sorted(k for k in set(data) | set(self.meta["data"]) if data.get(k) != self.meta["data"].get(k))
        if differs:
            detail = "; ".join(f"{k}: file {self.meta['data'].get(k)!r}, run {data.get(k)!r}" for k in differs)
            raise KdkitError(f"{where} was written for other training data ({detail})")


@torch.no_grad()
def label_dataset(task, name: str, dataset, batch_size: int = 256, topk: int | None = None,
                  device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Tensor]:
    """Teacher ``name``'s outputs on every sample of ``dataset`` (in order), flat and on the CPU;
    with ``topk`` the logits are stored as top-k values, indices and tail log-mass."""
    task.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=f"teacher '{name}' labels {len(dataset)} samples", unit="batch")
    parts: dict[str, list[Tensor]] = {}
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        for key, value in task.run_teacher(name, batch).flat().items():
            if key == "logits" and topk is not None and topk < value.shape[1]:
                values, indices, tail = topk_compress(value, topk)
                pieces = {f"logits{s}": p for s, p in zip(TOPK_SUFFIXES, (values, indices.to(torch.int32), tail),
                                                         strict=True)}
            else:
                pieces = {key: value.float()}
            for k, v in pieces.items():
                parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def data_description(cfg, datamodule) -> dict:
    """What decides which sample sits at each index and what the teacher saw of it: the
    datamodule's class, its config minus loader and augmentation settings, the training view
    and its size."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else {}
    # how the data is augmented or where it lives (the teacher labels plain images)
    where = ("augment", "randaugment_ops", "randaugment_magnitude", "random_erasing",
             "data_dir", "root", "archive_dir")
    keep = {k: v for k, v in data.items() if k not in LOADER_KEYS and k not in where}
    return {"datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "config": json.loads(json.dumps(keep, sort_keys=True, default=str)),
            "view": getattr(datamodule, "train_view", "all"), "num_samples": len(datamodule.plain_train_view)}


def write_teacher_labels(task, name: str, model, datamodule, cfg, path: str | Path, topk: int | None = None,
                         batch_size: int = 256, device="cpu") -> TeacherLabels:
    """Label ``datamodule``'s current training view (un-augmented) with teacher ``name`` of
    ``task`` into ``path``; returns the table, ready to serve the run that wrote it."""
    if topk is not None and int(topk) < 1:
        raise KdkitError(f"teacher.labels_topk={topk} must be a positive integer or null")
    dataset = datamodule.plain_train_view
    tensors = label_dataset(task, name, dataset, batch_size, topk, device)
    classes = tensors["logits"].shape[1] if "logits" in tensors else None
    if "logits.topk_values" in tensors:
        classes = int(getattr(task, "num_classes", None) or datamodule.num_classes)
    meta = {"format": FORMAT, "num_samples": len(dataset), "teacher": weights_fingerprint(model),
            "data": data_description(cfg, datamodule), "topk": topk, "classes": classes}
    labels = TeacherLabels(tensors, meta)
    labels.save(path)
    return labels
