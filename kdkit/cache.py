"""Teacher-output cache: on static data, run the teacher once per sample and reuse its outputs.

When a training sample reaches the teacher identically every epoch (graphs, text, pre-resized
images without random augmentation), the teacher's ``Outputs`` for it never change. The task
asks the cache before each teacher forward (``lookup``) and hands it the result of every forward
it had to run (``store``); from the second epoch on the teacher no longer runs.

Correctness rests on the key: a row is addressed by the sample's dataset ``index`` inside a
directory named by a *fingerprint* of the teacher's weights and of everything that shapes the
teacher's input (data config, teacher normalisation and precision, the task), so a changed
teacher or pipeline never reuses a stale cache.

Only training steps use the cache: a forward run under ``torch.no_grad()`` (the task's probe
forward on ``example_batch``, evaluation) bypasses it, because such batches may come from another
split, where the same index names another sample (e.g. the full test graph of the inductive
node setting).

Under DDP every rank caches what *it* sees (its shard, in RAM or in its own files), with no
communication. Lightning's ``DistributedSampler`` reshuffles shards every epoch, so a rank then
needs several epochs before whole batches are cached; a sampler with fixed per-rank shards
(``kdkit.distributed.FixedShardSampler``) fills it in one epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

MODES = {True: "memory", "true": "memory", "memory": "memory", "disk": "disk"}
DTYPES = {None: None, "null": None, "float32": None, "fp32": None, "float16": torch.float16,
          "fp16": torch.float16, "16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Loader settings that change how samples are batched, never what the teacher sees.
LOADER_KEYS = {"batch_size", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers",
               "prefetch_factor"}
TOPK_SUFFIXES = (".topk_values", ".topk_indices", ".tail_logmass")


# ---- top-k logit compression --------------------------------------------------------------
def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k values, their class indices, log of the softmax mass of the other classes).

    ``tail_logmass = log sum_{j not in top-k} exp(z_j)``, one float per row, is what lets
    ``topk_restore`` keep the softmax (at T = 1) of the top-k classes and of the tail exact.
    """
    z = logits.float()
    values, indices = z.topk(k, dim=1)
    tail = z.scatter(1, indices, float("-inf")).logsumexp(dim=1)
    return values, indices, tail


def topk_restore(values: Tensor, indices: Tensor, tail_logmass: Tensor, num_classes: int) -> Tensor:
    """Full ``[B, C]`` logits from ``topk_compress``: the other ``C - k`` classes share the tail.

    Each non-top-k logit is set to ``f = tail_logmass - log(C - k)``, so that
    ``sum_tail exp(f) = exp(tail_logmass)``. At T = 1 the softmax probability of every top-k
    class and the total tail probability are therefore exact; only the split of the tail mass
    among its classes is flattened to uniform (the maximum-entropy choice given that mass). The
    KD gradient on the student logits, ``(softmax(s) - p_t) / B`` at T = 1, is then off by at
    most ``2 * tail mass / B`` in L1 per row. At a higher KD temperature the tail holds more of
    the softmax mass and its flattening costs more (with 1000 classes, top-20 and T = 4: the
    student gradient is off by 30-50%): use top-k for large logit spaces distilled near T = 1.
    """
    k = values.shape[1]
    fill = tail_logmass.float() - float(np.log(num_classes - k))
    out = fill[:, None].expand(values.shape[0], num_classes).clone()
    return out.scatter(1, indices.long(), values.float())


