"""A wheel of dpnle works outside the repository: built from the sources, installed (not
editable) into a fresh virtual environment under tmp_path, and run from there, with no
PYTHONPATH and the repository nowhere on the path. The wheel must carry dpnle's own data/ and
configs/ (pyproject.toml's package-data): the commands below read both."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from test_localize import FINGERPRINT, paired_samples, reference_dpnle, write_capture

REPO = Path(__file__).resolve().parents[1]
# What building the wheel reads. The build runs on a copy: it leaves nothing in the repository
# (build/, *.egg-info), and no stale build/lib of an earlier build can supply a file the package
# data no longer lists.
BUILD_INPUTS = ("pyproject.toml", "README.md", "dpnle", "data", "configs")
TIMEOUT_S = 180
# Run by the venv's python: where dpnle and its resources are, and that the data reads.
PROBE = """
import dpnle
from dpnle.pairs import make_pairs
from dpnle.paths import resource_dir

print(dpnle.__file__)
print(resource_dir("data"))
print(resource_dir("configs"))
print(len(make_pairs("benevolence", num_pairs=4)))
"""


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of a copy of the sources, offline: no build isolation (the running
    environment's setuptools builds it) and no index."""
    source = tmp_path / "source"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", out, source], cwd=tmp_path)
    (wheel,) = out.glob("dpnle-*.whl")
    return wheel


def make_venv(tmp_path: Path, wheel: Path) -> Path:
    """A fresh venv holding the wheel; the running environment's packages (torch,
    transformers, ...) are reused, nothing is downloaded. Returns the venv's bin/ folder.

    ``--system-site-packages`` would only expose the base interpreter's packages, not those of
    the venv running the tests, so a .pth file appends the running environment's site-packages
    to the new venv's path instead. The new venv's own site-packages comes first, so ``import
    dpnle`` finds the wheel; a .pth file's path lines are not scanned for .pth files themselves,
    so the outer environment's editable-install finder is never installed here.
    """
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    # The wheel goes in before the outer packages are visible: pip then sees no other dpnle.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--force-reinstall",
          "--no-index", wheel], cwd=tmp_path)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    Path(purelib.stdout.strip(), "outer-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root / "bin"


def test_wheel_works_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = [p for p in (REPO / "data").rglob("*") if p.is_file()] + list((REPO / "configs").glob("*.yaml"))
    for path in bundled:
        inside = f"dpnle/resources/{path.relative_to(REPO).as_posix()}"
        assert inside in names, f"the wheel lacks {path.relative_to(REPO)} (pyproject.toml's package-data)"

    bin_dir = make_venv(tmp_path, wheel)
    work = tmp_path / "work"  # the commands' cwd: no repository, no runs/ of it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "DPNLE_PROJECT_DATA")}
    # No user site-packages either; runs and cache under tmp_path; tables wide enough to read.
    env.update(PYTHONNOUSERSITE="1", DPNLE_RUNS=str(tmp_path / "runs"), DPNLE_CACHE=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", COLUMNS="200")

    def dpnle(*args) -> subprocess.CompletedProcess:
        return _run([bin_dir / "dpnle", *args], cwd=work, env=env)

    # The venv imports the wheel's dpnle, finds the wheel's own data and configs, and makes
    # pairs for a value from them (data/questions.jsonl, data/value_personas.json).
    probe = _run([bin_dir / "python", "-c", PROBE], cwd=work, env=env).stdout.splitlines()
    package = Path(probe[0]).parent
    assert package.is_relative_to(tmp_path / "venv") and not package.is_relative_to(REPO), probe
    assert probe[1:] == [str(package / "resources" / "data"), str(package / "resources" / "configs"), "4"]

    assert "collect-activations" in dpnle("--help").stdout
    assert "gsm8k" in dpnle("data", "list").stdout
    assert "smollm2" in dpnle("models", "list").stdout.lower()

    # Localize a synthetic capture (no model): the model's defaults come from configs/models.yaml.
    from dpnle.runs import Run, read_parquet

    run = Run.create_or_open("wheel", FINGERPRINT["id"], root=tmp_path / "runs")
    run.update_manifest(model={"id": FINGERPRINT["id"], "fingerprint": FINGERPRINT})
    high, low = paired_samples(0)
    write_capture(run, "openness", "mlp", "last", high, low)
    dpnle("localize", "--run", "wheel", "--trait", "openness")  # the run found by name in $DPNLE_RUNS
    written = read_parquet(run.neurons_path("openness"))
    # An unknown model: layers auto (2-3 separate), tau 0.8, quantile 0.995, as in test_localize.
    assert sorted(set(written["layer"])) == [2, 3]
    selected = {(int(r.layer), int(r.neuron)) for r in written[written["selected"]].itertuples()}
    expected = set(reference_dpnle(high, low, [2, 3], 0.995, 0.8))
    assert expected and selected == expected
