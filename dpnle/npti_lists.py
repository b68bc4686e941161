"""NPTI's published neuron lists, imported as the NPTI localization of a run.

NPTI (Deng et al., ICLR 2025; github.com/RUCAIBox/NPTI) publishes, per Big Five trait, two lists
of Llama-3-8B-Instruct gate neurons: ``NPTI/neuron_results/<Trait>_dict.json`` (the neurons that
fire more under the HIGH persona) and ``<Trait>_reversed_dict.json`` (more under the LOW one).
Each is JSON ``{"<layer>": [[layer, neuron, delta_p, p_fire, v95], ...]}``: ``delta_p`` the
list's own (positive) firing-rate difference, ``p_fire`` the firing rate under the list's pole,
``v95`` the 95th percentile of the neuron's activation there.

:func:`import_npti_lists` turns a pair of lists into ``neurons/<concept>.npti.parquet`` in the
schema :func:`dpnle.localize.select_npti` writes (``layer, neuron, p_high, p_low, delta_p, pole,
v95, selected``; only the listed neurons, all selected), so ``dpnle edit-eval --methods npti``
edits with the published neurons instead of a localization of dpnle's own:

- HIGH list row ``[l, i, d, p, v]``: pole high, ``delta_p = d``, ``p_high = p``, ``p_low = p - d``;
- reversed list row: pole low, ``delta_p = -d``, ``p_low = p``, ``p_high = p - d``.

It refuses lists that do not fit the run's model (a layer or neuron beyond the model's layer
count or ``intermediate_size``, from run.json's fingerprint), a neuron present in both lists,
a repeated neuron, a malformed row and a non-finite number. The file's metadata says
``source: "published NPTI lists"`` with each list's path, size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpnle.concepts import TRAITS, get_concept
from dpnle.runs import ArtifactError, InputError, Run, remove_temp_files, write_parquet

SOURCE = "published NPTI lists"
NPTI_REPO = "RUCAIBox/NPTI"
NPTI_COMMIT = "630d2a236e5c8d2484fbd5b71249aedd1fc44195"
MADE_FOR = "meta-llama/Meta-Llama-3-8B-Instruct"
LIST_COLUMNS = ("layer", "neuron", "delta_p", "p_fire", "v95")


class NptiListError(InputError):
    """A published NPTI list that cannot be imported (malformed, or made for another model)."""


def list_file_names(trait: str) -> tuple[str, str]:
    """The (HIGH, reversed) file names NPTI uses for ``trait``."""
    name = get_concept(trait).name
    if name not in TRAITS:
        raise InputError(f"NPTI publishes lists for the Big Five traits only, not {trait!r}.")
    return f"{name.capitalize()}_dict.json", f"{name.capitalize()}_reversed_dict.json"


def read_npti_list(path: str | os.PathLike) -> pd.DataFrame:
    """One published list as a frame ``layer, neuron, delta_p, p_fire, v95`` (sorted by layer,
    neuron). Refuses a malformed file, a row whose layer differs from its key, a repeated neuron
    and a non-finite number."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NptiListError(f"{path} is not a readable NPTI neuron list (JSON): {exc}") from None
    if not isinstance(raw, dict):
        raise NptiListError(f"{path} is not an NPTI neuron list: expected {{\"<layer>\": [[layer, neuron, "
                            f"delta_p, p_fire, v95], ...]}}, got a JSON {type(raw).__name__}.")
    rows: list[list[float]] = []
    for key, entries in raw.items():
        try:
            layer = int(key)
        except ValueError:
            raise NptiListError(f"{path}: key {key!r} is not a layer number.") from None
        if not isinstance(entries, list):
            raise NptiListError(f"{path}: layer {key} holds {type(entries).__name__}, not a list of rows.")
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 5:
                raise NptiListError(f"{path}: layer {key} has a row {str(entry)[:80]} that is not "
                                    "[layer, neuron, delta_p, p_fire, v95].")
            try:
                values = [float(x) for x in entry]
            except (TypeError, ValueError):
                raise NptiListError(f"{path}: layer {key} has a non-numeric row {str(entry)[:80]}.") from None
            if values[0] != layer:
                raise NptiListError(f"{path}: a row under layer {key} names layer {entry[0]}.")
            rows.append(values)
    frame = pd.DataFrame(rows, columns=list(LIST_COLUMNS), dtype=np.float64)
    bad = ~np.isfinite(frame[["delta_p", "p_fire", "v95"]].to_numpy()).all(axis=1)
    if bad.any():
        first = frame[bad].iloc[0]
        raise NptiListError(f"{path}: {int(bad.sum())} row(s) hold a non-finite number (NaN or inf), e.g. layer "
                            f"{int(first['layer'])} neuron {first['neuron']:g}; an edit of v95 NaN is no edit.")
    neuron = frame["neuron"].to_numpy()
    if (neuron != np.round(neuron)).any() or (neuron < 0).any() or (frame["layer"] < 0).any():
        raise NptiListError(f"{path}: layer and neuron numbers must be whole numbers >= 0.")
    frame["layer"] = frame["layer"].astype(np.int64)
    frame["neuron"] = frame["neuron"].astype(np.int64)
    repeated = frame.duplicated(["layer", "neuron"])
    if repeated.any():
        first = frame[repeated].iloc[0]
        raise NptiListError(f"{path} lists {int(repeated.sum())} neuron(s) twice, e.g. layer {first['layer']} "
                            f"neuron {first['neuron']}.")
    return frame.sort_values(["layer", "neuron"], kind="stable").reset_index(drop=True)


