"""Guest checks select the hierarchy the harness asked for (JOBSVC_VM_CGROUP, v1 by default).

A test marked cgroup_v1 or cgroup_v2 runs only in a guest booted with that hierarchy; the others are
deselected (not skipped), so a green run says every check for this guest ran.
"""

from __future__ import annotations

import os

import pytest

CGROUP = os.environ.get("JOBSVC_VM_CGROUP", "") or "v1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cgroup_v1: only for a guest booted with cgroup v1")
    config.addinivalue_line("markers", "cgroup_v2: only for a guest booted with cgroup v2")
    if CGROUP not in ("v1", "v2"):
        raise pytest.UsageError(f"JOBSVC_VM_CGROUP={CGROUP!r}: want v1 or v2")


def pytest_report_header(config: pytest.Config) -> str:
    return f"guest hierarchy asked for: cgroup {CGROUP} (JOBSVC_VM_CGROUP)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    other = "cgroup_v2" if CGROUP == "v1" else "cgroup_v1"
    keep = [item for item in items if item.get_closest_marker(other) is None]
    dropped = [item for item in items if item.get_closest_marker(other) is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def cgroup() -> str:
    return CGROUP
