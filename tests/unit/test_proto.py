"""The checked-in generated code must be exactly what `make proto` makes from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = generate.generate(tmp_path)
    assert written
    for fresh in written:
        checked_in = ROOT / "jobsvc" / "_pb" / fresh.name
        assert checked_in.exists(), f"{checked_in} is missing: run make proto"
        assert checked_in.read_text() == fresh.read_text(), f"{checked_in} is stale: run make proto"
