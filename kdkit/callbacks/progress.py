"""A rich progress bar that names the kdkit stage it is drawing."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StageProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` with the stage in its descriptions: ``teacher | epoch 3/10``,
    ``student | testing``, and without ``v_num``.

    ``v_num`` is the logger's version, which kdkit's CSV logger sets to the stage name, so the bar
    showed its last letters (``v_num: cher``). ``stage`` is set by ``kdkit.stage_fit.make_trainer``
    for each stage's Trainer; keyword arguments are ``RichProgressBar``'s.
    """

    def __init__(self, stage: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.stage = stage

    def get_metrics(self, trainer, pl_module) -> dict:
        """The metrics shown next to the bar, without ``v_num``."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    @property
    def test_description(self) -> str:
        """``<stage> | testing``."""
        return self._named("testing")

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's hook for the training bar's text; epochs counted from 1 for people
        max_epochs = self.trainer.max_epochs
        text = self._named(f"epoch {current_epoch + 1}" + (f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""))
        # as Lightning does: no jitter when the (longer) validation bar appears beside it
        return f"{text:{len(self.validation_description)}}"

    def _named(self, what: str) -> str:
        return f"{self.stage} | {what}" if self.stage else what
