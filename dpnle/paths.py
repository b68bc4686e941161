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


class ResourceNotFoundError(FileNotFoundError):
    """A folder of dpnle's own files (data/, configs/) is in neither place dpnle looks."""


def resource_dir(name: str) -> Path:
    """A folder of dpnle's own files (``data`` or ``configs``).

    A wheel carries them inside the package (``dpnle/resources/NAME``, see pyproject.toml); a
    source checkout or an editable install reads the repository's top-level ``NAME/`` in place.
    The repository is only trusted where its pyproject.toml sits beside the package, so an
    installed dpnle never picks up some other ``site-packages/NAME``.
    """
    package = Path(__file__).resolve().parent
    installed = package / "resources" / name
    if installed.is_dir():
        return installed
    repository = package.parent
    if (repository / "pyproject.toml").is_file() and (repository / name).is_dir():
        return repository / name
    raise ResourceNotFoundError(
        f"dpnle's {name}/ folder is missing: neither {installed} (installed package) nor "
        f"{repository / name} (source checkout) exists. Reinstall dpnle."
    )


def project_data_dir() -> Path:
    """dpnle's own data (question pool, value personas, neutral text): ``$DPNLE_PROJECT_DATA``,
    else the bundled ``data/`` (:func:`resource_dir`)."""
    override = os.environ.get("DPNLE_PROJECT_DATA")
    return Path(override) if override else resource_dir("data")


def project_configs_dir() -> Path:
    """dpnle's own configs (per-model localization defaults, example option files)."""
    return resource_dir("configs")
