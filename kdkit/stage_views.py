"""Which training view each stage reads on transfer data (``kdkit.datamodules.transfer``).

The teacher's stage reads ``data.teacher_view`` (every label by default), the baseline the
labelled part alone, the distilled student ``data.student_view`` (the labelled part plus every
unlabelled sample by default). A datamodule of another setting has one view and is left alone.
"""

from __future__ import annotations

from kdkit.data_contract import ClassificationData
from kdkit.errors import say


def use_view(datamodule, role: str) -> None:
    """Point a datamodule with transfer options at the training view of ``role``'s stage
    ("teacher": ``data.teacher_view``; "baseline": the labelled part; "student":
    ``data.student_view``, labelled plus unlabelled by default). Datamodules of other settings
    have one view and are left alone."""
    if ClassificationData not in type(datamodule).__mro__:
        return
    views = {"teacher": datamodule.teacher_view, "baseline": "labeled", "student": datamodule.student_view}
    datamodule.use_train_view(views[role])


def baseline_epochs(cfg, datamodule) -> int | None:
    """``stages.baseline_max_epochs``: a number, None (``trainer.max_epochs``), or
    ``equal_steps``: as many epochs as give the baseline the student stage's optimizer steps
    (on transfer data the baseline's labelled view is smaller than the student's)."""
    value = cfg.stages.get("baseline_max_epochs")
    if value != "equal_steps":
        return value
    steps = {}
    for role in ("student", "baseline"):
        use_view(datamodule, role)
        steps[role] = max(1, datamodule.num_train_samples // datamodule.batch_size)
    use_view(datamodule, "baseline")
    epochs = -(-int(cfg.trainer.max_epochs) * steps["student"] // steps["baseline"])
    say(f"baseline: {epochs} epochs of {steps['baseline']} steps, the student stage's "
        f"{cfg.trainer.max_epochs} x {steps['student']} steps (stages.baseline_max_epochs=equal_steps)")
    return epochs


def view_facts(datamodule) -> dict:
    """On transfer data, how many training samples the stage saw and how many had no label."""
    if not is_transfer(datamodule):
        return {}
    plain = datamodule.plain_train_view
    return {"train_samples": len(plain), "train_unlabeled": int(getattr(plain, "num_unlabeled", 0))}


def is_transfer(datamodule) -> bool:
    return ClassificationData in type(datamodule).__mro__ and datamodule.is_transfer