def lists_shape(*frames: pd.DataFrame) -> dict[str, int]:
    """The smallest model the lists fit: ``num_layers`` = max layer + 1, ``intermediate_size`` =
    max neuron + 1."""
    both = pd.concat(frames, ignore_index=True)
    if both.empty:
        return {"num_layers": 0, "intermediate_size": 0}
    return {"num_layers": int(both["layer"].max()) + 1, "intermediate_size": int(both["neuron"].max()) + 1}


def check_fits(shape: dict[str, int], model: dict[str, Any], what: str = "The NPTI lists") -> None:
    """Refuse lists whose layers or neurons do not exist in ``model`` (a fingerprint with
    ``num_layers`` and ``intermediate_size``), naming both shapes."""
    missing = [k for k in ("num_layers", "intermediate_size") if not model.get(k)]
    if missing:
        raise ArtifactError(
            f"The run's model record names no {' or '.join(missing)}, so the lists cannot be checked against its "
            "shape. Run `dpnle collect-activations` for this run first (it records the model's fingerprint)."
        )
    theirs = f"{shape['num_layers']} layers x {shape['intermediate_size']} neurons"
    ours = f"{int(model['num_layers'])} layers x {int(model['intermediate_size'])} neurons"
    if shape["num_layers"] > int(model["num_layers"]) or shape["intermediate_size"] > int(model["intermediate_size"]):
        raise NptiListError(
            f"{what} were made for another architecture: they need at least {theirs}, but the run's model "
            f"{model.get('id')!r} has {ours}. NPTI's published lists are for {MADE_FOR} (32 layers x 14336)."
        )


