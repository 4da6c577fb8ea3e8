"""Lightning callbacks any task can use (a task brings its own through its ``callbacks`` argument)."""

from kdkit.callbacks.best_weights import KeepBestWeights

__all__ = ["KeepBestWeights"]
