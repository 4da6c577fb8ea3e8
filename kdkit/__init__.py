"""kdkit: knowledge distillation across modalities on PyTorch Lightning + Hydra.

Kept import-light on purpose: ``kdkit-train --help`` and config-only commands must not pay for
torch, timm or transformers. Import the submodules you need (``kdkit.compose``, ``kdkit.tasks``).
"""

__version__ = "0.1.0"
