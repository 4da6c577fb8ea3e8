"""Masked feature distillation: the student sees a masked image and matches the teacher's
features (on the full image) where it could see."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.adapters import resize_map
from kdkit.distillers.base import DistillContext, feature
from kdkit.distillers.fitnet import FitNet
from kdkit.distillers.token_layout import as_map, check_prefix, map_to_tokens
from kdkit.distillers.visible_tokens import VisibleTokens
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

VISIBLE_KEY = "mfd/visible"  # bool [B, h, w]: True where the student saw the patch
INDEX_KEY = "mfd/visible_index"  # masking: tokens: long [B, keep], each row's visible patches, ascending


def masked_count(num_patches: int, mask_ratio: float) -> int:
    """Patches masked per image: ``round(mask_ratio * num_patches)``, halves rounded up (MAE
    keeps ``floor(num_patches * (1 - mask_ratio))``, the same whenever that product is exact)."""
    return int(mask_ratio * num_patches + 0.5)


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit generator seed from (config seed, training step, sample index), the same on
    every machine, process and Python version."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_visible(index: Tensor, grid: tuple[int, int], mask_ratio: float, seed: int, step: int) -> Tensor:
    """Per-sample random patch masks ``bool [B, h, w]`` (True: visible), each drawn by its own
    ``torch.Generator`` seeded from ``(seed, step, index[b])``: a sample's mask depends on
    nothing else (not the batch it is in, its row, the rank or the device)."""
    h, w = grid
    n = h * w
    keep = n - masked_count(n, mask_ratio)
    visible = torch.zeros(len(index), n, dtype=torch.bool)
    for row, i in enumerate(index.tolist()):
        g = torch.Generator().manual_seed(sample_seed(seed, step, int(i)))
        visible[row, torch.randperm(n, generator=g)[:keep]] = True
    return visible.view(-1, h, w)


def visible_at(visible: Tensor, size) -> Tensor:
    """The patch mask ``bool [B, h, w]`` brought to a feature grid ``size`` by area resizing:
    float ``[B, H, W]``, each cell's visible fraction (adaptive average pooling of the mask). Equal
    grids: the mask itself as 0 / 1; a finer grid whose size ``h`` divides: each cell its patch's
    0 / 1 (nearest); a coarser grid: the fraction of the patches a cell covers that were visible
    (exact when the sizes divide; adaptive pooling's overlapping windows otherwise)."""
    size = tuple(int(v) for v in size)
    weight = visible.float()
    if tuple(visible.shape[-2:]) == size:
        return weight
    return F.adaptive_avg_pool2d(weight[:, None], size)[:, 0]


def masked_feature_loss(f_s: Tensor, f_t: Tensor, visible: Tensor, loss: str = "mse",
                        normalize: bool = False) -> Tensor:
    """``sum_{b, y, x, c} v_{b,y,x} e(f_s - f_t) / (C * sum_{b, y, x} v_{b,y,x})`` for maps
    ``[B, C, H, W]`` and ``visible`` ``v``: ``[B, H, W]``, bool or each position's visible
    fraction in [0, 1]. ``e`` is the square (``"mse"``) or absolute value (``"l1"``);
    ``normalize`` first L2-normalises each position's channel vector on both sides (DMAE).
    Positions of ``v = 0`` contribute nothing, whatever their values; none visible gives 0.
    Float32 whatever the input precision."""
    with torch.autocast(f_s.device.type, enabled=False):
        f_s, f_t = f_s.float(), f_t.float()
        if normalize:
            f_s, f_t = F.normalize(f_s, dim=1), F.normalize(f_t, dim=1)
        diff = f_s - f_t
        err = diff.pow(2) if loss == "mse" else diff.abs()
        weight = visible.float()[:, None].expand_as(err)
        err = err.masked_fill(weight == 0, 0.0)  # masked positions drop out even when inf / nan
        return (weight * err).sum() / weight.sum().clamp(min=1e-12)


class MFD(FitNet):
    """Masked feature distillation: DMAE (Bai et al., "Masked Autoencoders Enable Efficient
    Knowledge Distillers", CVPR 2023) and CLIP-KD's MFD (Yang et al., "CLIP-KD: An Empirical
    Study of CLIP Model Distillation", CVPR 2024), as one feature distiller.

    In every training step ``student_batch`` draws a random patch mask on the image's
    ``patch_size`` grid (``round(mask_ratio * h * w)`` masked patches per image) and gives the
    student the image with the masked patches set to 0 in the [0, 1] data range (black, before
    the student's own normalisation); the teachers see the full image. Then

        L_MFD = sum_{y, x, c} v_{y,x} (r(F^S)_{c,y,x} - F^T_{c,y,x})^2 / (C * sum_{y, x} v_{y,x})

    (summed over the batch too), ``v`` being 1 at visible and 0 at masked positions, and ``r`` a
    learned adapter (FitNet's, which this class extends: 1x1 conv + BN for maps, linear for
    tokens, the patch grid for tokens <-> maps). The mask reaches the compared feature's grid by area
    resizing (``visible_at``): on the mask's own grid (a ViT student at its patch grid) ``v``
    is 0 or 1; on a coarser grid each cell weighs by the fraction of its patches the student
    saw (a strict "all visible" rule would leave almost no cell of a 2x coarser grid at ratio
    0.5); a finer grid whose size is a multiple takes each patch's 0 / 1 (nearest). Token
    features are compared on their patch tokens (prefix tokens dropped).

    ``masking`` says how the student is masked:

    * ``pixels`` (any student): the masked patches are black pixels. The student still encodes
      every patch, so there is no speed-up, and unlike SimMIM no learned mask token replaces the
      masked patch embeddings. With a map adapter, BatchNorm's batch statistics in training
      include the masked positions (their error is still excluded).
    * ``tokens`` (a ViT student, as DMAE and CLIP-KD's MFD do): the student sees the full image
      but its masked patch tokens are dropped after ``token_module`` (``VisibleTokens``, MAE's
      encoder input), so its blocks encode ``P + keep`` tokens, about ``1 - mask_ratio`` of the
      work. The tapped student tokens are then exactly the visible patches: each goes through
      a linear adapter ``r`` to the teacher's width and is compared with the teacher's feature at
      its patch, the teacher's map (or token grid) brought to the student's patch grid by
      ``resize_map`` (exact cell means when it is finer). The mask's grid must be the student's
      patch grid. The student's classifier then also reads only the visible tokens, so the task
      loss in training sees the masked view (as in pixel masking), unless ``task_view: full``.

    The mask is drawn at the batch image's resolution: when the student resizes its input
    (``inputs.student.image_size``), set ``patch_size`` so that the mask grid is its patch grid
    (its patch size times data size / input size).

    Departures: DMAE feeds the teacher the same visible patches, compares L2-normalised
    features (CLS included) with an L1 loss and adds MAE's pixel reconstruction
    (``loss: l1, normalize: true`` gives its distance; the reconstruction is not here, and the
    teacher sees the full image). CLIP-KD's MFD (``--mask_ratio 0.75`` in its script) regresses
    the final image embedding of the teacher's full image with MSE; here any intermediate layer
    is compared, visible positions only. Returns the single term ``"loss"``.

    Reproducibility: each sample's mask comes from a ``torch.Generator`` seeded from
    ``(seed, training step, batch["index"])`` (``sample_seed``): the same on resume and on any
    number of devices; DDP ranks see different samples, hence different masks.

    Args:
        weight: multiplier of the loss.
        student_feature: student module whose output is regressed (tokens or map).
        teacher_feature: teacher module whose output is the target.
        student_prefix_tokens, teacher_prefix_tokens: prefix (CLS / distillation) tokens of a
            token feature; required for token features.
        mask_ratio: fraction of patches masked, in [0, 1) (DMAE and CLIP-KD's released MFD
            script: 0.75).
        patch_size: mask patch side in pixels of the batch image; must divide its height and
            width.
        adapter: learn ``r``; false compares the features as they are (equal shapes).
        loss: ``"mse"`` or ``"l1"``. normalize: L2-normalise each position's features first.
        seed: seed of the masks.
        masking: ``"pixels"`` or ``"tokens"`` (see above).
        token_module: with ``masking: tokens``, the student module after which masked tokens are
            dropped: ``patch_drop`` for timm ViTs, ``visual.patch_dropout`` for open_clip.
        task_view: what the task loss sees. ``"masked"``: the student's masked forward, the one
            distilled (no extra cost; the classifier then trains on masked views only).
            ``"full"``: a second student forward on the unmasked image, whose outputs only the
            task loss reads, so the classifier trains on the views it meets at test time (as
            DMAE's fine-tuning on whole images does, here within the same step). Costs one
            more student forward and backward per step.
    """

    who = "mfd"

    def __init__(self, weight: float = 1.0, student_feature: str = "layer3",
                 teacher_feature: str = "layer3", student_prefix_tokens: int | None = None,
                 teacher_prefix_tokens: int | None = None, mask_ratio: float = 0.5,
                 patch_size: int = 4, adapter: bool = True, loss: str = "mse",
                 normalize: bool = False, seed: int = 0, masking: str = "pixels",
                 token_module: str = "patch_drop", task_view: str = "masked"):
        super().__init__(weight, student_feature, teacher_feature, adapter, student_prefix_tokens,
                         teacher_prefix_tokens)
        if not 0 <= float(mask_ratio) < 1:
            raise KdkitError(f"mfd.mask_ratio must lie in [0, 1), got {mask_ratio}")
        if int(patch_size) < 1:
            raise KdkitError(f"mfd.patch_size must be a positive number of pixels, got {patch_size}")
        if loss not in ("mse", "l1"):
            raise KdkitError(f"mfd.loss must be 'mse' or 'l1', got {loss!r}")
        if masking not in ("pixels", "tokens"):
            raise KdkitError(f"mfd.masking must be 'pixels' or 'tokens', got {masking!r}")
        if task_view not in ("masked", "full"):
            raise KdkitError(f"mfd.task_view must be 'masked' or 'full', got {task_view!r}")
        self.task_view = task_view
        self.mask_ratio, self.patch_size = float(mask_ratio), int(patch_size)
        self.masking, self.token_module = masking, str(token_module)
        self.student_grid: tuple[int, int] | None = None  # masking: tokens, set by build
        self._tokens: VisibleTokens | None = None
        self.loss, self.normalize = loss, bool(normalize)
        self.seed = int(seed)

    @property
    def task_on_full_view(self) -> bool:
        return self.task_view == "full"

    def student_batch(self, batch: dict) -> dict:
        """A new batch: ``image`` with the masked patches zeroed, ``"mfd/visible"`` the mask."""
        image = batch.get("image")
        if not isinstance(image, Tensor) or image.dim() != 4:
            raise KdkitError("mfd masks image batches {'image': [B, C, H, W], ...}; this batch has "
                             f"{'no image' if image is None else f'image of shape {tuple(image.shape)}'}")
        if "index" not in batch:
            raise KdkitError("mfd seeds each sample's mask with batch['index'], which this batch lacks")
        height, width = image.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            fits = [d for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0]
            raise KdkitError(f"mfd.patch_size={p} does not divide the image size {height}x{width}; "
                             f"patch sizes that do: {fits}")
        grid = (height // p, width // p)
        if grid[0] * grid[1] - masked_count(grid[0] * grid[1], self.mask_ratio) < 1:
            raise KdkitError(f"mfd.mask_ratio={self.mask_ratio} masks all {grid[0]}x{grid[1]} patches "
                             f"of patch_size={p}: lower it or the patch size")
        visible = draw_visible(batch["index"], grid, self.mask_ratio, self.seed, self.progress[1])
        if self.masking == "tokens":
            if self._tokens is None:
                raise RuntimeError("mfd: build() must run (on a probe forward) before masking tokens")
            if grid != self.student_grid:
                raise KdkitError(f"mfd.patch_size={p} gives a {grid[0]}x{grid[1]} mask grid on {height}x{width} "
                                 f"images, but the student has a {self.student_grid[0]}x{self.student_grid[1]} "
                                 f"patch grid: masking: tokens needs patch_size={height // self.student_grid[0]}")
            # Indices, not the mask, travel to the device: gathering by them needs no host sync,
            # where boolean indexing on a GPU waits for its output size every step.
            n = grid[0] * grid[1]
            index = visible.flatten(1).nonzero()[:, 1].view(len(visible), n - masked_count(n, self.mask_ratio))
            index = index.to(image.device)
            self._tokens.keep(index)
            return {**batch, VISIBLE_KEY: visible.to(image.device), INDEX_KEY: index}
        visible = visible.to(image.device)
        pixels = visible.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)[:, None]
        return {**batch, "image": torch.where(pixels, image, torch.zeros((), dtype=image.dtype,
                                                                          device=image.device)),
                VISIBLE_KEY: visible}

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s, t = self.feature_pair(student, teacher, self.who)
        self._check_layouts(s, t)
        if self.masking == "pixels":
            return super().build(student, teacher, context)
        if s.dim() != 3:
            raise KdkitError(f"mfd.masking=tokens drops a ViT student's patch tokens, but student_feature "
                             f"{self.student_feature!r} is not tokens [N, D] (shape {tuple(s.shape[1:])}); "
                             "masking: pixels masks any student")
        self.student_grid = check_prefix(s.shape, self.prefix_tokens[0], self.who, "student", self.student_feature)
        width = as_map(t, self.prefix_tokens[1], self.who, "teacher", self.teacher_feature).shape[1]
        if self.use_adapter:
            self.adapter = nn.Linear(s.shape[-1], width).to(s.device)
        elif s.shape[-1] != width:
            raise KdkitError(f"mfd: student tokens of width {s.shape[-1]} cannot be compared with the teacher's "
                             f"{width} channels without an adapter (set adapter: true)")
        if context is None:
            raise KdkitError("mfd.masking=tokens needs the student network in the build context")
        if self._tokens is not None:
            self._tokens.remove()
        module = context.module("student", self.token_module, self.who)
        self._tokens = VisibleTokens(module, self.prefix_tokens[0], self.student_grid[0] * self.student_grid[1],
                                     self.who)

    def _check_layouts(self, s: Tensor, t: Tensor) -> None:
        if s.dim() not in (3, 4) or t.dim() not in (3, 4):
            raise KdkitError(
                f"mfd compares features position by position: [{self.student_feature}, "
                f"{self.teacher_feature}] must be tokens [N, D] or maps [C, H, W], got student shape "
                f"{tuple(s.shape[1:])} and teacher shape {tuple(t.shape[1:])}")

    def compared_maps(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        """The student feature through the adapter and the teacher feature, as maps of one size."""
        t = feature(teacher, self.teacher_feature, self.who)
        self._check_layouts(feature(student, self.student_feature, self.who), t)
        s_c, t_c = self.aligned(student, teacher)
        if s_c.dim() == 4:
            return s_c, t_c
        # Compared tokens keep the teacher's prefix when they are its whole sequence (equal
        # lengths: a linear adapter or none); the grid adapters already dropped it.
        prefix = self.prefix_tokens[1] if self.prefix_tokens[1] is not None else self.prefix_tokens[0]
        if t.dim() != 3 or t_c.shape[1] != t.shape[1]:
            prefix = 0
        return (as_map(s_c, prefix, self.who, "student", self.student_feature),
                as_map(t_c, prefix, self.who, "teacher", self.teacher_feature))

    def visible_token_pairs(self, student: Outputs, teacher: Outputs, index: Tensor) -> tuple[Tensor, Tensor]:
        """``masking: tokens``: the student's visible patch tokens through the adapter and the
        teacher's features at those patches (``index`` ``[B, keep]``: each row's visible patches,
        ascending), both ``[B, keep, C]`` in row-major patch order."""
        s = feature(student, self.student_feature, self.who)
        prefix = self.prefix_tokens[0]
        index = index.to(s.device)
        keep = index.shape[1]
        if s.dim() != 3 or s.shape[1] != prefix + keep:
            raise KdkitError(f"mfd: the student's {self.student_feature!r} has shape {tuple(s.shape[1:])}, not "
                             f"{prefix} prefix + {keep} visible tokens: is it computed after "
                             f"{self.token_module!r}, and did the student run on mfd.student_batch(batch)?")
        s = s[:, prefix:]
        if self.adapter is not None:
            s = self.adapter(s)
        t = feature(teacher, self.teacher_feature, self.who)
        t = map_to_tokens(resize_map(as_map(t, self.prefix_tokens[1], self.who, "teacher", self.teacher_feature),
                                     self.student_grid))
        return s, torch.gather(t, 1, index[..., None].expand(-1, -1, t.shape[2]))

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if VISIBLE_KEY not in batch:
            raise KdkitError(f"mfd: the batch has no {VISIBLE_KEY!r} mask: the student must be fed "
                             "mfd.student_batch(batch), as DistillationTask does in every training step")
        if self.masking == "tokens":
            s, t = self.visible_token_pairs(student, teacher, batch[INDEX_KEY])
            everywhere = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)[..., None]
            return {"loss": masked_feature_loss(s.transpose(1, 2)[..., None], t.transpose(1, 2)[..., None],
                                                everywhere, self.loss, self.normalize)}
        s, t = self.compared_maps(student, teacher)
        visible = visible_at(batch[VISIBLE_KEY].to(s.device), s.shape[-2:])
        return {"loss": masked_feature_loss(s, t, visible, self.loss, self.normalize)}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, mask_ratio={self.mask_ratio}, patch_size={self.patch_size}, "
                f"loss={self.loss!r}, normalize={self.normalize}, seed={self.seed}, masking={self.masking!r}, "
                f"task_view={self.task_view!r}")