def lists_to_selection(high: pd.DataFrame, low: pd.DataFrame) -> pd.DataFrame:
    """The HIGH and reversed lists as rows of :func:`dpnle.localize.select_npti`'s schema.

    Refuses a neuron present in both lists (it cannot be raised and clamped at once)."""
    both = high.merge(low, on=["layer", "neuron"])
    if len(both):
        first = both.iloc[0]
        raise NptiListError(f"{len(both)} neuron(s) are in both the HIGH and the reversed list, e.g. layer "
                            f"{first['layer']} neuron {first['neuron']}: the lists are not a pair.")
    parts = []
    for frame, pole in ((high, "high"), (low, "low")):
        d, p = frame["delta_p"].to_numpy(np.float64), frame["p_fire"].to_numpy(np.float64)
        parts.append(pd.DataFrame({
            "layer": frame["layer"].to_numpy(np.int16),
            "neuron": frame["neuron"].to_numpy(np.int32),
            "p_high": p if pole == "high" else p - d,
            "p_low": p - d if pole == "high" else p,
            "delta_p": d if pole == "high" else -d,
            "pole": pd.array([pole] * len(frame), dtype="string"),
            "v95": frame["v95"].to_numpy(np.float64),
            "selected": np.ones(len(frame), dtype=bool),
        }))
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["layer", "neuron"], kind="stable").reset_index(drop=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def registry_paths(trait: str) -> tuple[Path, Path]:
    """The pinned (HIGH, reversed) lists of ``trait`` from dpnle's dataset registry, fetched
    (cache, then ``$DPNLE_DATA_MIRROR``, then the pinned URL) and verified by SHA-256."""
    from dpnle import datasets

    name = get_concept(trait).name
    names = datasets.npti_list_names(name)
    if names is None:
        high_file, low_file = list_file_names(name)
        raise InputError(
            f"dpnle has no pinned copy of NPTI's {name} lists (the offline mirror lacks them): download "
            f"NPTI/neuron_results/{high_file} and {low_file} from github.com/{NPTI_REPO} at {NPTI_COMMIT[:7]} "
            "into a folder and pass --dir FOLDER."
        )
    return datasets.fetch(names[0]), datasets.fetch(names[1])


@dataclass
class ImportResult:
    concept: str
    path: Path
    n_high: int
    n_low: int
    shape: dict[str, int]
    files: list[dict[str, Any]]


def import_npti_lists(
    run: Run,
    trait: str,
    high_path: str | os.PathLike,
    low_path: str | os.PathLike,
    overwrite: bool = False,
    registry: tuple[str, str] | None = None,
) -> ImportResult:
    """Write NPTI's published (HIGH, reversed) lists as ``run``'s NPTI localization of ``trait``.

    The run must record its model's fingerprint (``num_layers``, ``intermediate_size``,
    ``digest``); an existing ``neurons/<concept>.npti.parquet`` is replaced only with
    ``overwrite``. Records the stage ``localize`` / ``<concept>:npti`` like ``dpnle localize``.
    """
    from dpnle.localize import _digest, _require_run_fingerprint, _run_model

    concept = get_concept(trait).name
    if concept not in TRAITS:
        raise InputError(f"NPTI publishes lists for the Big Five traits only, not {trait!r}.")
    out = run.neurons_path(concept, "npti")
    run_model = _run_model(run)
    _require_run_fingerprint(run, _digest(run_model), out)
    fingerprint = {**(run_model.get("fingerprint") or {}), **{k: v for k, v in run_model.items() if k != "fingerprint"}}
    paths = [Path(high_path), Path(low_path)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"No NPTI list at {p}: expected NPTI/neuron_results/{p.name} "
                                    f"(github.com/{NPTI_REPO} at {NPTI_COMMIT[:7]}).")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (an NPTI localization of {concept}); pass --overwrite to replace it "
                              "with the published lists.")
    high, low = read_npti_list(paths[0]), read_npti_list(paths[1])
    shape = lists_shape(high, low)
    check_fits(shape, fingerprint)
    frame = lists_to_selection(high, low)
    files = [{"path": str(p.resolve()), "name": p.name, "bytes": p.stat().st_size, "sha256": _sha256(p),
              "registry": registry[i] if registry else None, "pole": pole}
             for i, (p, pole) in enumerate(zip(paths, ("high", "low"), strict=True))]  # fmt: skip
    width = int(fingerprint["intermediate_size"])
    num_layers = int(fingerprint["num_layers"])
    total = len(frame)
    params = {
        "site": "gate",
        "policy": "response-mean",
        "source": SOURCE,
        "reference": f"github.com/{NPTI_REPO}@{NPTI_COMMIT[:7]} NPTI/neuron_results",
        "made_for": MADE_FOR,
        "lists_shape": shape,
        "n_high": len(high),
        "n_low": len(low),
    }
    metadata = {
        "stage": "localize",
        "concept": concept,
        "method": "npti",
        "imported": True,
        "source": SOURCE,
        "files": files,
        "parameters": params,
        "model": run_model,
        "pairs_digest": None,
        "total_selected": total,
        "total_share": total / (num_layers * width) if num_layers and width else None,
    }
    remove_temp_files(out)
    path = write_parquet(out, frame, metadata)
    run.record_stage("localize", f"{concept}:npti", "done", method="npti", path=str(path.relative_to(run.path)),
                     total_selected=total, total_share=metadata["total_share"],
                     files=[{k: f[k] for k in ("name", "sha256")} for f in files], **params)
    return ImportResult(concept, path, len(high), len(low), shape, files)


def looks_like_made_for(model_id: str | None) -> bool:
    """Whether ``model_id`` names the model NPTI's lists were made for (Llama-3-8B-Instruct)."""
    text = (model_id or "").lower().replace("_", "-")
    return "llama-3-8b-instruct" in text
