"""Run directories, manifests and atomic artifact I/O.

A run lives in ``runs/<name>/``; ``run.json`` records the model (id and fingerprint), the
software versions, and per stage and concept what was done with which parameters. Every
artifact is written to a temporary file in the same folder and moved into place with
``os.replace``, so a killed process never leaves a half-written file where a later stage
reads. Parquet artifacts carry their provenance in the file's schema metadata (key
``dpnle``), so a file copied out of its run still says what made it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import glob
import json
import os
import platform
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dpnle import __version__
from dpnle.errors import DpnleError, InputError  # InputError: defined in errors.py, imported from here too
from dpnle.paths import runs_dir

MANIFEST = "run.json"
MANIFEST_LOCK = ".run.json.lock"  # held while run.json is rewritten (Run._manifest_lock)
METADATA_KEY = b"dpnle"


class ArtifactError(RuntimeError, DpnleError):
    """An artifact is missing, corrupt, or was made by something other than what is asked."""


class RunNotFoundError(ArtifactError):
    pass


# errno values that mean "no room left": a full disk, or a user's quota used up.
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    return {
        "dpnle": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
    }


# ---------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it into place, else delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        _raise_if_disk_full(exc, path)
        raise
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; artifacts should be as readable as any file the user writes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        _raise_if_disk_full(exc, path)
        raise


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    """Re-raise a full-disk error as an OSError that names the artifact (not its temporary file)."""
    if is_disk_full(exc):
        assert isinstance(exc, OSError)
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc


def remove_temp_files(path: str | os.PathLike) -> None:
    """Delete the temporary files a killed :func:`atomic_path` left next to ``path`` (only
    ``path``'s own: ``.<name>.<random>.tmp``); nothing ever reads them."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"Cannot serialize {type(obj).__name__} to JSON")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); it is corrupt or was "
            "truncated. Delete it and re-run the stage that writes it."
        ) from None


