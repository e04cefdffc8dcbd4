"""Shared fixtures. Tests generate their data (seeded); real frames come from ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_REAL = REPO.parent / "shared" / "data" / "real"
ARTIFACTS = REPO / "tests" / "artifacts"


def slow_count(default: int) -> int:
    """How many repetitions a `slow` test runs: reduced in CI through STACKWATCH_SLOW_COUNT."""
    value = os.environ.get("STACKWATCH_SLOW_COUNT")
    return max(1, min(default, int(value))) if value else default


@pytest.fixture
def real_data() -> Path:
    """The folder of real frames beside the repository; skips when absent (a user's fresh clone)."""
    if not SHARED_REAL.is_dir():
        pytest.skip("../shared/data/real is not present")
    return SHARED_REAL


@pytest.fixture
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
