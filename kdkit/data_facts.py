"""Facts a run reads from its data instead of from the user (class and feature counts)."""

from __future__ import annotations

from omegaconf import DictConfig, open_dict

# data.<key> left null in the config is filled from the datamodule attribute of the same name
# after setup, before any model is built, so ``${data.num_classes}`` in model configs resolves.
FACTS = ("num_classes", "num_features")


def fill_data_facts(cfg: DictConfig, datamodule) -> None:
    """Set every null ``cfg.data.<fact>`` from ``datamodule.<fact>``."""
    with open_dict(cfg):
        for key in FACTS:
            if key in cfg.data and cfg.data[key] is None and getattr(datamodule, key, None) is not None:
                cfg.data[key] = int(getattr(datamodule, key))