def write_parquet(
    path: str | os.PathLike,
    data: pd.DataFrame | pa.Table,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a DataFrame or Arrow table atomically, with ``metadata`` in the schema (key ``dpnle``)."""
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    if metadata is not None:
        existing = dict(table.schema.metadata or {})
        existing[METADATA_KEY] = json.dumps(metadata, default=_json_default).encode()
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        # Page checksums: a damaged data page is an error on read, not silently wrong numbers.
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
    return Path(path)


def read_parquet_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist.")
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except PermissionError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: BaseException) -> ArtifactError:
    reason = " ".join(str(exc).split())
    return ArtifactError(
        f"{path} is not a readable Parquet file ({reason}); it is corrupt or truncated. "
        "Delete it and re-run the stage that writes it."
    )


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    return read_parquet_table(path, columns).to_pandas()


def parquet_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dpnle`` provenance block of a Parquet artifact ({} when absent)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist.")
    try:
        schema = pq.read_schema(path)
    except PermissionError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(path, exc) from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, exc) from None


# ---------------------------------------------------------------------------------------------
# runs


def default_run_name(model_id: str) -> str:
    """A run name derived from the model: ``smollm2-135m-instruct``, ``Meta-Llama-3-8B-Instruct``."""
    base = model_id.rstrip("/").split("/")[-1]
    if base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base)


def runs_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding run directories (``root``, else ``$DPNLE_RUNS`` or ``./runs``); refused
    when it is a file."""
    path = Path(root) if root is not None else runs_dir()
    if path.exists() and not path.is_dir():
        where = "DPNLE_RUNS" if root is None and os.environ.get("DPNLE_RUNS") else "The runs folder"
        raise InputError(f"{where} {str(path)!r} is a file, not a folder: point DPNLE_RUNS at a folder "
                         "(it is created if missing), or move the file away.")
    return path


def is_run_name(text: str) -> bool:
    """A plain run name (a folder directly under the runs root), not a path."""
    separators = {"/", os.sep, os.altsep} - {None}
    return text not in ("", ".", "..") and not any(sep in text for sep in separators)


def run_location(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Where ``--run`` points: a name is a folder under the runs root; anything else (a path with
    a separator, ``..``, an absolute path) must be an existing run directory, so no run is ever
    created outside the runs root without being asked for through ``DPNLE_RUNS``."""
    text = str(name_or_path)
    base = runs_root(root)
    if is_run_name(text):
        return base / text
    path = Path(text).expanduser()
    if (path / MANIFEST).is_file():
        return path
    raise InputError(
        f"--run {text!r} is a path, and no run exists there ({path / MANIFEST} is missing). New runs "
        f"go under the runs folder ({base}) by name: pass --run NAME (no '/'), or set DPNLE_RUNS to the "
        "folder that should hold the run."
    )


def check_writable(path: str | os.PathLike, what: str = "folder") -> Path:
    """Refuse, before any work, a folder that cannot be written: ``path`` itself when it exists,
    else the nearest folder above it that does (where it would be created)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        blocked = "" if existing == path else f", so {path} cannot be created"
        raise InputError(f"{existing} is a file, not a folder{blocked}. Move it away, or choose another {what}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"{existing} is not writable (a read-only folder or file system), so the {what} {path} cannot be "
            f"written. Make it writable (chmod u+w {existing}), or choose another {what}."
        )
    return path


SUITE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_suite(suite: str | None) -> str | None:
    """An evaluation suite's name (None or "" = the run's main evaluation)."""
    if suite is None or str(suite).strip() == "":
        return None
    suite = str(suite).strip()
    if not SUITE_PATTERN.match(suite):
        raise InputError(
            f"Suite name {suite!r} must be a plain name (letters, digits, '.', '_' or '-'; no '/'), "
            "e.g. paper-capability."
        )
    return suite


class Run:
    """A run directory and its manifest.

    A run has one main evaluation (``eval/``, ``report/``) and any number of named evaluation
    *suites* (``suites/<suite>/eval``, ``suites/<suite>/report``): protocols that evaluate the
    same localization under other settings (the DPN-LE paper runs its personality, IPIP and
    capability tables each with its own gamma, mode and position policy). ``Run(path, suite)``
    is a view of the run whose evaluation folders and edit-eval stage records are the suite's;
    captures, localizations and the instrument validity checks are shared by all suites.
    """

    def __init__(self, path: Path, suite: str | None = None):
        self.path = Path(path)
        self.suite = check_suite(suite)

    def with_suite(self, suite: str | None) -> Run:
        """This run, seen through evaluation suite ``suite`` (None: the main evaluation)."""
        return Run(self.path, suite)

    def suites(self) -> list[str]:
        """The evaluation suites this run holds (folders under ``suites/``)."""
        folder = self.path / "suites"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and SUITE_PATTERN.match(p.name))

    @property
    def eval_stage(self) -> str:
        """The manifest stage under which this view's edit-eval records its conditions."""
        return "edit-eval" if self.suite is None else f"edit-eval@{self.suite}"

    # -- locations ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def activations_dir(self, concept: str) -> Path:
        return self.path / "activations" / concept

    def neurons_path(self, concept: str, method: str = "dpnle") -> Path:
        suffix = "" if method == "dpnle" else f".{method}"
        return self.path / "neurons" / f"{concept}{suffix}.parquet"

    @property
    def _suite_root(self) -> Path:
        return self.path if self.suite is None else self.path / "suites" / self.suite

    @property
    def eval_dir(self) -> Path:
        return self._suite_root / "eval"

    @property
    def validity_dir(self) -> Path:
        """Instrument validity checks: one set per run, shared by every suite (they depend on the
        model, instrument and scorer, not on any edit)."""
        return self.path / "eval" / "validity"

    @property
    def report_dir(self) -> Path:
        return self._suite_root / "report"

    # -- creation / lookup ------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, name: str | None, model_id: str, root: Path | None = None) -> Run:
        run = cls(run_location(name or default_run_name(model_id), root))
        if run.manifest_path.exists():
            manifest = run.manifest()
            if manifest.get("model", {}).get("id") not in (None, model_id):
                raise ArtifactError(
                    f"Run {run.path} was made with model {manifest['model']['id']!r}, not {model_id!r}. "
                    "Pick another --run name, or pass the run's own model."
                )
            return run
        run.path.mkdir(parents=True, exist_ok=True)
        write_json(
            run.manifest_path,
            {
                "name": run.name,
                "created": now(),
                "model": {"id": model_id},
                "versions": software_versions(),
                "stages": {},
            },
        )
        return run

    @classmethod
    def open(cls, name_or_path: str | os.PathLike, root: Path | None = None) -> Run:
        """An existing run: a name under the runs root, or the path of a run directory."""
        candidate = run_location(name_or_path, root)
        if not (candidate / MANIFEST).exists():
            known = ", ".join(r.name for r in list_runs(root)) or "none"
            raise RunNotFoundError(
                f"No run {str(name_or_path)!r} (looked for {candidate / MANIFEST}). Known runs: {known}. "
                "Start one with `dpnle collect-activations --run NAME ...`."
            )
        return cls(candidate)

    def manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{self.manifest_path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problem = f"is not valid JSON ({exc})"
        else:
            if isinstance(manifest, dict):
                return manifest
            kinds = {list: "a list", str: "a string", bool: "true/false", type(None): "null"}
            kind = kinds.get(type(manifest), "a number")
            problem = f"holds {kind}, not a run record (a JSON object)"
        raise ArtifactError(
            f"{self.manifest_path} {problem}: the run's record is corrupt or truncated. Restore it from a "
            f"backup, or move {self.path} out of the way and start the run again."
        )

    def check_writable(self) -> Run:
        """Refuse a read-only run folder before a stage starts work it could not save."""
        check_writable(self.path, "run folder")
        return self

    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        """Hold the run's lock file while run.json is read, changed and written back: two stages
        of one run in parallel (two presets, two traits) must not lose each other's records."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; one writer at a time is then on the user
            yield
            return
        with open(self.path / MANIFEST_LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        with self._manifest_lock():
            manifest = self.manifest()
            for key, value in fields.items():
                if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                    manifest[key].update(value)
                else:
                    manifest[key] = value
            write_json(self.manifest_path, manifest)
        return manifest

    def record_model(self, loaded: Any) -> dict[str, Any]:
        """Record the model a stage works with (a :class:`dpnle.models.LoadedModel`) in run.json:
        its id, the folder or file its weights came from, and its fingerprint (the digest that
        :func:`load_run_model` and the later stages check). Returns the manifest."""
        return self.update_manifest(
            model={"id": loaded.model_id, "source": loaded.source, "fingerprint": loaded.fingerprint}
        )

    def record_stage(self, stage: str, concept: str, status: str, **params: Any) -> None:
        """Record that ``stage`` for ``concept`` is ``status`` (running | done | failed) with ``params``."""
        with self._manifest_lock():
            manifest = self.manifest()
            stages = manifest.setdefault("stages", {})
            entry = stages.setdefault(stage, {})
            entry[concept] = {"status": status, "updated": now(), **params}
            write_json(self.manifest_path, manifest)

    def stage_status(self, stage: str, concept: str) -> dict[str, Any] | None:
        return self.manifest().get("stages", {}).get(stage, {}).get(concept)

    def __repr__(self) -> str:
        tail = "" if self.suite is None else f", suite={self.suite!r}"
        return f"Run({str(self.path)!r}{tail})"


def load_run_model(
    run: Run,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> Any:
    """Load the model ``run`` was made with (a :class:`dpnle.models.LoadedModel`), and refuse one
    whose weights differ from those its run.json records (by fingerprint digest).

    A run that records no model, or no fingerprint for it, is refused before anything loads:
    without the fingerprint nothing says the weights are the run's."""
    from dpnle import models

    recorded = run.manifest().get("model", {})
    if not recorded.get("id"):
        raise ArtifactError(f"{run.manifest_path} names no model; run `dpnle collect-activations` first.")
    expected = (recorded.get("fingerprint") or {}).get("digest")
    if not expected:
        # A missing provenance field is a refusal: without it nothing says the weights are the run's.
        raise ArtifactError(
            f"{run.manifest_path} records no fingerprint for model {recorded['id']!r}, so the model cannot be checked "
            f"against the one run {run.name} was made with. Run `dpnle collect-activations --run {run.name} ...` "
            "(it records the fingerprint), or start a new run."
        )
    loaded = models.load_model(recorded["id"], dtype=dtype, device=device, device_map=device_map,
                               max_memory=max_memory, offload_folder=offload_folder)
    if loaded.fingerprint.get("digest") != expected:
        raise ArtifactError(
            f"The model now loaded as {recorded['id']!r} (digest {loaded.fingerprint.get('digest')}) is not the one "
            f"run {run.name} was made with (digest {expected}). Restore that model, or start a new run."
        )
    return loaded


def list_runs(root: Path | None = None) -> list[Run]:
    """Every run directory under the runs root, oldest first (by the time run.json last changed);
    their manifests are not read here."""
    root = runs_root(root)
    if not root.exists():
        return []
    runs = [Run(p) for p in root.iterdir() if (p / MANIFEST).exists()]
    return sorted(runs, key=lambda r: r.manifest_path.stat().st_mtime)


def latest_run(model_id: str | None = None, root: Path | None = None) -> Run:
    """The most recently touched run (of ``model_id`` if given).

    A run whose run.json cannot be read, met before the run picked, is refused: it may be the
    most recent run (of that model), and picking an older one instead would be silently wrong.
    Unreadable runs older than the one picked are not read."""
    for run in reversed(list_runs(root)):
        try:
            recorded = run.manifest().get("model", {}).get("id")
        except ArtifactError as exc:
            raise ArtifactError(
                f"Cannot tell which run is the most recent one: {exc} Meanwhile, pass --run NAME to name the run."
            ) from None
        if model_id is None or recorded == model_id:
            return run
    which = f" for model {model_id!r}" if model_id else ""
    raise RunNotFoundError(
        f"No run{which} under {runs_root(root).resolve()}. "
        "Start one with `dpnle collect-activations --trait openness` (or pass --run)."
    )
