"""Test-wide settings: a throwaway dpnle cache per session, the offline dataset mirror."""

from __future__ import annotations

import logging
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
def one_thread(request):
    """Tiny models run fastest on one thread; on a shared, busy CPU extra OpenMP threads only
    contend. Tests marked ``slow`` (the real model) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def mirror_available():
    if not os.environ.get("DPNLE_DATA_MIRROR"):
        pytest.skip("needs the dataset mirror (DPNLE_DATA_MIRROR=../shared/datasets)")


class _DeprecationLog(logging.Handler):
    """Collects what transformers logs about deprecations: it announces renames (a cache keyword,
    an argument) through its logger, once per process, not only through the warnings module."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_transformers_deprecations():
    """Fail a test during which transformers logged a deprecation, so the next upstream rename
    fails a test the day it lands instead of a user's run months later (FutureWarning and
    DeprecationWarning are errors too: pyproject.toml's filterwarnings)."""
    logger = logging.getLogger("transformers")
    handler = _DeprecationLog()
    logger.addHandler(handler)
    # transformers' warning_once remembers what it said; forget it, so every test is checked.
    clear = getattr(getattr(logging.Logger, "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, f"transformers logged a deprecation: {handler.messages}"
