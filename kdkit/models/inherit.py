"""Weight inheritance: start a smaller vision-transformer student from its teacher's weights.

Two ideas, usable together:

- **Block selection** (depth): the student's blocks are copies of chosen teacher blocks, in order,
  as DistilBERT (Sanh et al. 2019) initialises its 6-layer student with one layer out of two of
  BERT (kdkit's text students do the same with ``keep_layers`` / ``from_teacher_layers`` in
  ``kdkit.models.text``).
- **Width slicing**: TinyCLIP's *manual inheritance* (Wu et al., ICCV 2023): a narrower student
  takes the leading slice of each teacher tensor along the dimensions that are smaller in it
  (embedding width ``D``, attention heads, MLP width). Heads are kept *whole*: with teacher
  ``H_t`` heads of ``head_dim`` and student ``H_s`` heads of the same ``head_dim``, the fused
  ``qkv`` weight ``[3 H_t head_dim, D_t]`` becomes ``[3 H_s head_dim, D_s]`` by keeping the first
  ``H_s`` heads of each of q, k and v (not the first ``3 H_s head_dim`` rows) and the first ``D_s``
  input columns; the output projection keeps the first ``H_s`` heads' input columns and the first
  ``D_s`` output rows. TinyCLIP also learns which heads / channels to keep (*automatic*
  inheritance, with masks); that is not implemented here: the leading ones are kept.

Supported towers: timm ``VisionTransformer`` and its subclasses (``VisionTransformerDistilled``
included) and open_clip's visual ``VisionTransformer``, alone or as the one ViT inside a wrapper
(e.g. a classifier with ``visual`` and ``head``). Tensors of the wrapper outside the tower are
inherited when the teacher has a tensor of the same name (the teacher's path may carry an extra
prefix, e.g. ``model.`` of a ``FrozenTeacher``) and its dims are equal or are the embedding width.

Configure it on the student (the run calls ``inherit(student, teacher, **cfg.student.init)`` once
both models exist)::

    student:
      init:              # weight inheritance from the teacher (null: the model's own init)
        blocks: every    # or first, last, or a list of teacher block indices, e.g. [0, 2, 5]
        width: first     # leading slices of wider teacher tensors (whole heads); null: equal widths

``blocks: every`` with teacher depth ``T`` and student depth ``S`` takes the *last* block of each
of ``S`` equal groups, teacher blocks ``ceil((j + 1) T / S) - 1`` for ``j = 0..S-1``; when ``S``
divides ``T`` that is every ``k``-th block with ``k = T / S``, ending at the teacher's last block
(teacher 6, student 3 -> ``[1, 3, 5]``). The last teacher block is always kept because the final
norm and head were trained on its output. The student's patch grid and prefix tokens must allow a
row-by-row match of the position embedding (same patch and image size). A student tensor with no
teacher counterpart (a ``dist_token`` the teacher lacks, a head with another class count) keeps
its own init and is listed in ``InheritReport.kept``. Everything is checked before the first copy,
so an error leaves the student untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError, close_names

BLOCK_CHOICES = ("every", "first", "last")
WIDTH_CHOICES = ("first", None)

# Role of each dim of a tensor: "D" embedding width, "A" attention width (heads x head_dim),
# "M" MLP hidden width, "H" head count (all four: leading slice); QKV: three chunks of "A", each
# sliced alone; "=" must be equal (else an error), "K" must be equal (else the tensor keeps its
# init: class count, output embedding width), "T" position-embedding rows (matched by token kind).
QKV = ("chunks", 3, "A")
Index = slice | list  # per student dim: a slice of the teacher dim, or teacher indices (None: init)


@dataclass
class InheritReport:
    """What ``inherit`` did.

    Attributes:
        copied: student parameter name -> (teacher parameter name, index per dim): a ``slice`` of
            the teacher dim, or a list of teacher indices (``None`` entries: rows that keep the
            student's init, e.g. a ``dist_token``'s position embedding row).
        kept: student parameters left at their own init.
        blocks: the teacher block index of each student block, in order.
        reasons: why each kept parameter was kept.
    """

    copied: dict[str, tuple[str, tuple[Index, ...]]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def partly(self) -> list[str]:
        """Copied parameters with some rows left at the student's init."""
        return [name for name, (_, index) in self.copied.items()
                if any(isinstance(ix, list) and None in ix for ix in index)]

    def __str__(self) -> str:
        total = len(self.copied) + len(self.kept)
        kept = ", ".join(self.kept[:8]) + (f" (+{len(self.kept) - 8} more)" if len(self.kept) > 8 else "")
        line = (f"inherited {len(self.copied)} of {total} tensors from teacher blocks {self.blocks}; "
                f"kept at init: {kept or 'none'}")
        partly = self.partly
        return line + (f"; partly inherited: {', '.join(partly)}" if partly else "")


