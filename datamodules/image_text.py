"""Image-text pairs for CLIP: CIFAR-10 as captioned pairs, CSV/TSV files, webdataset shards.

Every batch is a dict ``{"image": float [B, 3, H, W] in [0, 1], "text": long [B, L] token ids,
"index": long [B], "pair_id": long [B]}`` plus ``"label"`` where the data has classes. Images
are not normalised (the task normalises per model). ``pair_id`` says which pairs match for
retrieval: samples with equal ``pair_id`` are each other's positives.

The three sources live in ``cifar10_pairs``, ``pairs_files`` and ``webdataset_pairs``; this module
names them all (and configs written for it keep working).
"""

from kdkit.datamodules.cifar10_pairs import CIFAR_TEMPLATES, CIFAR10PairsDataModule, ClassCaptions
from kdkit.datamodules.pairs_files import CSVPairsDataModule, PairsDataModule, PairsFile, image_transform, stable_id
from kdkit.datamodules.webdataset_pairs import WebDatasetPairsDataModule

__all__ = ["CIFAR_TEMPLATES", "CIFAR10PairsDataModule", "CSVPairsDataModule", "ClassCaptions", "PairsDataModule",
           "PairsFile", "WebDatasetPairsDataModule", "image_transform", "stable_id"]
