"""One graph, node classification: any PyG dataset, transductive or inductive (GLNN protocol)."""

from __future__ import annotations

import inspect
import os
import pickle
import shutil
import traceback
import zlib
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdkit.data_contract import GraphData
from kdkit.datamodules.archives import CORRUPT_HINT, file_error, warn_cached
from kdkit.datamodules.graph_splits import MASKS, graph_masks, node_labels
from kdkit.errors import KdkitError

SETTINGS = ("transductive", "inductive")
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


def dataset_factory(node):
    """A ``data.dataset`` config node (``_target_`` + arguments) as a callable building the
    dataset; one line for a missing value, an unknown class, or arguments the class does not
    take (checked against its signature before anything is downloaded)."""
    from hydra.utils import get_object, instantiate
    from omegaconf import DictConfig, OmegaConf

    node = node if isinstance(node, DictConfig) else OmegaConf.create(dict(node))
    if "_target_" not in node or OmegaConf.is_missing(node, "_target_"):
        raise KdkitError("data.dataset._target_ is required: a torch_geometric dataset class, "
                         "e.g. data.dataset._target_=torch_geometric.datasets.Amazon")
    for key in node:
        if OmegaConf.is_missing(node, key):
            what = " (the folder PyG downloads and processes into)" if key == "root" else ""
            raise KdkitError(f"data.dataset.{key} is required{what}: set data.dataset.{key}=...")
    target = node._target_
    try:
        cls = get_object(target)
    except Exception as exc:  # noqa: BLE001 - any import failure is the same user mistake
        first = (str(exc).strip().splitlines() or [""])[0]
        raise KdkitError(f"data.dataset._target_={target} cannot be imported ({first}): give a "
                         "dataset class's import path, e.g. torch_geometric.datasets.Amazon") from None
    given = [str(k) for k in node if not str(k).startswith("_")]
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to check against: let the call tell
        params = None
    if params is not None:
        name = getattr(cls, "__name__", target)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        needed = [p.name for p in params.values()
                  if p.kind in kinds and p.default is p.empty and p.name not in given]
        if needed:
            raise KdkitError(f"{name} needs {', '.join(needed)}: add "
                             + " ".join(f"+data.dataset.{k}=..." for k in needed))
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = [k for k in given if k not in params]
            if unknown:
                raise KdkitError(f"{name} takes no {', '.join(unknown)}: drop it with "
                                 + " ".join(f"~data.dataset.{k}" for k in unknown)
                                 + f" ({name} takes {', '.join(params) or 'no arguments'})")
    return instantiate(node, _partial_=True)


