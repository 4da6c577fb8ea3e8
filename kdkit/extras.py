"""Optional dependencies: which extra brings which package, and one line when one is missing.

kdkit's core needs only its required dependencies; a few settings and outputs need more, installed
as extras (``pip install "kdkit[retrieval]"``). A feature that needs a missing package raises
``KdkitError`` naming the extra to install, instead of a ``ModuleNotFoundError`` from deep inside
a run. ``EXTRAS`` is the one table of them; ``tests/test_extras.py`` checks it against
``pyproject.toml`` and the README.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kdkit.errors import KdkitError

# extra -> (what it enables, the import names it provides)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "retrieval": ("dense retrieval: nDCG / recall (ranx), faiss search, sentence-transformers export",
                  ("ranx", "faiss", "sentence_transformers")),
    "cluster": ("SLURM and local job launchers for sweeps (hydra/launcher=submitit_slurm|submitit_local)",
                ("hydra_plugins.hydra_submitit_launcher", "submitit")),
    "webdataset": ("image-text pairs from webdataset shards (data=image_text_wds)", ("webdataset",)),
    "onnx": ("ONNX export of vision students and distilled MLPs, checked with onnxruntime",
             ("onnx", "onnxscript", "onnxruntime")),
    "notebook": ("the notebooks (pandas tables, a Jupyter kernel)", ("pandas", "ipykernel")),
    "peers": ("the side-by-side benchmark with torchdistill (benchmarks/peers.py) and its checkpoint tests",
              ("torchdistill",)),
    "report-browser": ("the test that opens report.html in headless Chromium (Debian's chromium package)",
                       ("playwright",)),
}


def extra_of(module: str) -> str | None:
    """The extra that provides import name ``module`` (or a parent of it), or None."""
    for extra, (_, modules) in EXTRAS.items():
        if any(module == m or module.startswith(m + ".") for m in modules):
            return extra
    return None


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` for ``what`` (e.g. "retrieval metrics"); if it is not installed, one
    line naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None) or module
        extra = extra_of(module)
        hint = f"pip install 'kdkit[{extra}]'" if extra else f"pip install {missing.split('.')[0]}"
        raise KdkitError(f"{what} needs the package '{missing.split('.')[0]}', which is not installed: "
                         f"{hint}") from None
