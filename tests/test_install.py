"""What a fresh install gets: the lock, the lower bounds and the tested range agree with
pyproject.toml, and a transformers outside the tested range is named in one line at start-up."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

from dpnle import compat

REPO = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, Version]:
    """``name==version`` lines of a requirements file, names normalized."""
    pins = {}
    for line in path.read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", line.strip())
        if found:
            pins[re.sub(r"[-_.]+", "-", found.group(1)).lower()] = Version(found.group(2))
    return pins


def _lower_bounds() -> dict[str, Version]:
    """Every ``name>=version`` in pyproject.toml's dependencies and extras."""
    text = (REPO / "pyproject.toml").read_text()
    return {re.sub(r"[-_.]+", "-", name).lower(): Version(version)
            for name, version in re.findall(r'"([A-Za-z0-9_.\-]+)>=([0-9][^",;]*)"', text)}  # fmt: skip


def test_lowest_requirements_pin_exactly_the_lower_bounds():
    lowest = _pins(REPO / "requirements-lowest.txt")
    bounds = _lower_bounds()
    bounds.pop("torch")  # torch is the user's hardware choice, held where `make setup` put it
    bounds.pop("setuptools")  # a build tool: whichever pip provides
    assert lowest == bounds


def test_tested_range_is_the_lower_bound_and_the_lock():
    low, high = compat.TESTED["transformers"]
    assert _lower_bounds()["transformers"] == Version(low)
    assert _pins(REPO / "requirements-lowest.txt")["transformers"] == Version(low)
    lock = _pins(REPO / "requirements.lock")
    assert lock["transformers"] == Version(high)
    assert "torch" not in lock  # hardware-specific: installed from TORCH, not from the lock


@pytest.mark.parametrize(("installed", "warns"), [
    ("5.18.0", False), ("5.21.1", False), ("5.25.0", False), ("5.26.0", True), ("5.17.0", True),
    ("5.26.0.dev0", True), ("6.0.0rc1", True),
])  # fmt: skip
def test_untested_transformers_is_one_warning_line(monkeypatch, installed, warns):
    real = metadata.version
    monkeypatch.setattr(compat.metadata, "version", lambda name: installed if name == "transformers" else real(name))
    lines = compat.untested_versions()
    if not warns:
        assert lines == []
        return
    low, high = compat.TESTED["transformers"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"transformers {installed}" in lines[0] and low in lines[0] and high in lines[0]


def test_cli_prints_the_warning_once_and_still_runs(monkeypatch, capsys):
    from dpnle import cli

    monkeypatch.setattr(compat.metadata, "version", lambda name: "5.99.0")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "list"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "outside the range dpnle is tested with" in line]
    assert len(warnings) == 1 and "transformers 5.99.0" in warnings[0]
    assert "smollm2-135m-instruct" in captured.out
