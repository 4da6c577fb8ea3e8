"""Every selection policy config has a test file and a README row, as distillers do."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "selection").glob("*.yaml"))


def test_the_policies_are_found():
    assert {"teacher_budget", "batch_select", "augment_select", "learned_augment", "vae_augment"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_policy_config_has_a_test_file_for_its_module(name):
    target = yaml.safe_load((ROOT / "conf" / "selection" / f"{name}.yaml").read_text())[name]["_target_"]
    module = target.split(".")[-2]  # kdkit.selection.<module>.<Class>
    assert (ROOT / "kdkit" / "selection" / f"{module}.py").is_file(), target
    assert (ROOT / "tests" / "selection" / f"test_{module}.py").is_file(), f"{target} has no tests/selection/test_{module}.py"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_policy_config_has_a_readme_row(name):
    rows = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.strip().startswith("|")]
    assert any(re.search(rf"\| `{re.escape(name)}` \|$", row) for row in rows), f"README has no policy row for `{name}`"
