"""``benchmarks/teacher_data.py`` states each part's student epochs, read from the commands that
ran its rows (a part may run shorter than the default 30 epochs)."""

from benchmarks.teacher_data import epochs_of


def test_epochs_come_from_the_rows_command():
    assert epochs_of({"command": "python benchmarks/teacher_data.py augment --epochs 8 --jobs 2"}) == 8
    assert epochs_of({"command": "python benchmarks/teacher_data.py select --epochs=12"}) == 12
    assert epochs_of({"command": "python benchmarks/teacher_data.py transfer --jobs 2"}) == 30
    restored = {"source_commands": ["kdkit-train experiment=cifar10_transfer",
                                    "python benchmarks/teacher_data.py budget --epochs 10"]}
    assert epochs_of(restored) == 10
    assert epochs_of({}) == 30
