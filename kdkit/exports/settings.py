"""What each setting exports beside ``student.pt`` / ``student.safetensors``: the glue between a
task (what its student was fed) and the format writers of this package."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kdkit.errors import say
from kdkit.exports.optional import optional_format, task_datamodule


def program_formats(task) -> tuple[str, ...]:
    """The programs to write (``export.programs``, which ``pipeline.make_task`` sets on the task;
    both when the task was built outside a run)."""
    return tuple(getattr(task, "export_programs", ("pt2", "onnx")))


def _stat(task, name: str) -> list[float]:
    """The student's per-channel ``mean`` / ``std`` buffer of an ``ImageInputs`` task."""
    return [float(v) for v in getattr(task, f"student_{name}").detach().reshape(-1).cpu()]


def _class_names(datamodule) -> list[str] | None:
    """The label order when the data names its classes (not every setting's contract does)."""
    try:
        names = getattr(datamodule, "class_names", None)
    except Exception:  # noqa: BLE001 - a property that cannot answer simply names no classes
        return None
    return [str(n) for n in names] if names else None


def _no_datamodule(what: str) -> list[Path]:
    say(f"export: {what} not written (no datamodule to take an example input from: pass "
        "export(..., datamodule=...) outside a Trainer)", warning=True)
    return []


def vision_exports(task, directory, datamodule=None) -> list[Path]:
    """A ``ClassificationTask``'s student as programs (``student.pt2``, ``student.onnx``,
    ``inputs.json``: images in [0, 1] at the student's input size, normalisation inside) and,
    for timm students, as a timm folder (``timm/``)."""
    from kdkit.exports.program import Normalized, export_program
    from kdkit.exports.timm_dir import is_timm_model, save_timm_dir

    dm = task_datamodule(task, datamodule)
    if dm is None:
        return _no_datamodule("programs and the timm folder")
    task.remove_taps()  # feature hooks would be traced into the program
    images = dm.example_batch(2)["image"][:2].detach().float().cpu()
    size = task.image_sizes.get("student")
    resized = size is not None and tuple(images.shape[-2:]) != tuple(size)
    if resized:  # what ImageInputs.image_input does before normalising
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean, std = _stat(task, "mean"), _stat(task, "std")
    channels, height, width = images.shape[1:]
    mean, std = _per_channel(mean, channels), _per_channel(std, channels)
    names = _class_names(dm)
    inputs = {
        "setting": "image classification",
        "input": "float32 images [batch, channels, height, width] with values in [0, 1]",
        "channels": channels, "image_size": [height, width],
        "normalization_included": True, "mean": mean, "std": std,
        "resize": ("kdkit resized the data's images to image_size (bilinear, antialiased) before "
                   "the student" if resized else "none: image_size is the data's resolution"),
        "output": "logits [batch, num_classes]", "num_classes": task.num_classes,
        "class_names": names,
    }
    paths = export_program(Normalized(task.student, mean, std), images, directory, inputs,
                           formats=program_formats(task))
    if is_timm_model(task.student):
        paths += optional_format("timm folder", lambda: save_timm_dir(
            task.student, Path(directory) / "timm", (channels, height, width), mean, std, names))
    return paths


def _per_channel(values: list[float], channels: int) -> list[float]:
    """One value per channel (a single statistic broadcasts over every channel, as in kdkit)."""
    return values * channels if len(values) == 1 else values


def clip_exports(task, directory, datamodule=None) -> list[Path]:
    """An ``ImageTextTask``'s student as an open_clip ``local-dir:`` folder (``open_clip/``)."""
    from kdkit.exports.open_clip_dir import save_open_clip_dir

    dm = task_datamodule(task, datamodule)
    tokenizer = task.tokenizer if task.tokenizer is not None else getattr(dm, "tokenizer", None)
    size = task.image_sizes["student"]
    return optional_format("open_clip folder", lambda: save_open_clip_dir(
        task.student, Path(directory) / "open_clip", size, _stat(task, "mean"), _stat(task, "std"),
        tokenizer=tokenizer))


def node_exports(task, directory, datamodule=None) -> list[Path]:
    """A ``NodeTask``'s graph-free student (an MLP) as programs (``student.pt2``,
    ``student.onnx``) with ``inputs.json``: the node features it reads and how the data module
    preprocessed them. A student that reads the graph gets no program (one info line)."""
    from kdkit.exports.program import export_program
    from kdkit.tasks.node import needs_graph

    if needs_graph(task.student):
        say("export: programs skipped: the student reads the graph (programs cover graph-free students)")
        return []
    dm = task_datamodule(task, datamodule)
    if dm is None:
        return _no_datamodule("programs")
    task.remove_taps()  # feature hooks would be traced into the program
    x = _first_rows(dm.example_batch()["x"], 8).detach().float().cpu()
    normalized = getattr(dm, "normalize_features", None)
    inputs = {
        "setting": "node classification, graph-free student (GNN-to-MLP)",
        "input": "float32 node features [nodes, num_features], one row per node, dense; no graph",
        "num_features": int(x.shape[1]), "num_classes": task.num_classes,
        "feature_normalization": ("row sum: each node's features divided by their sum (clamped at "
                                  "1e-12), as GraphDataModule(normalize_features=true) fed the student"
                                  if normalized else "none: the dataset's features as they are"
                                  if normalized is not None else "unknown (not a kdkit GraphDataModule)"),
        "normalization_included": False,
        "output": "logits [nodes, num_classes]",
        "class_order": "class id = the dataset's integer node label y",
        "class_names": _class_names(dm),
    }
    return export_program(task.student, x, directory, inputs, formats=program_formats(task))


def _first_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of a dense or sparse CSR matrix, dense (a whole large graph's
    features would not fit densely)."""
    if x.layout == torch.strided:
        return x[:n]
    n = min(n, x.shape[0])
    crow = x.crow_indices()[: n + 1]
    stored = int(crow[-1])
    rows = torch.sparse_csr_tensor(crow, x.col_indices()[:stored], x.values()[:stored], (n, x.shape[1]),
                                   check_invariants=False)  # a prefix of a valid CSR matrix is valid
    return rows.to_dense()
