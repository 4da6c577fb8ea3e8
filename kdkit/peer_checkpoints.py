"""Teachers trained elsewhere: CIFAR ResNet checkpoints of torchdistill, RepDistiller and mdistiller.

``teacher.ckpt_path=<file> +teacher.ckpt_layout=torchdistill|repdistiller|mdistiller`` loads such
a file into kdkit's ``kdkit.models.cifar_resnet`` network of the same depth and widths
(``resnet8/14/20/32/44/56/110``, and ``resnet8x4/32x4`` for the two RepDistiller-derived code
bases). The layouts, read from each project's model code:

- torchdistill 1.1 (``torchdistill/models/classification/resnet.py``, ``ResNet4Cifar``): a
  torchvision-style ResNet with torchvision's ``BasicBlock`` (``conv1 bn1 relu conv2 bn2
  downsample``), stem ``conv1 bn1``, stages ``layer1..3``, ``AvgPool2d(8)``, ``fc``; projection
  shortcut ``downsample = Sequential(conv1x1, BatchNorm2d)``; widths 16-16-32-64 only.
  Released weights (``cifar10-resnet20.pt`` ...) are bare state dicts; its ``save_ckpt`` writes
  ``{'model', 'optimizer', 'best_value', 'lr_scheduler', 'args'}``.
- RepDistiller (Tian et al., ICLR 2020; ``models/resnet.py``): the same module names, in the
  same registration order; widths 16-16-32-64 and 32-64-128-256 (``x4``). ``train_teacher.py``
  and ``train_student.py`` save ``{'model': state_dict, 'epoch', 'best_acc', 'optimizer'}``
  (the ``*_last.pth`` file also holds ``'opt'``).
- mdistiller (Zhao et al., DKD, CVPR 2022; ``mdistiller/models/cifar/resnet.py``): RepDistiller's
  network, module names unchanged. Its teachers and ``student_*`` files are
  ``{'model': state_dict}``; its ``latest`` / ``epoch_N`` files hold the whole distiller under
  ``DataParallel``: ``module.student.<key>``, ``module.teacher.<key>`` (the student is taken).

Key mapping (``S`` = stage 1..3, ``B`` = block index; ``<bn>`` = ``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``):

=======================================  =======================================  =====================
torchdistill / RepDistiller / mdistiller  kdkit ``CifarResNet``                    what
=======================================  =======================================  =====================
``conv1.weight``                         ``conv1.weight``                         stem 3x3 conv
``bn1.<bn>``                             ``bn1.<bn>``                             stem BN
``layerS.B.conv1.weight``                ``layerS.B.conv1.weight``                block 3x3 conv (stride)
``layerS.B.bn1.<bn>``                    ``layerS.B.bn1.<bn>``                    block BN 1
``layerS.B.conv2.weight``                ``layerS.B.conv2.weight``                block 3x3 conv
``layerS.B.bn2.<bn>``                    ``layerS.B.bn2.<bn>``                    block BN 2
``layerS.B.downsample.0.weight``         ``layerS.B.downsample.0.weight``         shortcut 1x1 conv
``layerS.B.downsample.1.<bn>``           ``layerS.B.downsample.1.<bn>``           shortcut BN
``fc.weight``, ``fc.bias``               ``fc.weight``, ``fc.bias``               classifier
=======================================  =======================================  =====================

The names coincide because kdkit's network follows the same RepDistiller parameterisation; the
forward passes agree too (post-activation blocks, projection shortcut only where the shape
changes, ``AvgPool2d(8)`` = kdkit's adaptive pooling on 32x32 inputs). So the conversion is a
check plus unwrapping: every key must be one of the rows above, or the file is refused in one
line naming a few keys that do not map (a Bottleneck, WRN, DenseNet or ImageNet ResNet file).
Shapes (depth and widths) are checked when the weights are loaded into the model.

Not covered by the weights: each project's input normalisation. A teacher trained elsewhere
expects that project's mean/std (RepDistiller/mdistiller CIFAR-100: (0.5071, 0.4867, 0.4408) /
(0.2675, 0.2565, 0.2761); torchdistill's CIFAR-10 configs: (0.4914, 0.4822, 0.4465) /
(0.2470, 0.2435, 0.2616)): set ``teacher.normalize`` to it when it differs from the data's.
Files that pickle ``argparse.Namespace`` (torchdistill's ``save_ckpt``, RepDistiller's
``*_last.pth``) need ``teacher.trust_checkpoint=true``, as any pickle beyond tensors does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from kdkit.errors import KdkitError

LAYOUTS = ("torchdistill", "repdistiller", "mdistiller")

_BN = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
# One pattern per row of the table; the replacement is the kdkit key (here the same name).
_CIFAR_RESNET_ROWS = (
    (r"conv1\.weight", r"\g<0>"),
    (rf"bn1\.{_BN}", r"\g<0>"),
    (r"layer[1-3]\.\d+\.conv[12]\.weight", r"\g<0>"),
    (rf"layer[1-3]\.\d+\.bn[12]\.{_BN}", r"\g<0>"),
    (r"layer[1-3]\.\d+\.downsample\.0\.weight", r"\g<0>"),
    (rf"layer[1-3]\.\d+\.downsample\.1\.{_BN}", r"\g<0>"),
    (r"fc\.(?:weight|bias)", r"\g<0>"),
)
# All three layouts share RepDistiller's / torchvision's module names (see the table).
ROWS = {layout: tuple((re.compile(p), r) for p, r in _CIFAR_RESNET_ROWS) for layout in LAYOUTS}


def check_layout(layout: str) -> str:
    """``layout`` lower-cased, or a KdkitError naming the known ones."""
    name = str(layout).strip().lower()
    if name not in ROWS:
        raise KdkitError(f"unknown ckpt_layout={layout!r}; choose one of {', '.join(LAYOUTS)}")
    return name


def _unwrap(state: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """The network's own keys: drop ``DataParallel``'s ``module.`` and, in an mdistiller
    distiller checkpoint, keep ``student.*`` (its teacher and adapters ride along there)."""
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if layout == "mdistiller" and any(k.startswith("student.") for k in state):
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return state


def to_kdkit(state: Mapping[str, Tensor], layout: str, source: str = "checkpoint") -> dict[str, Tensor]:
    """``state`` (a peer's CIFAR ResNet ``state_dict``) renamed to kdkit's ``CifarResNet`` keys.

    Args:
        state: the state dict read from the file (``{'model': ...}`` already unwrapped).
        layout: ``torchdistill``, ``repdistiller`` or ``mdistiller``.
        source: how error messages name the file.

    Raises:
        KdkitError: unknown layout, or keys that no row of the table maps (a few are listed).
    """
    layout = check_layout(layout)
    state = _unwrap(state, layout)
    out, unmatched = {}, []
    for key, value in state.items():
        for pattern, replacement in ROWS[layout]:
            if pattern.fullmatch(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            unmatched.append(key)
    if unmatched or not out:
        raise KdkitError(
            f"{source} is not a {layout} CIFAR ResNet state_dict: {len(unmatched)} of {len(state)} keys do "
            f"not map to kdkit.models.cifar_resnet, e.g. {unmatched[:4]} (see kdkit.peer_checkpoints)")
    return out
