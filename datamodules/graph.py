"""One graph, node classification: any PyG dataset, transductive or inductive (GLNN protocol)."""

from __future__ import annotations

import os
import pickle
import shutil
import traceback
import zlib
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdkit.datamodules.archives import CORRUPT_HINT, file_error, warn_cached
from kdkit.errors import KdkitError

SETTINGS = ("transductive", "inductive")
MASKS = ("train_mask", "val_mask", "test_mask")
# What a dataset raises on a damaged file: OSError (unreadable), EOFError and UnpicklingError
# (truncated or garbage pickles), UnicodeDecodeError and ValueError (text files that do not
# parse), RuntimeError (torch.load of a damaged processed file), zlib.error.
FILE_ERRORS = (OSError, EOFError, pickle.UnpicklingError, ValueError, RuntimeError, zlib.error)


def _file_in_traceback(exc: BaseException) -> Path | None:
    """The file that the innermost failing reader had in hand (a frame's ``path``, ``filename``,
    ... local, or an open file's name), to name it in the error; None if there is none."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        for key in ("path", "filename", "file", "fname", "f", "fp", "fh"):
            value = frame.f_locals.get(key)
            value = getattr(value, "name", value)  # an open file: its path
            if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
                found = Path(value)
                break
    return found


class _OneBatch(Dataset):
    """A dataset of one item: the graph batch (a loader over it yields it once per epoch)."""

    def __init__(self, batch: dict[str, Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.batch


class GraphDataModule(L.LightningDataModule):
    """Full-batch node classification on one graph from any PyG dataset.

    Every batch is a whole graph, as a dict of tensors: ``x`` [N, F], ``edge_index`` [2, E],
    ``y`` [N], boolean ``train_mask`` / ``val_mask`` / ``test_mask`` [N], and ``index`` [N]
    (each node's id in the original graph). A loader yields that one batch per epoch.

    Settings (Zhang et al. 2022, GLNN, Sec. 5):

    - ``transductive``: train, validate and test on the full graph with its predefined split.
    - ``inductive``: a fraction ``inductive_rate`` of the test nodes (drawn with ``split_seed``)
      is held out with every edge touching it. Training and validation batches are the
      *observed* graph (all other nodes, relabelled ``0..N_obs-1``; ``index`` keeps the original
      ids), so neither the teacher nor the student ever sees a held-out node. The test batch is
      the full graph with ``test_mask`` = the held-out nodes and ``observed_test_mask`` = the
      remaining (observed) test nodes.

    Teacher outputs on a batch never change (the graph is static): ``static_for_teacher`` says
    so to the teacher-output cache.

    Args:
        dataset: the PyG dataset, or a callable building it (a Hydra node with
            ``_partial_: true``, e.g. ``torch_geometric.datasets.Planetoid`` with ``root`` and
            ``name``); called only after the raw files are in place.
        raw_src: folder of raw files to copy into ``raw_dst`` before PyG processes them (the
            offline copy, e.g. ``$KDKIT_DATA_DIR/planetoid/Cora/raw``); when it does not exist
            PyG downloads as usual.
        raw_dst: the dataset's own ``raw_dir`` (for Planetoid: ``<root>/<name>/raw``).
        setting: "transductive" or "inductive".
        split: which column of ``[N, k]`` masks to use when the dataset ships k splits.
        inductive_rate: fraction of test nodes held out in the inductive setting (GLNN: 0.2).
        split_seed: seed of the held-out draw.
        normalize_features: row-normalise (non-negative, e.g. bag-of-words) node features to
            sum 1 (Kipf & Welling 2017; the DGL citation datasets that GLNN and FF-G2M load are
            normalised this way).
        sparse_features: store ``x`` as a sparse CSR tensor. Bag-of-words features are ~1%
            nonzero, and the first layer of ``kdkit.models.gnn`` models then does about 10x less
            work on a CPU; keep False for dense features or models that need dense input.
        num_classes, num_features: what the configs promise the models; checked against the
            data at setup.
    """

    static_for_teacher = True

    def __init__(self, dataset, raw_src: str | None = None, raw_dst: str | None = None,
                 setting: str = "transductive", split: int = 0, inductive_rate: float = 0.2,
                 split_seed: int = 0, normalize_features: bool = True,
                 sparse_features: bool = False, num_classes: int | None = None,
                 num_features: int | None = None):
        super().__init__()
        if setting not in SETTINGS:
            raise KdkitError(f"data.setting={setting!r}: use one of {', '.join(SETTINGS)}")
        if not 0.0 < inductive_rate < 1.0:
            raise KdkitError(f"data.inductive_rate={inductive_rate} must be in (0, 1)")
        self.dataset_factory = dataset
        self.raw_src = Path(raw_src) if raw_src else None
        self.raw_dst = Path(raw_dst) if raw_dst else None
        self.setting = setting
        self.split = int(split)
        self.inductive_rate = float(inductive_rate)
        self.split_seed = int(split_seed)
        self.normalize_features = normalize_features
        self.sparse_features = sparse_features
        self.expected = {"num_classes": num_classes, "num_features": num_features}
        self.batches: dict[str, dict[str, Tensor]] | None = None

    # ---- data on disk -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._copy_raw()
        self._load()  # lets PyG process once, on one process

    def _copy_raw(self) -> None:
        if self.raw_src is None or self.raw_dst is None:
            return
        sources = sorted(p for p in self.raw_src.iterdir() if p.is_file()) if self.raw_src.is_dir() else []
        if not sources:
            if self.raw_dst.is_dir() and any(p.is_file() for p in self.raw_dst.iterdir()):
                warn_cached(self.raw_src, self.raw_dst, "graph raw files")  # a warm cache stands in
            return
        self.raw_dst.mkdir(parents=True, exist_ok=True)
        for src in sources:
            dst = self.raw_dst / src.name
            if not dst.exists():
                if src.stat().st_size == 0:
                    raise file_error(src, "graph raw file", "empty file")
                try:
                    open(src, "rb").close()  # unreadable source: name it (not the cache)
                except OSError as err:
                    raise file_error(src, "graph raw file", err) from None
                tmp = dst.with_name(dst.name + ".part")
                shutil.copyfile(src, tmp)
                tmp.replace(dst)  # atomic: a crash never leaves a truncated raw file

    def _damaged(self, path: Path, exc: BaseException) -> KdkitError:
        """The one-line error for a data file the dataset could not read."""
        hint = CORRUPT_HINT
        if self.raw_dst is not None and path.resolve().parent == self.raw_dst.resolve():
            src = self.raw_src / path.name if self.raw_src is not None else None
            again = f" (kdkit copies {src} again)" if src is not None and src.is_file() else ""
            hint = (f"it is corrupt or truncated: delete it{again}, and re-download the dataset "
                    "if that fails too")
        elif path.parent.name == "processed":
            hint = "it is corrupt or truncated: delete it, and the raw files are processed again"
        return file_error(path, "graph data file", exc, hint)

    def _load(self):
        if not callable(self.dataset_factory):
            return self.dataset_factory
        try:
            return self.dataset_factory()
        except Exception as exc:  # offline download failure, missing or damaged files
            path = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
            if path is not None and os.path.exists(path):  # e.g. a directory where a file belongs
                path = Path(path)
            else:
                path = _file_in_traceback(exc) if isinstance(exc, FILE_ERRORS) else None
            if path is not None:
                raise self._damaged(path, exc) from exc
            where = self.raw_src or "data.raw_src"
            first = (str(exc).strip().splitlines() or [""])[0]
            raise KdkitError(
                f"could not load the graph dataset ({type(exc).__name__}: {first}); put its raw "
                f"files in {where} (set KDKIT_DATA_DIR) or go online so PyG can download them"
            ) from exc

    # ---- batches ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.batches is not None:
            return
        self._copy_raw()
        graph = self._graph(self._load())
        if self.setting == "transductive":
            self.batches = {"train": graph, "val": graph, "test": graph}
        else:
            observed, full = self._inductive(graph)
            self.batches = {"train": observed, "val": observed, "test": full}
        if self.sparse_features:  # after the split: slicing rows is simpler on dense tensors
            for batch in {id(b): b for b in self.batches.values()}.values():
                batch["x"] = batch["x"].to_sparse_csr()

    def _graph(self, dataset) -> dict[str, Tensor]:
        data = dataset[0]
        for key in ("x", "y", "edge_index", *MASKS):
            if getattr(data, key, None) is None:
                raise KdkitError(f"{type(dataset).__name__} has no `{key}`: a node classification "
                                 f"dataset with predefined {', '.join(MASKS)} is needed")
        x = data.x.float()
        if self.normalize_features:
            x = x / x.sum(dim=1, keepdim=True).clamp(min=1e-12)
        y = data.y.view(-1).long()
        graph = {"x": x, "edge_index": data.edge_index.long(), "y": y,
                 "index": torch.arange(x.shape[0])}
        for key in MASKS:
            graph[key] = self._pick_split(getattr(data, key), key)
        self._check(graph, dataset)
        return graph

    def _pick_split(self, mask: Tensor, key: str) -> Tensor:
        mask = mask.bool()
        if mask.dim() == 1:
            if self.split != 0:
                raise KdkitError(f"data.split={self.split}, but the dataset has one predefined "
                                 f"split: use data.split=0")
            return mask
        if not 0 <= self.split < mask.shape[1]:
            raise KdkitError(f"data.split={self.split}: the dataset has {mask.shape[1]} splits "
                             f"(0..{mask.shape[1] - 1})")
        return mask[:, self.split].clone()

    def _check(self, graph: dict[str, Tensor], dataset) -> None:
        found = {"num_classes": int(graph["y"].max()) + 1, "num_features": graph["x"].shape[1]}
        for key, want in self.expected.items():
            if want is not None and int(want) != found[key]:
                raise KdkitError(f"data.{key}={want}, but {type(dataset).__name__} has "
                                 f"{found[key]}: set data.{key}={found[key]}")

    def _inductive(self, graph: dict[str, Tensor]) -> tuple[dict, dict]:
        """(observed graph, full graph): hold out ``inductive_rate`` of the test nodes."""
        from torch_geometric.utils import subgraph

        test = graph["test_mask"].nonzero().view(-1)
        gen = torch.Generator().manual_seed(self.split_seed)
        held = test[torch.randperm(test.numel(), generator=gen)[: int(test.numel() * self.inductive_rate)]]
        held_mask = torch.zeros_like(graph["test_mask"])
        held_mask[held] = True
        keep = (~held_mask).nonzero().view(-1)
        edge_index, _ = subgraph(keep, graph["edge_index"], relabel_nodes=True,
                                 num_nodes=graph["x"].shape[0])
        observed = {"x": graph["x"][keep], "edge_index": edge_index, "y": graph["y"][keep],
                    "index": keep}
        for key in MASKS:
            observed[key] = graph[key][keep]
        full = dict(graph, test_mask=held_mask, observed_test_mask=graph["test_mask"] & ~held_mask)
        return observed, full

    # ---- what the runner and the task read --------------------------------------------------
    def _batch(self, stage: str) -> dict[str, Tensor]:
        if self.batches is None:
            self.setup()
        return self.batches[stage]

    @property
    def num_classes(self) -> int:
        return int(self._batch("test")["y"].max()) + 1

    @property
    def num_features(self) -> int:
        return self._batch("test")["x"].shape[1]

    @property
    def num_train_samples(self) -> int:
        """Number of nodes of the original graph (``index`` ranges over them)."""
        return self._batch("test")["x"].shape[0]

    def example_batch(self, n: int | None = None) -> dict[str, Tensor]:
        """The test graph; with ``n``, also ``query``: ``n`` test nodes (held-out ones in the
        inductive setting), the batch of new nodes that the inductive latency is timed on."""
        batch = dict(self._batch("test"))
        if n:
            batch["query"] = batch["test_mask"].nonzero().view(-1)[: int(n)]
        return batch

    def _loader(self, stage: str) -> DataLoader:
        # batch_size=None: the item is already the batch (no collation, no extra dimension).
        return DataLoader(_OneBatch(self._batch(stage)), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