# ---- fingerprint ----------------------------------------------------------------------------
def weights_fingerprint(model: nn.Module) -> str:
    """blake2b of every parameter and buffer of ``model`` (name, dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def describe_teacher_input(cfg, datamodule, teacher_cfg=None) -> dict:
    """Everything besides the weights that decides the teacher's outputs on a sample index.

    The datamodule may say it itself (``teacher_input_fingerprint``: a string that changes
    whenever the samples or their preprocessing change); otherwise its config minus loader
    settings stands for it. The teacher's normalisation and precision, the task config (input
    handling, tapped modules) and the cache's own storage format complete the description.
    """
    from omegaconf import Container, OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, Container) else node

    data = datamodule.teacher_input_fingerprint
    if data is None:
        data = {k: v for k, v in (plain(cfg.data) or {}).items() if k not in LOADER_KEYS}
    task = {k: v for k, v in (plain(cfg.get("task")) or {}).items()
            if k not in ("optimizer", "scheduler", "compile", "task_loss_weight")}
    teacher = cfg.teacher if teacher_cfg is None else teacher_cfg
    return {
        "data": data,
        "datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "task": task,
        # the model config too: what shapes outputs beyond the weights (a zero-shot head's
        # class names and prompts, a tapped module's settings)
        "teacher": {k: plain(teacher.get(k))
                    for k in ("model", "normalize", "image_size", "precision", "cache_dtype", "cache_topk")},
    }


def cache_fingerprint(model: nn.Module, description: dict) -> str:
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.blake2b(f"{weights_fingerprint(model)}|{text}".encode(), digest_size=12).hexdigest()


# ---- storage --------------------------------------------------------------------------------
class _MemoryRows:
    """Rows ``[N, *shape]`` in host memory. ``torch.empty`` commits pages only when written, so a
    rank's resident memory grows with the rows of its shard, not with N."""

    def __init__(self, layout: dict, num_samples: int):
        self.arrays = {name: torch.empty((num_samples, *spec["shape"]), dtype=_torch_dtype(spec["dtype"]))
                       for name, spec in layout.items()}
        self.filled = torch.zeros(num_samples, dtype=torch.bool)

    def is_filled(self, idx: Tensor) -> bool:
        return bool(self.filled[idx].all())

    def read(self, name: str, idx: Tensor) -> Tensor:
        return self.arrays[name][idx]

    def write(self, rows: dict[str, Tensor], idx: Tensor) -> None:
        for name, value in rows.items():
            self.arrays[name][idx] = value
        self.filled[idx] = True  # after the rows: a row is never marked before it is written