@dataclass
class _Tower:
    """One ViT and the facts inheritance needs about it."""

    family: str
    path: str  # dotted path of the tower in its model ("" = the model itself)
    module: nn.Module
    blocks_path: str  # relative to the tower
    rules: dict  # tower-level parameter name (relative) -> roles
    tokens: list[str]  # kind of each position-embedding row ("cls", "dist", "reg0", "p0", ...)
    grid: tuple
    patch: tuple
    image: tuple

    @property
    def blocks(self) -> nn.ModuleList:
        return self.module.get_submodule(self.blocks_path)

    @property
    def width(self) -> int:
        return int(self.module.embed_dim if self.family == "timm" else self.module.transformer.width)

    def describe(self) -> str:
        return f"{self.family} VisionTransformer at {self.path or '<root>'}"


def inherit(student: nn.Module, teacher: nn.Module, blocks="every", width="first") -> InheritReport:
    """Copy chosen teacher blocks and leading width slices of teacher tensors into ``student``.

    Copies under ``torch.no_grad()`` with ``Tensor.copy_`` into the student's own parameters, so
    their objects, dtypes and devices stay; the teacher is only read.

    Args:
        student: a ViT (timm or open_clip visual tower) or a module holding exactly one.
        teacher: a ViT of the same family, or a module holding exactly one (a whole CLIP model,
            a ``FrozenTeacher``); at least as deep and as wide as the student.
        blocks: teacher block index of each student block: a list as long as the student's
            depth, or "every" (the last block of each of ``S`` equal groups: every ``T/S``-th block
            ending at the last), "first" (blocks ``0..S-1``), "last" (the last ``S`` blocks).
        width: "first" (leading slices of every dim that is narrower in the student, whole heads)
            or None (every width must be equal).

    Returns:
        An ``InheritReport``: what was copied from where, what kept its init, the blocks used.

    Raises:
        KdkitError: no (or several) ViTs, towers of different families, bad ``blocks`` /
            ``width``, different patch grids, a student wider than the teacher, different
            ``head_dim``, or (``width=None``) different widths.
    """
    s_tower = _find_tower(student, "student")
    t_tower = _find_tower(teacher, "teacher")
    if s_tower.family != t_tower.family:
        raise KdkitError(f"the student is a {s_tower.describe()} but the teacher a {t_tower.describe()}: "
                         "inherit copies between towers of the same family")
    if isinstance(width, str) and width.lower() in ("none", "null"):
        width = None
    if width not in WIDTH_CHOICES:
        raise KdkitError(f"width={width!r}: use 'first' (leading slices, whole heads) or null (equal widths)")
    chosen = choose_blocks(blocks, len(t_tower.blocks), len(s_tower.blocks))
    _check_grid(s_tower, t_tower)
    pairs = [_block_widths(s_tower, t_tower, j, i, width) for j, i in enumerate(chosen)]
    tower_widths = {"D": (t_tower.width, s_tower.width)}

    t_params = dict(teacher.named_parameters())
    # Tensors outside the tower are looked up under the teacher's extra prefix, if any.
    outer = _outer_prefix(s_tower.path, t_tower.path)
    report = InheritReport(blocks=list(chosen))
    plan = []
    s_prefix = s_tower.path + "." if s_tower.path else ""
    t_prefix = t_tower.path + "." if t_tower.path else ""
    block_prefix = s_prefix + s_tower.blocks_path + "."
    tokens = (s_tower.tokens, t_tower.tokens)
    for name, param in student.named_parameters():
        if name.startswith(block_prefix):
            number, _, rest = name[len(block_prefix):].partition(".")
            j = int(number)
            t_name = f"{t_prefix}{t_tower.blocks_path}.{chosen[j]}.{rest}"
            rules = _block_rules(s_tower, s_tower.blocks[j])
            widths, rel = pairs[j], rest
        elif s_prefix == "" or name.startswith(s_prefix):
            rel = name[len(s_prefix):]
            t_name = t_prefix + rel
            rules, widths = s_tower.rules, tower_widths
        else:  # a wrapper's own tensor, outside the tower
            rel, t_name, rules, widths = None, outer + name, {}, tower_widths
        source = t_params.get(t_name)
        if source is None:
            _keep(report, name, f"the teacher has no {t_name}")
            continue
        roles = rules.get(rel) if rel is not None else None
        index, why = _indices(name, param, t_name, source, roles, widths, tokens)
        if index is None:
            _keep(report, name, why)
            continue
        report.copied[name] = (t_name, index)
        plan.append((param, source, index))
    with torch.no_grad():
        for param, source, index in plan:
            _copy(param, source, index)
    return report


