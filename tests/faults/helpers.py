"""What the fault tests share: their parameters and assertions (on ``tests.faults.cases`` outcomes)."""

from __future__ import annotations

import re

import pytest

from tests.faults.cases import CASES, KNOWN_BUGS, TOL, Outcome


def case_params(group: str, inproc_only: bool = False) -> list:
    """``pytest.param``s of a group's case names (id: the name, simplified), with known kdkit
    bugs marked xfail."""
    params = []
    for case in CASES:
        if case.group != group or (inproc_only and not case.inproc):
            continue
        marks = []
        if case.name in KNOWN_BUGS:
            reason, strict = KNOWN_BUGS[case.name]
            marks.append(pytest.mark.xfail(reason=reason, strict=strict))
        params.append(pytest.param(case.name, id=re.sub(r"[^A-Za-z0-9.=_+-]+", "-", case.name).strip("-"),
                                   marks=marks))
    return params


def assert_one_line_error(out: Outcome) -> None:
    """Exit 2, one line ``kdkit: error: ...`` naming the key / file, nothing after it."""
    assert out.exit_code == "2", out.failures
    assert out.message.startswith("kdkit: error:") and "⏎" not in out.message, out.message
    for name in out.values.get("names", []):
        assert name in out.message, (name, out.message)
    assert out.failures == []


def assert_resumed(out: Outcome) -> None:
    """The resumed run finished, left no temporary file, logged each epoch's validation once;
    an epoch-end resume equals the straight run (metrics and weights, to 1e-6)."""
    assert out.values["resume_rc"] == 0, out.failures
    assert out.values["temporaries"] == [], out.values["temporaries"]
    if out.values["exact"]:
        assert out.values["max_diff"] <= TOL, out.data_lost
        assert out.values["weights_diff"] <= TOL, out.data_lost
    else:  # mid-epoch: measured and reported (benchmarks/results/faults.md), not asserted
        print(f"{out.case}: max metric difference {out.values['max_diff']:.4g}, "
              f"weights {out.values['weights_diff']:.4g}")
    assert out.failures == []


def assert_marker_absent(out: Outcome) -> None:
    assert out.values["marker_exists"] is False