class _OneBatch(Dataset):
    """A dataset of one item: the graph batch (a loader over it yields it once per epoch)."""

    def __init__(self, batch: dict[str, Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.batch


def _num_classes(y: Tensor) -> int:
    """Classes of the labelled nodes (``y >= 0``): the largest class id + 1."""
    return int(y[y >= 0].max()) + 1


class GraphDataModule(L.LightningDataModule, GraphData):  # kdkit.data_contract.GraphData
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
        dataset: the PyG dataset, a callable building it (a Hydra node with ``_partial_: true``,
            e.g. ``torch_geometric.datasets.Planetoid`` with ``root`` and ``name``), or a config
            node (``_target_`` + arguments: ``conf/data/pyg.yaml``); built only after the raw
            files are in place. One graph; ``y`` one class per node (``-1``: unlabelled).
        raw_src: folder of raw files to copy into ``raw_dst`` before PyG processes them (the
            offline copy, e.g. ``$KDKIT_DATA_DIR/planetoid/Cora/raw``); when it does not exist
            PyG downloads as usual.
        raw_dst: the dataset's own ``raw_dir`` (for Planetoid: ``<root>/<name>/raw``).
        setting: "transductive" or "inductive".
        split: which column of ``[N, k]`` masks to use when the dataset ships k splits
            (required then); None or 0 for one ``[N]`` split, None when it ships no masks.
        num_train_per_class, num_val, num_test: the random split drawn (with ``split_seed``)
            for a dataset with no masks, as PyG's ``RandomNodeSplit(split="random")``:
            ``num_train_per_class`` nodes of each class, then ``num_val`` / ``num_test`` of the
            other labelled nodes (a count, or a float in (0, 1): a fraction of them).
        inductive_rate: fraction of test nodes held out in the inductive setting (GLNN: 0.2).
        split_seed: seed of the held-out draw and of the random split.
        normalize_features: row-normalise (non-negative, e.g. bag-of-words) node features to
            sum 1 (Kipf & Welling 2017; the DGL citation datasets that GLNN and FF-G2M load are
            normalised this way).
        sparse_features: store ``x`` as a sparse CSR tensor. Bag-of-words features are ~1%
            nonzero, and the first layer of ``kdkit.models.gnn`` models then does about 10x less
            work on a CPU; keep False for dense features or models that need dense input.
        num_classes, num_features: what the configs promise the models; checked against the
            data at setup; None: read from the data (labelled ``y``'s max + 1, ``x``'s columns).
    """

    static_for_teacher = True
    fixed_shards: bool = False  # True after use_fixed_shards(): see kdkit.data_contract
    teacher_input_fingerprint: str | None = None  # the data config stands for the teacher's inputs

    def use_fixed_shards(self) -> None:
        """Nothing to change: every rank trains on the whole graph, so every rank's teacher
        cache is complete after one epoch."""
        self.fixed_shards = True

    def __init__(self, dataset, raw_src: str | None = None, raw_dst: str | None = None,
                 setting: str = "transductive", split: int | None = None,
                 inductive_rate: float = 0.2, split_seed: int = 0, normalize_features: bool = True,
                 sparse_features: bool = False, num_classes: int | None = None,
                 num_features: int | None = None, num_train_per_class: int = 20,
                 num_val: int | float = 500, num_test: int | float = 1000):
        super().__init__()
        if setting not in SETTINGS:
            raise KdkitError(f"data.setting={setting!r}: use one of {', '.join(SETTINGS)}")
        if not 0.0 < inductive_rate < 1.0:
            raise KdkitError(f"data.inductive_rate={inductive_rate} must be in (0, 1)")
        self.dataset_factory = dataset
        self.raw_src = Path(raw_src) if raw_src else None
        self.raw_dst = Path(raw_dst) if raw_dst else None
        self.setting = setting
        self.split = None if split is None else int(split)
        self.random_split = {"num_train_per_class": num_train_per_class, "num_val": num_val,
                             "num_test": num_test}
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
        factory = self.dataset_factory
        if isinstance(factory, Mapping):  # a config node (DictConfig or dict with _target_)
            factory = self.dataset_factory = dataset_factory(factory)
        if not callable(factory):
            return factory
        try:
            return factory()
        except Exception as exc:  # offline download failure, missing or damaged files
            path = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
            if path is not None and os.path.exists(path):  # e.g. a directory where a file belongs
                path = Path(path)
            else:
                path = _file_in_traceback(exc) if isinstance(exc, FILE_ERRORS) else None
            if path is not None:
                raise self._damaged(path, exc) from exc
            first = (str(exc).strip().splitlines() or [""])[0]
            where = (f"put its raw files in {self.raw_src} (set KDKIT_DATA_DIR) or "
                     if self.raw_src is not None else "check data.dataset's arguments and ")
            raise KdkitError(f"could not load the graph dataset ({type(exc).__name__}: {first}); "
                             f"{where}go online so PyG can download it") from exc

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
        name = type(dataset).__name__
        if len(dataset) != 1:
            raise KdkitError(f"{name} holds {len(dataset)} graphs: kdkit's graph data is node "
                             "classification on one graph; use a single-graph dataset")
        data = dataset[0]
        from torch_geometric.data import HeteroData

        if isinstance(data, HeteroData):
            raise KdkitError(f"{name} is heterogeneous (node types {', '.join(data.node_types)}): "
                             "use a homogeneous graph dataset (one node type)")
        for key in ("x", "y", "edge_index"):
            if getattr(data, key, None) is None:
                raise KdkitError(f"{name} has no `{key}`: a node classification dataset with node "
                                 f"features x, labels y and edge_index is needed")
        x = (data.x if data.x.layout == torch.strided else data.x.to_dense()).float()
        if self.normalize_features:
            if (x < 0).any():
                raise KdkitError(f"{name} has negative features, which row normalisation (sum 1) "
                                 "does not fit: set data.normalize_features=false")
            x = x / x.sum(dim=1, keepdim=True).clamp(min=1e-12)
        y = node_labels(data.y, name)
        if y.numel() != x.shape[0]:
            raise KdkitError(f"{name} has {y.numel()} labels for {x.shape[0]} nodes: node "
                             "classification needs one class id per node")
        if not (y >= 0).any():
            raise KdkitError(f"{name} has no labelled node (every y < 0)")
        graph = {"x": x, "edge_index": data.edge_index.long(), "y": y,
                 "index": torch.arange(x.shape[0])}
        graph.update(graph_masks(data, y, name, self.split, seed=self.split_seed,
                                 **self.random_split))
        self._check(graph, dataset)
        return graph

    def _check(self, graph: dict[str, Tensor], dataset) -> None:
        found = {"num_classes": _num_classes(graph["y"]), "num_features": graph["x"].shape[1]}
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
        return _num_classes(self._batch("test")["y"])

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