def choose_blocks(blocks, teacher_depth: int, student_depth: int) -> list[int]:
    """Teacher block index of each student block (see ``inherit``'s ``blocks``)."""
    depths = f"student depth {student_depth}, teacher depth {teacher_depth}"
    if student_depth > teacher_depth:
        raise KdkitError(f"the student has more blocks than the teacher ({depths}): "
                         "inheritance needs a student at most as deep as its teacher")
    if isinstance(blocks, str):
        if blocks == "every":
            return [-(-(j + 1) * teacher_depth // student_depth) - 1 for j in range(student_depth)]
        if blocks == "first":
            return list(range(student_depth))
        if blocks == "last":
            return list(range(teacher_depth - student_depth, teacher_depth))
        raise KdkitError(f"blocks={blocks!r}: use {', '.join(BLOCK_CHOICES)} or a list of teacher block "
                         f"indices (closest: {close_names(blocks, BLOCK_CHOICES, n=1)})")
    try:
        chosen = list(blocks)  # a list, tuple or OmegaConf ListConfig
    except TypeError:
        raise KdkitError(f"blocks={blocks!r}: use {', '.join(BLOCK_CHOICES)} or a list of "
                         f"{student_depth} teacher block indices ({depths})") from None
    if any(isinstance(i, bool) or not isinstance(i, int) for i in chosen):
        raise KdkitError(f"blocks={chosen}: teacher block indices must be integers ({depths})")
    if len(chosen) != student_depth:
        raise KdkitError(f"blocks={chosen} has {len(chosen)} entries but the student has {student_depth} "
                         f"blocks (teacher depth {teacher_depth}): give one teacher index per student block")
    bad = [i for i in chosen if not 0 <= i < teacher_depth]
    if bad:
        raise KdkitError(f"blocks={chosen}: {bad} out of range 0..{teacher_depth - 1} ({depths})")
    if len(set(chosen)) != len(chosen):
        repeated = sorted({i for i in chosen if chosen.count(i) > 1})
        raise KdkitError(f"blocks={chosen} repeats teacher block(s) {repeated} ({depths}): give distinct indices")
    return chosen


# ---- finding and describing towers --------------------------------------------------------------
def _vit_classes() -> dict:
    found = {}
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        found["timm"] = TimmViT
    except ImportError:  # the family is just unavailable
        pass
    try:
        from open_clip.transformer import VisionTransformer as ClipViT

        found["open_clip"] = ClipViT
    except ImportError:
        pass
    return found


def _find_tower(model: nn.Module, role: str) -> _Tower:
    classes = _vit_classes()
    hits = [(path, module, family) for path, module in model.named_modules()
            for family, cls in classes.items() if isinstance(module, cls)]
    if not hits:
        children = ", ".join(f"{n} ({type(m).__name__})" for n, m in model.named_children()) or "none"
        first = next(iter(model.named_parameters()), None)
        shape = f"; first parameter {first[0]} {list(first[1].shape)}" if first else ""
        raise KdkitError(f"the {role} {type(model).__name__} (children: {children}{shape}) holds no vision "
                         "transformer: weight inheritance needs a timm or open_clip VisionTransformer")
    if len(hits) > 1:
        where = ", ".join(p or "<root>" for p, _, _ in hits)
        raise KdkitError(f"the {role} holds {len(hits)} vision transformers (at {where}): inherit needs exactly one")
    path, vit, family = hits[0]
    return _timm_tower(path, vit) if family == "timm" else _open_clip_tower(path, vit)


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value, value)


def _timm_tower(path: str, vit: nn.Module) -> _Tower:
    D = ("D",)
    rules = {"cls_token": ("=", "=", "D"), "dist_token": ("=", "=", "D"), "reg_token": ("=", "K", "D"),
             "pos_embed": ("=", "T", "D"), "patch_embed.proj.weight": ("D", "=", "=", "="),
             "head.weight": ("K", "D"), "head.bias": ("K",),
             "head_dist.weight": ("K", "D"), "head_dist.bias": ("K",)}
    rules["patch_embed.proj.bias"] = D
    for norm in ("patch_embed.norm", "norm_pre", "norm", "fc_norm"):
        rules[f"{norm}.weight"] = rules[f"{norm}.bias"] = D
    pe = vit.patch_embed
    grid, patch = _pair(pe.grid_size), _pair(pe.patch_size)
    prefix = []
    if not getattr(vit, "no_embed_class", False):
        # the order of the prefix tokens in _pos_embed: cls, dist (DeiT), registers
        prefix += ["cls"] if getattr(vit, "cls_token", None) is not None else []
        prefix += ["dist"] if getattr(vit, "dist_token", None) is not None else []
        reg = getattr(vit, "reg_token", None)
        prefix += [f"reg{r}" for r in range(reg.shape[1])] if reg is not None else []
    tokens = prefix + [f"p{n}" for n in range(grid[0] * grid[1])]
    return _Tower("timm", path, vit, "blocks", rules, tokens, grid, patch,
                  (grid[0] * patch[0], grid[1] * patch[1]))


def _open_clip_tower(path: str, vit: nn.Module) -> _Tower:
    rules = {"conv1.weight": ("D", "=", "=", "="), "class_embedding": ("D",),
             "positional_embedding": ("T", "D"), "ln_pre.weight": ("D",), "ln_pre.bias": ("D",)}
    if getattr(vit, "attn_pool", None) is None:  # else ln_post / proj act on the pooler's width
        rules.update({"ln_post.weight": ("D",), "ln_post.bias": ("D",), "proj": ("D", "K")})
    grid, patch = _pair(vit.grid_size), _pair(vit.patch_size)
    tokens = ["cls"] + [f"p{n}" for n in range(grid[0] * grid[1])]
    return _Tower("open_clip", path, vit, "transformer.resblocks", rules, tokens, grid, patch,
                  _pair(vit.image_size))


def _block_rules(tower: _Tower, block: nn.Module) -> dict:
    """Roles of a block's parameters (names relative to the block)."""
    D, A, M = ("D",), ("A",), ("M",)
    rules = {}

    def norm(*names, role=D):
        for n in names:
            rules[f"{n}.weight"] = rules[f"{n}.bias"] = role

    def linear(n, out, inp):
        rules[f"{n}.weight"], rules[f"{n}.bias"] = (out, inp), (out,)

    if tower.family == "timm":
        norm("norm1", "norm2")
        rules["ls1.gamma"] = rules["ls2.gamma"] = D
        linear("attn.qkv", QKV, "D")
        for n in ("attn.q", "attn.k", "attn.v", "attn.gate"):
            linear(n, "A", "D")
        norm("attn.q_norm", "attn.k_norm", role=("=",))  # over head_dim, equal by construction
        norm("attn.norm", role=A)
        linear("attn.proj", "D", "A")
        fc1, fc2 = getattr(block.mlp, "fc1", None), getattr(block.mlp, "fc2", None)
        glu = fc1 is not None and fc2 is not None and fc1.out_features == 2 * fc2.in_features
        linear("mlp.fc1", ("chunks", 2, "M") if glu else "M", "D")  # GluMlp: [value; gate] halves
        linear("mlp.fc1_g", "M", "D")  # SwiGLU
        linear("mlp.fc1_x", "M", "D")
        norm("mlp.norm", role=M)
        linear("mlp.fc2", "D", "M")
    else:
        norm("ln_1", "ln_2", "ln_attn")
        rules["ls_1.gamma"] = rules["ls_2.gamma"] = D
        rules["attn.in_proj_weight"], rules["attn.in_proj_bias"] = (QKV, "D"), (QKV,)
        linear("attn.out_proj", "D", "A")
        norm("attn.ln_q", "attn.ln_k", role=("=",))
        norm("attn.ln_inner", role=A)
        rules["attn.head_scale"] = rules["attn.logit_scale"] = ("H", "=", "=")
        linear("mlp.c_fc", "M", "D")
        norm("mlp.ln", role=M)
        linear("mlp.c_proj", "D", "M")
    return rules


def _heads(block: nn.Module) -> tuple[int, int]:
    """(num_heads, head_dim) of a block's attention."""
    attn = getattr(block, "attn", None)
    if attn is None or not hasattr(attn, "num_heads"):
        raise KdkitError(f"{type(block).__name__} blocks have no attention module with num_heads: "
                         "inherit knows timm Block / open_clip ResidualAttentionBlock layouts")
    heads = int(attn.num_heads)
    head_dim = int(getattr(attn, "head_dim", 0) or 0)
    if not head_dim:  # older layouts: from the fused projection [3 * heads * head_dim, D]
        fused = getattr(attn, "in_proj_weight", None)
        fused = fused if fused is not None else attn.qkv.weight
        head_dim = fused.shape[0] // 3 // heads
    return heads, head_dim


def _mlp_width(block: nn.Module) -> int | None:
    for name in ("fc2", "c_proj"):
        layer = getattr(getattr(block, "mlp", None), name, None)
        if isinstance(layer, nn.Linear):
            return int(layer.in_features)
    return None


def _block_widths(s: _Tower, t: _Tower, j: int, i: int, width) -> dict:
    """(teacher, student) size of each width role of student block ``j`` <- teacher block ``i``."""
    Ds, Dt = s.width, t.width
    Hs, hds = _heads(s.blocks[j])
    Ht, hdt = _heads(t.blocks[i])
    Ms, Mt = _mlp_width(s.blocks[j]), _mlp_width(t.blocks[i])
    layout = (f"student block {j}: width {Ds}, {Hs} heads x head_dim {hds}, MLP {Ms}; "
              f"teacher block {i}: width {Dt}, {Ht} heads x head_dim {hdt}, MLP {Mt}")
    if width is None:
        if (Ds, Hs, hds, Ms) != (Dt, Ht, hdt, Mt):
            raise KdkitError(f"width=null needs equal widths but they differ ({layout}); "
                             "use width: first to take leading slices of the teacher")
    if Ds > Dt:
        raise KdkitError(f"the student is wider than the teacher ({layout}): "
                         "inheritance slices teacher tensors, so the student width must be <= the teacher's")
    if hds != hdt:
        fit = (f"num_heads={Ds // hdt} for the student's width {Ds}" if Ds % hdt == 0
               else f"a student width that is a multiple of {hdt}")
        raise KdkitError(f"head_dim differs ({layout}): whole teacher heads need the teacher's head_dim "
                         f"{hdt}; use {fit}")
    if Hs > Ht:
        raise KdkitError(f"the student has more heads than the teacher ({layout})")
    if Ms is not None and Mt is not None and Ms > Mt:
        raise KdkitError(f"the student's MLP is wider than the teacher's ({layout})")
    widths = {"D": (Dt, Ds), "A": (Ht * hdt, Hs * hds), "H": (Ht, Hs)}
    if Ms is not None and Mt is not None:
        widths["M"] = (Mt, Ms)
    return widths


def _check_grid(s: _Tower, t: _Tower) -> None:
    if (s.grid, s.patch) != (t.grid, t.patch):
        def grid(tw):
            return (f"{tw.grid[0]}x{tw.grid[1]} patches of {tw.patch[0]}x{tw.patch[1]} px "
                    f"({tw.image[0]}x{tw.image[1]} images, {len(tw.tokens)} position rows)")

        raise KdkitError(f"patch grids differ: student {grid(s)} vs teacher {grid(t)}; inheritance maps "
                         "patch embeddings and position embeddings one to one: use the teacher's "
                         "patch size and image size")


def _outer_prefix(s_path: str, t_path: str) -> str:
    """The teacher's extra prefix in front of the student's path (``model.`` of a FrozenTeacher)."""
    s_parts, t_parts = s_path.split(".") if s_path else [], t_path.split(".") if t_path else []
    if len(t_parts) >= len(s_parts) and t_parts[len(t_parts) - len(s_parts):] == s_parts:
        extra = t_parts[:len(t_parts) - len(s_parts)]
        return ".".join(extra) + "." if extra else ""
    return ""


# ---- per-tensor index computation ---------------------------------------------------------------
def _keep(report: InheritReport, name: str, why: str) -> None:
    report.kept.append(name)
    report.reasons[name] = why


def _indices(name, param, t_name, source, roles, widths, tokens):
    """(index per dim, None) to copy, or (None, reason) to keep the student's init."""
    s_shape, t_shape = tuple(param.shape), tuple(source.shape)
    shapes = f"student {name} {list(s_shape)} vs teacher {t_name} {list(t_shape)}"
    if len(s_shape) != len(t_shape):
        return None, f"{shapes}: different ranks"
    if roles is None or len(roles) != len(s_shape):
        return _inferred(s_shape, t_shape, widths, shapes)
    index = []
    for dim, (role, s, t) in enumerate(zip(roles, s_shape, t_shape, strict=True)):
        if role == "=":
            if s != t:
                raise KdkitError(f"{shapes}: dim {dim} must be equal ({s} vs {t})")
            index.append(slice(0, s))
        elif role == "K":
            if s != t:
                return None, f"{shapes}: dim {dim} differs ({s} vs {t}), not a width the student can slice"
            index.append(slice(0, s))
        elif role == "T":
            index.append(_token_map(tokens, s, t, shapes))
        elif isinstance(role, tuple):  # ("chunks", n, sub-role): fused projections
            _, n, _ = role
            if s % n or t % n or s > t:
                raise KdkitError(f"{shapes}: dim {dim} holds {n} fused parts; the student's must be "
                                 f"as wide or narrower ({s} vs {t})")
            index.append([c * (t // n) + k for c in range(n) for k in range(s // n)])
        else:  # a width: leading slice
            if s > t:
                raise KdkitError(f"{shapes}: dim {dim} ({role}) is wider in the student ({s} > {t})")
            index.append(slice(0, s))
    return tuple(index), None


def _inferred(s_shape, t_shape, widths, shapes):
    """Unknown tensors: equal dims are copied whole, a known width pair is sliced, else keep."""
    pairs = set(widths.values())
    index = []
    for dim, (s, t) in enumerate(zip(s_shape, t_shape, strict=True)):
        if s == t or (t, s) in pairs:
            index.append(slice(0, s))
        else:
            return None, f"{shapes}: dim {dim} ({s} vs {t}) is not a width kdkit knows how to slice"
    return tuple(index), None


def _token_map(tokens, s: int, t: int, shapes: str) -> slice | list:
    s_tokens, t_tokens = tokens
    if len(s_tokens) != s or len(t_tokens) != t:
        raise KdkitError(f"{shapes}: expected {len(s_tokens)} and {len(t_tokens)} position rows "
                         "(prefix tokens + patches)")
    where = {kind: i for i, kind in enumerate(t_tokens)}
    index = [where.get(kind) for kind in s_tokens]
    return slice(0, s) if index == list(range(s)) else index


def _copy(param: Tensor, source: Tensor, index: tuple) -> None:
    value = source.detach()
    partial = None
    for dim, ix in enumerate(index):
        if isinstance(ix, slice):
            value = value.narrow(dim, ix.start, ix.stop - ix.start)
            continue
        rows = [k for k, i in enumerate(ix) if i is not None]
        picks = torch.tensor([i for i in ix if i is not None], dtype=torch.long, device=value.device)
        value = value.index_select(dim, picks)
        if len(rows) != len(ix):
            partial = (dim, rows)
    if partial is None:
        param.copy_(value)
    else:
        dim, rows = partial
        param.index_copy_(dim, torch.tensor(rows, dtype=torch.long, device=param.device),
                          value.to(device=param.device, dtype=param.dtype))
