"""Labels and train / val / test masks of one node-classification graph.

``node_labels`` checks ``y`` (one class per node; ``-1`` marks an unlabelled node).
``pick_split`` reads the dataset's own masks: ``[N]`` (one split) or ``[N, k]`` (k splits, e.g.
the geom-gcn splits of WikipediaNetwork / WebKB / Actor; WikiCS mixes ``[N, 20]`` and ``[N]``).
``random_split`` draws one for datasets that ship none, as PyG's
``RandomNodeSplit(split="random")`` / ``Planetoid(split="random")`` do: ``num_train_per_class``
nodes of each class for training, then ``num_val`` and ``num_test`` of the other labelled nodes
(a count, or a float in (0, 1): that fraction of the labelled nodes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.errors import KdkitError

MASKS = ("train_mask", "val_mask", "test_mask")


def node_labels(y: Tensor, name: str) -> Tensor:
    """``y`` as class ids [N] (long); one line for multi-label or continuous targets."""
    if y.dim() > 1 and y.shape[-1] > 1:
        raise KdkitError(f"{name} has multi-label y of shape {list(y.shape)} ({y.shape[-1]} labels "
                         "per node): kdkit's node task is single-label classification (one class "
                         "per node); use a single-label dataset")
    y = y.reshape(-1)
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise KdkitError(f"{name} has continuous y (regression targets): kdkit's node task is "
                         "classification; use a dataset with integer class labels")
    return y.long()


def pick_split(masks: dict[str, Tensor], split: int | None, name: str) -> dict[str, Tensor]:
    """The ``split``-th column of ``[N, k]`` masks (``[N]`` masks serve every split)."""
    k = max(m.shape[1] if m.dim() > 1 else 1 for m in masks.values())
    if k == 1:
        if split not in (None, 0):
            raise KdkitError(f"data.split={split}, but {name} has one predefined split: "
                             "drop data.split (data.split=null)")
        return {key: m.reshape(-1).bool() for key, m in masks.items()}
    if split is None:
        raise KdkitError(f"{name} ships {k} splits ([N, {k}] masks): choose one with "
                         f"data.split=0..{k - 1}")
    if not 0 <= split < k:
        raise KdkitError(f"data.split={split}: {name} has {k} splits: use data.split=0..{k - 1}")
    return {key: (m[:, split] if m.dim() > 1 else m).bool().clone() for key, m in masks.items()}


def _count(value, labelled: int, key: str) -> int:
    if isinstance(value, float) and 0.0 < value < 1.0:
        return round(value * labelled)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise KdkitError(f"data.{key}={value}: give a node count >= 1 or a fraction in (0, 1)")


def random_split(y: Tensor, num_train_per_class: int, num_val: int | float,
                 num_test: int | float, seed: int, name: str) -> dict[str, Tensor]:
    """A seeded random split of the labelled nodes (``y >= 0``), as PyG's RandomNodeSplit."""
    labelled = (y >= 0).nonzero().view(-1)
    per_class = num_train_per_class
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise KdkitError(f"data.num_train_per_class={per_class}: give a node count >= 1")
    n_val = _count(num_val, labelled.numel(), "num_val")
    n_test = _count(num_test, labelled.numel(), "num_test")
    gen = torch.Generator().manual_seed(int(seed))
    masks = {key: torch.zeros_like(y, dtype=torch.bool) for key in MASKS}
    for c in y[labelled].unique().tolist():
        nodes = labelled[y[labelled] == c]
        masks["train_mask"][nodes[torch.randperm(nodes.numel(), generator=gen)[:per_class]]] = True
    rest = labelled[~masks["train_mask"][labelled]]
    rest = rest[torch.randperm(rest.numel(), generator=gen)]
    masks["val_mask"][rest[:n_val]] = True
    masks["test_mask"][rest[n_val:n_val + n_test]] = True
    empty = [key for key in MASKS if not masks[key].any()]
    if empty:
        raise KdkitError(
            f"{name} has no {'/'.join(MASKS)}, and a random split of its {labelled.numel()} labelled "
            f"nodes (data.num_train_per_class={num_train_per_class}, data.num_val={num_val}, "
            f"data.num_test={num_test}) leaves {' and '.join(empty)} empty: lower them, e.g. "
            "data.num_train_per_class=5 data.num_val=0.2 data.num_test=0.2")
    return masks


def graph_masks(data, y: Tensor, name: str, split: int | None, **random) -> dict[str, Tensor]:
    """train / val / test masks [N] of ``data``: its own (column ``split``) or a random draw
    (``random``: ``random_split``'s counts and seed); only labelled nodes are kept in them."""
    shipped = {key: getattr(data, key) for key in MASKS if getattr(data, key, None) is not None}
    if not shipped:
        if split is not None:
            raise KdkitError(f"data.split={split}, but {name} ships no split (kdkit draws a "
                             "random one): drop data.split (data.split=null)")
        return random_split(y, name=name, **random)
    if len(shipped) < len(MASKS):
        missing = ", ".join(key for key in MASKS if key not in shipped)
        raise KdkitError(f"{name} has {', '.join(shipped)} but no {missing}: add all three with "
                         "+data.dataset.transform._target_=torch_geometric.transforms.RandomNodeSplit")
    masks = pick_split(shipped, split, name)
    return {key: m & (y >= 0) for key, m in masks.items()}
