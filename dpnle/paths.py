"""Where dpnle keeps things on disk: the user cache (datasets, converted models) and runs."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_dir() -> Path:
    """Root of dpnle's cache: ``$DPNLE_CACHE`` or the platform's user cache folder."""
    root = os.environ.get("DPNLE_CACHE")
    path = Path(root).expanduser() if root else Path(user_cache_dir("dpnle"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def datasets_cache_dir() -> Path:
    path = cache_dir() / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_cache_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Folder holding run directories: ``$DPNLE_RUNS`` or ``./runs``."""
    return Path(os.environ.get("DPNLE_RUNS", "runs")).expanduser()


def project_data_dir() -> Path:
    """dpnle's own data (question pool, value personas, templates): the repository's ``data/``."""
    override = os.environ.get("DPNLE_PROJECT_DATA")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "data"
