"""Shared test policy: under CI=true a skipped test is a failure (the system tests must really run)."""

from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and _skipped:
        print(f"\nCI=true: {len(_skipped)} test(s) were skipped, which counts as a failure:")
        for nodeid in _skipped:
            print(f"  skipped: {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
