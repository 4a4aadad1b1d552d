"""`make test` as another user skips the system tests and says why (the Makefile runs them with -rs)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_the_system_tests_skip_reason_as_non_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.system import conftest

    monkeypatch.setattr("tests.system.conftest.os.geteuid", lambda: 1000)
    assert conftest._why_not() == "system tests need root"


def test_make_system_test_prints_skip_reasons() -> None:
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    recipe = makefile.split("\nsystem-test:", 1)[1].split("\n\n", 1)[0]
    assert "pytest" in recipe and " -rs " in recipe
