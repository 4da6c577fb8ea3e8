"""A tiny PyG node-classification dataset for the ``data=pyg`` tests (importable by Hydra as
``tests.datamodules.pyg_fixture.TinyNodes``): 60 nodes, 5 features, 3 classes."""

from __future__ import annotations

import torch
from torch_geometric.data import Data, InMemoryDataset

N, F, C = 60, 5, 3


def tiny_graph(num_splits: int | None = None, masks: bool = True, multilabel: bool = False,
               seed: int = 0) -> Data:
    """Three communities (class = community, features shifted by the class). Masks: [N] (train
    5 per class, val 15, test 30), [N, k] (each column a different draw), or none."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % C
    same = y[:, None] == y[None, :]
    adj = (same & (torch.rand(N, N, generator=g) < 0.3)) | (torch.rand(N, N, generator=g) < 0.02)
    adj = (adj | adj.T) & ~torch.eye(N, dtype=torch.bool)
    x = torch.rand(N, F, generator=g) + torch.nn.functional.one_hot(y, F).float()
    data = Data(x=x, edge_index=adj.nonzero().T.contiguous(),
                y=torch.nn.functional.one_hot(y, C).float() if multilabel else y)
    if masks:
        columns = [_draw(y, g) for _ in range(num_splits or 1)]
        for i, key in enumerate(("train_mask", "val_mask", "test_mask")):
            stacked = torch.stack([col[i] for col in columns], 1)
            data[key] = stacked if num_splits else stacked[:, 0]
    return data


def _draw(y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    train, val, test = (torch.zeros(N, dtype=torch.bool) for _ in range(3))
    for c in range(C):
        nodes = (y == c).nonzero().view(-1)[torch.randperm(N // C, generator=g)]
        train[nodes[:5]] = True
        val[nodes[5:10]] = True
        test[nodes[10:]] = True
    return train, val, test


class TinyNodes(InMemoryDataset):
    """``tiny_graph`` as a PyG dataset processed into ``root``; ``num_graphs`` > 1 repeats it."""

    def __init__(self, root: str, num_splits: int | None = None, masks: bool = True,
                 multilabel: bool = False, num_graphs: int = 1, transform=None):
        self.options = dict(num_splits=num_splits, masks=masks, multilabel=multilabel)
        self.num_graphs = num_graphs
        super().__init__(root, transform)
        self.load(self.processed_paths[0])

    @property
    def raw_file_names(self) -> list[str]:
        return []

    @property
    def processed_file_names(self) -> list[str]:
        tag = "_".join(f"{k}{v}" for k, v in self.options.items())
        return [f"tiny_{tag}_g{self.num_graphs}.pt"]

    def download(self) -> None:
        pass

    def process(self) -> None:
        self.save([tiny_graph(**self.options) for _ in range(self.num_graphs)], self.processed_paths[0])
