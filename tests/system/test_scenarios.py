"""The multi-site stories in scenarios/, each run through the scenario runner with real processes.

Each scenario starts its own ``odst serve`` processes (and their nats-servers)
on 127.0.0.1 under the test's tmp dir; the runner stops them all at the end,
also when a check fails. Run one by hand with ``odst scenario run scenarios/NAME``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.network import ScenarioFailed
from harness.runner import run_scenario

SCENARIOS = sorted(p for p in (Path(__file__).resolve().parents[2] / "scenarios").glob("*.py")
                   if not p.name.startswith("_"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, tmp_path: Path) -> None:
    try:
        run_scenario(path, tmp_path / path.stem)
    except ScenarioFailed as exc:
        pytest.fail(f"scenario {path.stem} failed: {exc}", pytrace=False)


def test_there_are_scenarios() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"chain3", "hub4", "partition_heal", "kill9_resume", "corrupt_chunk", "forged_event",
            "stage_promotion", "offline_delete", "late_join", "demote_withdraw"} <= names
