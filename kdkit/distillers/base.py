"""The contract every distiller follows."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from kdkit.errors import KdkitError, close_names
from kdkit.outputs import Outputs


@dataclass
class DistillContext:
    """What a distiller may need to know when it builds itself (after a probe forward).

    Args:
        num_samples: size of the training set (memory banks over dataset indices, e.g. CRD).
        num_classes: number of classes, when the task has them.
        models: the networks themselves: ``"student"``, and ``"teacher"`` for the teacher the
            distiller reads (a several-teacher distiller gets each teacher under its name).
    """

    num_samples: int | None = None
    num_classes: int | None = None
    models: dict[str, nn.Module] = field(default_factory=dict)

    def module(self, role: str, name: str, who: str) -> nn.Module:
        """Submodule ``name`` of model ``role``, for a distiller that applies part of a network to
        other inputs (e.g. the student's classifier head to every patch token, CSKD).

        A distiller must keep such a module out of its own registration (e.g. in a tuple), so
        that it is neither trained twice nor saved with the adapters: it stays the model's.
        """
        if role not in self.models:
            raise KdkitError(f"{who} needs the {role} network itself, which this task does not "
                             f"give distillers (it gives: {sorted(self.models)})")
        modules = dict(self.models[role].named_modules())
        if name not in modules or not name:
            raise KdkitError(f"{who}: {name!r} is not a module of the {role} "
                             f"({type(self.models[role]).__name__}); close valid names: "
                             f"{close_names(name, [n for n in modules if n])}")
        return modules[name]


class Distiller(nn.Module):
    """Base class: named, weighted loss terms between student and teacher ``Outputs``.

    A subclass declares what it reads (``student_features`` / ``teacher_features`` module
    names; ``logits`` and ``embedding`` are always there when the task produces them), may build
    adapters in ``build`` from the shapes of a probe forward, and returns a dict of *unweighted*
    loss terms from ``forward``. The task multiplies every term by ``weight``, sums and logs
    each as ``train/loss/<distiller>/<term>``.

    A distiller reads one teacher: ``teacher_name`` (config ``distiller.<x>.teacher``), or the
    only teacher when that is None. Distillers that read several teachers at once derive from
    ``MultiTeacherDistiller``.

    Args:
        weight: multiplier for every loss term of this distiller.
    """

    reads_several_teachers = False
    teacher_name: str | None = None
    # True when ``forward`` reads ``batch["label"]``: such a distiller cannot train on transfer
    # data whose unlabelled rows carry ``kdkit.labels.UNLABELED`` (refused when the task is built)
    reads_labels = False
    # True when a distiller that reads labels also takes soft ones, float ``[B, num_classes]``
    # (Mixup / CutMix batches); label readers without it are refused on mixed data
    handles_soft_labels = False
    # True when ``forward`` keeps per-sample state keyed by ``batch["index"]`` (CRD's memory
    # banks): refused on Mixup / CutMix batches, whose rows are mixtures of two samples
    reads_sample_index = False
    # True when ``forward`` honours ``batch["captioned"]`` (image-text transfer data, where an
    # image without caption carries padding as its text): others are refused on such data
    handles_uncaptioned = False
    # Buffers (names within the distiller) that every DDP rank updates itself, identically, from
    # gathered batches (memory banks, running moments): DDP would otherwise broadcast them from
    # rank 0 before every step, a copy of their whole size (CRD on ImageNet: 1.3 GB a step). The
    # task leaves them out of DDP's buffer sync and broadcasts them once when training starts.
    rank_synced_buffers: tuple[str, ...] = ()
    # True when the task loss should see the clean batch although ``student_batch`` changes the
    # student's input (MFD's ``task_view: full``): the task runs the student once more on it
    task_on_full_view = False

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)
        self.progress = (0, 0)  # (epoch, global step) of the current training step

    def reading(self, teacher: str | None) -> Distiller:
        """Read the teacher named ``teacher`` (None: the only one); returns ``self``."""
        self.teacher_name = teacher
        return self

    def teachers_for_step(self, names: list[str]) -> list[str]:
        """Of the teachers routed to this distiller, those it reads this step (all by default)."""
        return names

    def set_progress(self, epoch: int, step: int) -> None:
        """Called by the task before every training step (schedules read it)."""
        self.progress = (int(epoch), int(step))

    @property
    def student_features(self) -> list[str]:
        return []

    @property
    def teacher_features(self) -> list[str]:
        return []

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        """Create adapters now that the output shapes are known. Default: nothing to build."""

    def student_batch(self, batch: dict) -> dict:
        """The batch the student sees in a training step (the teachers see ``batch`` itself).

        Default: ``batch`` unchanged. A distiller that changes the student's input (masked
        images for masked feature distillation) returns a *new* dict, never mutating ``batch``,
        and may add its own keys (e.g. the mask), which its ``forward`` then finds in the batch
        it receives. Evaluation always feeds the student the clean batch.
        """
        return batch

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class FeaturePair(Distiller):
    """Base of the distillers that compare one student feature with one teacher feature
    (FitNet, MFD, TRG): it taps the modules named by ``self.student_feature`` and
    ``self.teacher_feature``, which subclasses set."""

    student_feature: str = ""
    teacher_feature: str = ""

    @property
    def student_features(self) -> list[str]:
        return [self.student_feature]

    @property
    def teacher_features(self) -> list[str]:
        return [self.teacher_feature]

    def feature_pair(self, student: Outputs, teacher: Outputs, who: str) -> tuple[Tensor, Tensor]:
        """The tapped student and teacher features (a clear error when one was not captured)."""
        return feature(student, self.student_feature, who), feature(teacher, self.teacher_feature, who)


def require(outputs: Outputs, field: str, who: str) -> Tensor:
    """``outputs.<field>`` or a clear error naming the distiller that needed it."""
    value = getattr(outputs, field)
    if value is None:
        raise KdkitError(f"{who} needs '{field}' but this task does not produce it")
    return value


def feature(outputs: Outputs, name: str, who: str) -> Tensor:
    try:
        return outputs.features[name]
    except KeyError:
        raise KdkitError(f"{who} needs feature {name!r}, which was not captured") from None


def check_same_shape(student: Tensor, teacher: Tensor, who: str, hint: str = "") -> None:
    if student.shape[1:] != teacher.shape[1:]:
        raise KdkitError(
            f"{who}: student shape {tuple(student.shape[1:])} does not match teacher shape "
            f"{tuple(teacher.shape[1:])}{hint}"
        )


class MultiTeacherDistiller(Distiller):
    """Base of the distillers that combine several teachers (ensembles, per-sample weighting,
    per-teacher heads, schedules): ``build`` and ``forward`` receive ``{name: Outputs}`` of the
    teachers they read instead of one ``Outputs``. Nothing outside such a distiller's own file
    knows how it combines them.

    Args:
        weight: multiplier for every loss term.
        teachers: names of the teachers it reads, in order; None: every teacher of the run.
    """

    reads_several_teachers = True

    def __init__(self, weight: float = 1.0, teachers=None):
        super().__init__(weight)
        self.teacher_names = None if teachers is None else [str(t) for t in teachers]

    def extra_repr(self) -> str:
        return f"weight={self.weight}, teachers={self.teacher_names or 'all'}"


def read_teachers(teachers: dict, who: str, at_least: int = 1) -> dict:
    """``teachers`` checked to hold at least ``at_least`` entries (a clear error otherwise)."""
    if len(teachers) < at_least:
        raise KdkitError(f"{who} combines at least {at_least} teachers, got {list(teachers)}: "
                         "add teachers (teachers.<name>=...) or use a one-teacher distiller")
    return teachers
