"""The test-only argon2 knob (odst.accounts.passwords.TEST_KNOB) is honoured under pytest only."""

from __future__ import annotations

import pytest

from odst.accounts import passwords


@pytest.fixture
def fresh_choice():
    passwords._hasher.cache_clear()
    yield
    passwords._hasher.cache_clear()


def test_the_knob_gives_cheap_parameters_inside_a_pytest_run(monkeypatch, fresh_choice):
    monkeypatch.setenv(passwords.TEST_KNOB, "cheap")
    assert passwords._hasher().hash("x").startswith("$argon2id$v=19$m=8,t=1,p=1$")


@pytest.mark.parametrize("knob", ["", "yes", "CHEAP"])
def test_without_the_knob_passwords_get_the_real_parameters(monkeypatch, fresh_choice, knob):
    monkeypatch.setenv(passwords.TEST_KNOB, knob)
    assert passwords._hasher().hash("x").startswith("$argon2id$v=19$m=65536,t=3,p=4$")


def test_outside_a_pytest_run_the_knob_is_ignored(monkeypatch, fresh_choice):
    from structlog.testing import capture_logs
    monkeypatch.setenv(passwords.TEST_KNOB, "cheap")
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    with capture_logs() as logs:
        digest = passwords._hasher().hash("x")
    assert digest.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert any("for the test suite only" in e["event"] and e["log_level"] == "warning" for e in logs), logs
