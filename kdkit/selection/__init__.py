"""Selection policies: what the student trains on, chosen with the teacher (one file each,
composed by config like distillers: ``selection=[teacher_budget]``)."""

from kdkit.selection.base import SelectionPolicy, StepPlan

__all__ = ["SelectionPolicy", "StepPlan"]
