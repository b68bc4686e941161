"""The dependency versions dpnle is tested with, and a start-up check of the installed ones.

``TESTED`` is the range CI runs the whole suite on: the lower end is pyproject.toml's lower
bound (CI's ``lowest`` environment), the upper end the version in ``requirements.lock`` (the
newest release when the lock was last refreshed; CI also tests whatever is newest today). A
version outside it still runs; the CLI says so in one line, since the edit hooks depend on how
transformers hands inputs to a model's decoder stack, which upstream changes without notice.
"""

from __future__ import annotations

from importlib import metadata

TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("5.18.0", "5.25.0"),
}


def _parse(version: str) -> tuple[int, ...]:
    """The numeric release part of a version (``5.24.0.dev0`` -> (5, 24, 0)), for ordering."""
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts) + (0,) * (3 - len(parts))


def untested_versions() -> list[str]:
    """One line per installed package whose version lies outside ``TESTED`` (none: empty)."""
    lines = []
    for package, (low, high) in TESTED.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
        if not _parse(low) <= _parse(installed) <= _parse(high):
            lines.append(
                f"{package} {installed} is outside the range dpnle is tested with ({low} to {high}): "
                "results may differ; `make setup` installs the tested lock."
            )
    return lines