class _DiskRows:
    """One memory-mapped ``.npy`` per output name plus ``filled.npy``, in ``directory``.

    Files are created atomically (written under a temporary name, then hard-linked into place
    unless another process got there first), so two runs with the same key share them.
    """

    def __init__(self, layout: dict, num_samples: int, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.arrays = {name: _open_npy(directory / f"{name}.npy", (num_samples, *spec["shape"]),
                                       _numpy_dtype(spec["dtype"]))
                       for name, spec in layout.items()}
        self.filled = _open_npy(directory / "filled.npy", (num_samples,), np.dtype(bool))
        self.dtypes = {name: _torch_dtype(spec["dtype"]) for name, spec in layout.items()}
        meta = directory / "layout.json"
        if not meta.exists():
            _atomic_write(meta, json.dumps(layout, indent=1))

    def is_filled(self, idx: Tensor) -> bool:
        return bool(self.filled[idx.numpy()].all())

    def read(self, name: str, idx: Tensor) -> Tensor:
        rows = torch.from_numpy(np.ascontiguousarray(self.arrays[name][idx.numpy()]))
        dtype = self.dtypes[name]
        return rows.view(dtype) if dtype == torch.bfloat16 else rows  # numpy has no bfloat16

    def write(self, rows: dict[str, Tensor], idx: Tensor) -> None:
        where = idx.numpy()
        for name, value in rows.items():
            if value.dtype == torch.bfloat16:
                value = value.view(torch.int16)
            self.arrays[name][where] = value.numpy()
        self.filled[where] = True  # after the rows: a row is never marked before it is written


# ---- the cache ------------------------------------------------------------------------------
class TeacherCache:
    """Teacher ``Outputs`` by sample index, for the training steps of a static dataset.

    A lookup hits only when every index of the batch is cached (the task then skips the teacher
    forward); otherwise the task runs the teacher and ``store``s the batch. The storage layout
    (output names, shapes, dtypes) is taken from the first stored batch, so one teacher forward
    runs even when a disk cache from an earlier run exists: it names the subdirectory that run
    wrote (``<directory>/<layout hash>/rank<r>-of-<w>/``) and checks what this task produces.

    Args:
        num_samples: size of the index space (``datamodule.num_train_samples``).
        fingerprint: key of teacher weights + input pipeline (``cache_fingerprint``).
        mode: "memory" (host RAM) or "disk" (memory-mapped files under ``directory``).
        directory: root of the disk cache, ``<cache_dir>/teacher/<fingerprint>``.
        dtype: store floating outputs as ``torch.float16`` / ``torch.bfloat16`` (None: as
            produced); a lookup casts them back to the produced dtype.
        topk: store only the top-k ``logits`` per sample (see ``topk_restore``); None: all.
    """

    def __init__(self, num_samples: int, fingerprint: str, mode: str = "memory",
                 directory: str | Path | None = None, dtype: torch.dtype | None = None,
                 topk: int | None = None):
        if mode not in ("memory", "disk"):
            raise KdkitError(f"teacher.cache={mode!r}: use true (memory), memory or disk")
        if mode == "disk" and directory is None:
            raise KdkitError("the disk teacher cache needs a directory (paths.cache_dir)")
        if topk is not None and int(topk) < 1:
            raise KdkitError(f"teacher.cache_topk={topk} must be a positive integer or null")
        self.num_samples = int(num_samples)
        self.fingerprint = fingerprint
        self.mode = mode
        self.directory = Path(directory) if directory is not None else None
        self.dtype = dtype
        self.topk = None if topk is None else int(topk)
        self.hits = self.misses = self.stores = 0
        self._rows = None  # created on the first store, when the layout is known
        self._layout: dict | None = None

    def __getstate__(self):  # ddp_spawn pickles the task: memory maps stay behind
        state = dict(self.__dict__)
        if self.mode == "disk":
            state["_rows"], state["_layout"] = None, None
        return state

    @property
    def path(self) -> Path | None:
        """Directory of this rank's files (disk mode, after the first store)."""
        return getattr(self._rows, "directory", None)

    def lookup(self, index: Tensor, device) -> Outputs | None:
        """Cached ``Outputs`` of the batch on ``device``, or None unless every index is cached."""
        if self._rows is None or not torch.is_grad_enabled():
            return None
        idx = self._check_index(index)
        if not self._rows.is_filled(idx):
            self.misses += 1
            return None
        self.hits += 1
        flat = {}
        for name, spec in self._layout.items():
            if name.endswith(TOPK_SUFFIXES):
                continue
            flat[name] = self._rows.read(name, idx).to(device, _torch_dtype(spec["produced"]))
        for name in {n.rsplit(".", 1)[0] for n in self._layout if n.endswith(".topk_values")}:
            spec = self._layout[f"{name}.topk_values"]
            parts = [self._rows.read(f"{name}{s}", idx).to(device) for s in TOPK_SUFFIXES]
            flat[name] = topk_restore(*parts, spec["classes"]).to(_torch_dtype(spec["produced"]))
        return Outputs.from_flat(flat)

    def store(self, index: Tensor, outputs: Outputs) -> None:
        """Keep the outputs of a teacher forward on the batch whose dataset indices are ``index``."""
        if not torch.is_grad_enabled():
            return
        idx = self._check_index(index)
        rows = self._encode(outputs, len(idx))
        layout = {name: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch."),
                         "produced": spec_produced, **extra}
                  for name, (v, spec_produced, extra) in rows.items()}
        if self._rows is None:
            self._open(layout)
        elif layout != self._layout:
            raise KdkitError(f"teacher outputs changed shape between batches: {layout} vs "
                             f"{self._layout}; the teacher cache needs one row layout per sample")
        self._rows.write({name: v for name, (v, _, _) in rows.items()}, idx)
        self.stores += 1

    # ---- helpers --------------------------------------------------------------------------
    def _check_index(self, index: Tensor) -> Tensor:
        idx = index.detach().to("cpu", torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise KdkitError(f"teacher cache: batch index outside 0..{self.num_samples - 1} "
                             "(datamodule.num_train_samples must cover every training index)")
        return idx

    def _encode(self, outputs: Outputs, batch_size: int) -> dict[str, tuple[Tensor, str, dict]]:
        """name -> (rows to store on the CPU, produced dtype, extra layout facts)."""
        rows = {}
        for name, value in outputs.flat().items():
            value = value.detach()
            if value.dim() == 0 or value.shape[0] != batch_size:
                raise KdkitError(f"teacher cache: output {name!r} of shape {tuple(value.shape)} "
                                 f"has no row per sample (batch of {batch_size}); switch teacher.cache off")
            produced = str(value.dtype).removeprefix("torch.")
            if name == "logits" and self.topk is not None and self.topk < value.shape[1]:
                parts = topk_compress(value, self.topk)
                index_dtype = torch.int16 if value.shape[1] <= 2**15 else torch.int32
                casts = (self._float(parts[0]), parts[1].to(index_dtype), parts[2])
                for suffix, part in zip(TOPK_SUFFIXES, casts, strict=True):
                    rows[name + suffix] = (part.cpu(), produced, {"classes": value.shape[1]})
            else:
                rows[name] = (self._float(value).cpu(), produced, {})
        return rows

    def _float(self, value: Tensor) -> Tensor:
        return value.to(self.dtype) if self.dtype is not None and value.is_floating_point() else value

    def _open(self, layout: dict) -> None:
        if self.mode == "memory":
            self._rows = _MemoryRows(layout, self.num_samples)
        else:
            from kdkit.distributed import world

            rank, size = world()
            key = hashlib.blake2b(json.dumps(layout, sort_keys=True).encode(), digest_size=6).hexdigest()
            self._rows = _DiskRows(layout, self.num_samples, self.directory / key / f"rank{rank}-of-{size}")
        self._layout = layout


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype("int16") if name == "bfloat16" else np.dtype(name)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _open_npy(path: Path, shape: tuple, dtype: np.dtype) -> np.memmap:
    """Open ``path`` read-write, creating it zero-filled when absent (without racing a writer)."""
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
        try:
            os.link(tmp, path)  # fails if another process created it meanwhile: use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    array = np.lib.format.open_memmap(path, mode="r+")
    if array.shape != tuple(shape) or array.dtype != dtype:
        raise KdkitError(f"teacher cache file {path} holds {array.dtype}{array.shape}, expected "
                         f"{dtype}{tuple(shape)}: delete it")
    return array


# ---- entry point for the runner -------------------------------------------------------------
def build_teacher_cache(cfg, teacher_model: nn.Module, datamodule, teacher_cfg=None) -> TeacherCache:
    """The cache ``teacher.cache`` asks for (called by ``kdkit.pipeline.make_task``), for the
    teacher configured by ``teacher_cfg`` (default ``cfg.teacher``); each teacher of a run has
    its own cache, keyed by its own fingerprint.

    Config (``teacher.*``; defaults apply when a key is absent):
        cache: true / memory (host RAM), disk (memory-mapped under
            ``${paths.cache_dir}/teacher/<fingerprint>/``, reused by later runs), false.
        cache_dtype: null (as produced), float16 or bfloat16.
        cache_topk: null, or k: keep only the top-k logits per sample.

    The datamodule is asked (``use_fixed_shards()``) for fixed per-rank training shards
    (``kdkit.distributed.FixedShardSampler``), so that under DDP each rank's cache is complete
    after one epoch.
    """
    teacher = cfg.teacher if teacher_cfg is None else teacher_cfg
    mode = MODES.get(teacher.get("cache"))
    if mode is None:
        raise KdkitError(f"teacher.cache={teacher.get('cache')!r}: use false, true (memory), "
                         "memory or disk")
    if not datamodule.static_for_teacher:
        raise KdkitError(
            f"teacher.cache=true needs data that reach the teacher unchanged every epoch, but "
            f"{type(datamodule).__name__} applies random augmentation to the teacher's input "
            "(static_for_teacher is false): switch augmentation off or set teacher.cache=false")
    num_samples = datamodule.num_train_samples
    if not num_samples:
        raise KdkitError(f"teacher.cache needs datamodule.num_train_samples "
                         f"({type(datamodule).__name__} has none)")
    dtype_name = teacher.get("cache_dtype")
    if dtype_name not in DTYPES:
        raise KdkitError(f"teacher.cache_dtype={dtype_name!r}: use null, float16 or bfloat16")
    fingerprint = cache_fingerprint(teacher_model, describe_teacher_input(cfg, datamodule, teacher))
    datamodule.use_fixed_shards()  # under DDP: keep each rank on the shard it caches
    return TeacherCache(num_samples, fingerprint, mode=mode,
                        directory=Path(cfg.paths.cache_dir) / "teacher" / fingerprint,
                        dtype=DTYPES[dtype_name], topk=teacher.get("cache_topk"))
