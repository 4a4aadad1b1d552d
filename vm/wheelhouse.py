"""Fill the host-side wheelhouse that the offline guest installs jobsvc and its test deps from.

The project is built into a wheel here; its dependencies (with the test extras) and the test
tools are downloaded as binary wheels for the guest's interpreter (Debian bookworm: CPython 3.11,
glibc 2.36), whatever Python the host runs. The guest installs with
`pip install --no-index --find-links` from requirements.txt written here, running pip from
its wheel (downloaded here too) so that the guest's venv needs no ensurepip.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from util import StepError, run, say

GUEST_PYTHON = "3.11"
GUEST_GLIBC_MINOR = 36  # bookworm
# Always wanted in the guest, whatever the project declares.
TEST_TOOLS = ["pytest", "pytest-timeout", "hypothesis"]
TEST_EXTRAS = ("test", "tests", "testing", "dev")
NOT_FOR_TESTS = {
    "ruff",
    "mypy",
    "black",
    "flake8",
    "isort",
    "pylint",
    "pyright",
    "grpcio-tools",
    "pre-commit",
    "build",
    "twine",
}
STEP = "wheelhouse"


def _platforms() -> list[str]:
    tags = [f"manylinux_2_{m}_x86_64" for m in range(GUEST_GLIBC_MINOR, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def _name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return m.group(1).lower().replace("_", "-") if m else ""


def _is_tool(req: str) -> bool:
    """Linters, type checkers and code generators: the guest only runs the tests."""
    name = _name(req)
    return name in NOT_FOR_TESTS or name.startswith("types-") or name.endswith("-stubs")


def project_info(repo: Path) -> tuple[str, list[str]]:
    """(project name, test requirements) from pyproject.toml: a test extra (or the dev extra,
    less its lint/type/codegen tools) and PEP 735 dependency groups of those names."""
    pyproject = repo / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text())
    except FileNotFoundError as e:
        raise StepError(STEP, f"{pyproject} not found", "the VM installs the project from it") from e
    project = data.get("project", {})
    name = project.get("name")
    if not name:
        raise StepError(STEP, f"{pyproject} has no [project] name", "add one")
    reqs: list[str] = []
    for table in (project.get("optional-dependencies", {}), data.get("dependency-groups", {})):
        for group in TEST_EXTRAS:
            # include-group entries (tables) are skipped: plain requirement strings only.
            reqs += [r for r in table.get(group, []) if isinstance(r, str) and not _is_tool(r)]
    return name, list(dict.fromkeys(reqs))


def fill(repo: Path, wheelhouse: Path, log: Path) -> Path:
    """Build the project wheel and download every dependency wheel; return requirements.txt."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    name, test_reqs = project_info(repo)
    dist = name.replace("-", "_").lower()
    for old in wheelhouse.glob(f"{dist}-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    say(f"building the {name} wheel")
    run(
        [*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", wheelhouse, repo],
        log=log,
        step=STEP,
        fix=f"`pip wheel {repo}` must work on the host; see {log}",
    )
    wheels = sorted(wheelhouse.glob(f"{dist}-*.whl"))
    if not wheels:
        raise StepError(STEP, f"no {dist}-*.whl in {wheelhouse} after pip wheel", f"see {log}")
    test_names = {_name(r) for r in test_reqs}
    reqs = [name, *test_reqs, *(t for t in TEST_TOOLS if t not in test_names)]
    # A direct reference, so that a same-named project on the index is never taken instead.
    wanted = [f"{name} @ {wheels[-1].resolve().as_uri()}", *reqs[1:]]
    say(f"downloading wheels for the guest (CPython {GUEST_PYTHON}): {' '.join(reqs)}")
    platform_args: list[str] = []
    for tag in _platforms():
        platform_args += ["--platform", tag]
    run(
        [
            *pip,
            "download",
            "--quiet",
            "--dest",
            wheelhouse,
            "--find-links",
            wheelhouse,
            "--only-binary=:all:",
            "--python-version",
            GUEST_PYTHON,
            "--implementation",
            "cp",
            "--abi",
            f"cp{GUEST_PYTHON.replace('.', '')}",
            *platform_args,
            *wanted,
            "pip",
        ],
        log=log,
        step=STEP,
        fix=f"every dependency needs a wheel for CPython {GUEST_PYTHON} on manylinux x86_64; see {log}",
    )
    requirements = wheelhouse / "requirements.txt"
    requirements.write_text("\n".join(reqs) + "\n")
    n = len(list(wheelhouse.glob("*.whl")))
    say(f"wheelhouse {wheelhouse}: {n} wheels")
    return requirements
