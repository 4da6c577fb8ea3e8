"""Distillers: small modules around pure loss functions, one file each, composed by config."""

from kdkit.distillers.base import DistillContext, Distiller

__all__ = ["DistillContext", "Distiller"]
