"""Test-wide settings: a throwaway dpnle cache per session, the offline dataset mirror."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "datasets"


def pytest_configure(config):
    # Fetched datasets and converted models go to a cache shared by the whole test session;
    # CI points DPNLE_CACHE inside its clone, a developer's own cache is left alone otherwise.
    os.environ.setdefault("DPNLE_CACHE", str(REPO / ".cache" / "dpnle-tests"))
    if "DPNLE_DATA_MIRROR" not in os.environ and MIRROR.exists():
        os.environ["DPNLE_DATA_MIRROR"] = str(MIRROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def mirror_available():
    if not os.environ.get("DPNLE_DATA_MIRROR"):
        pytest.skip("needs the dataset mirror (DPNLE_DATA_MIRROR=../shared/datasets)")
