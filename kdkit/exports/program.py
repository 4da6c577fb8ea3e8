"""Self-contained programs: ``torch.export`` (``.pt2``) and ONNX, with a JSON of the inputs.

A program holds the graph and the weights; loading it needs torch (or onnxruntime), not kdkit
and not the model's Python class. The batch dimension is dynamic; every other input dimension
is fixed to the example's.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError, say
from kdkit.exports.optional import optional_format, write_json

ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) imports
ONNX_HINT = "pip install onnx onnxscript onnxruntime (or kdkit[onnx])"
ATOL = 1e-4  # a program must compute what the model computes, up to float reordering


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a program that takes images in [0, 1], as the data gives them,
    and normalises them itself exactly as kdkit fed the student."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def inference_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``model`` in eval mode, without gradients: what a program is traced
    from, leaving the trained model (maybe the next stage's teacher) untouched."""
    copied = copy.deepcopy(model).float().cpu().eval()
    return copied.requires_grad_(False)


def export_program(model: nn.Module, example: Tensor, directory, inputs: dict, name: str = "student",
                   formats=("pt2", "onnx")) -> list[Path]:
    """Write ``<name>.pt2`` (``torch.export``), ``<name>.onnx`` when onnx and onnxscript are
    installed, and ``inputs.json`` (``inputs`` plus the input shape and dtype) into
    ``directory``.

    Args:
        model: a module called as ``model(x)`` on one tensor; it is copied (float32, CPU, eval)
            before tracing. Hooks it carries are traced too: remove feature taps first.
        example: one input batch (at least the right shape after the batch dimension).
        inputs: what a caller must know to feed the program (normalisation, class order, ...).
        name: the file stem.
        formats: which programs: ``pt2`` and/or ``onnx`` (config ``export.programs``).

    Each format that cannot be written (untraceable model, outputs that differ from the
    model's) costs one warning line; the others are still written. Returns the written paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = inference_copy(model)
    example = example.detach().float().cpu()
    if example.layout != torch.strided:
        example = example.to_dense()
    if example.shape[0] < 2:  # a batch of 1 would let the tracer specialise the batch size
        example = torch.cat([example, example])
    with torch.no_grad():
        expected = model(example)
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({0: batch},)
    programs: dict = {}

    def pt2() -> list[Path]:
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
        with torch.no_grad():
            _check_close(program.module()(example), expected, "torch.export")
        path = directory / f"{name}.pt2"
        torch.export.save(program, str(path))
        programs["exported"] = program
        return [path]

    def onnx() -> list[Path]:
        path = directory / f"{name}.onnx"
        source = programs.get("exported", model)  # re-tracing costs as much as the first trace
        # one self-contained file (students are far below ONNX's 2 GB limit for embedded weights)
        torch.onnx.export(source, (example,), str(path), dynamo=True, dynamic_shapes=dynamic,
                          input_names=["input"], output_names=["output"], external_data=False, verbose=False)
        try:
            _check_onnx(path, example, expected)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        return [path]

    if not formats:
        return []
    paths = optional_format("torch.export program (.pt2)", pt2) if "pt2" in formats else []
    if "onnx" not in formats:
        pass
    elif all(importlib.util.find_spec(p) is not None for p in ONNX_PACKAGES):
        paths += optional_format("ONNX program (.onnx)", onnx)
    else:
        say(f"export: ONNX skipped: onnx/onnxscript are not installed ({ONNX_HINT})")
    if paths:
        spec = {"programs": [p.name for p in paths], "input_name": "input",
                "input_shape": ["batch", *example.shape[1:]], "input_dtype": "float32", **inputs}
        paths.append(write_json(directory / "inputs.json", spec))
    return paths


def _check_close(got: Tensor, expected: Tensor, what: str) -> None:
    got = torch.as_tensor(got)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=ATOL, rtol=ATOL):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else f"shape {tuple(got.shape)}"
        raise KdkitError(f"the {what} program's outputs differ from the model's ({diff})")


def _check_onnx(path: Path, example: Tensor, expected: Tensor) -> None:
    """Run the file in onnxruntime (when installed) on the example batch."""
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    _check_close(torch.from_numpy(got), expected, "ONNX")
