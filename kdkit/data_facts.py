"""Facts a run reads from its data instead of from the user (class and feature counts)."""

from __future__ import annotations

from omegaconf import DictConfig, open_dict

from kdkit.data_contract import DistillationData, GraphData

# data.<key> left null in the config is filled from the datamodule's member of the same name
# (kdkit.data_contract) after setup, before any model is built, so ``${data.num_classes}`` in
# model configs resolves.
FACTS = ("num_classes", "num_features")


def data_facts(datamodule: DistillationData) -> dict[str, int | None]:
    """``{fact: value}`` of ``datamodule``; None where its setting has no such fact."""
    return {"num_classes": datamodule.num_classes,
            "num_features": datamodule.num_features if isinstance(datamodule, GraphData) else None}


def fill_data_facts(cfg: DictConfig, datamodule: DistillationData) -> None:
    """Set every null ``cfg.data.<fact>`` from ``datamodule.<fact>``."""
    facts = data_facts(datamodule)
    with open_dict(cfg):
        for key in FACTS:
            if key in cfg.data and cfg.data[key] is None and facts[key] is not None:
                cfg.data[key] = int(facts[key])
