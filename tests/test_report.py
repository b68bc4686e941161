"""Stage 4 report on synthetic run directories: files, figures, self-contained HTML, Chromium render."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_leakage import CIRCLE, TRAITS5, synthetic_rows

from dpnle import report
from dpnle.evaluate import Condition
from dpnle.instruments import VALIDITY_COLUMNS
from dpnle.localize import DPNLE_COLUMNS
from dpnle.runs import Run, write_parquet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEERED_TRAITS = ["openness", "extraversion", "neuroticism"]
STEERED_VALUES = ["power", "security", "universalism"]
CONDITIONS = [
    Condition("dpnle", "up", 0.5), Condition("dpnle", "up", 1.0),
    Condition("dpnle", "down", 0.5), Condition("dpnle", "down", 1.0),
    Condition("random", "up", 1.0, 0), Condition("random", "up", 1.0, 1),
    Condition("random", "down", 1.0, 0), Condition("random", "down", 1.0, 1),
    Condition("prompt", "up"), Condition("prompt", "down"),
]


def shift(t: str, cond: Condition, j: str) -> float:
    sign = 1.0 if cond.direction == "up" else -1.0
    if cond.method == "random":
        return sign * (0.05 if j == t else 0.03)
    if t == "security" and cond.method == "dpnle":  # a target that never moves: flagged rows
        return 0.0 if j == t else 0.05
    strength = cond.gamma if cond.method != "prompt" else 1.2
    return sign * strength * (0.8 if j == t else 0.15 * (1 + len(j) % 3))


def write_neurons(run: Run, concept: str, seed: int, layers=range(2, 6), width: int = 64) -> None:
    rng = np.random.default_rng(seed)
    frames = []
    for layer in layers:
        d = rng.normal(0.0, 0.6, width)
        delta = d * 0.3
        selected = (np.abs(d) > 1.0) & (np.abs(delta) > np.quantile(np.abs(delta), 0.5))
        frames.append(pd.DataFrame({
            "layer": np.full(width, layer, dtype=np.int16), "neuron": np.arange(width, dtype=np.int32),
            "mean_high": delta, "mean_low": np.zeros(width), "var_high": np.ones(width), "var_low": np.ones(width),
            "n_high": np.full(width, 32, dtype=np.int64), "n_low": np.full(width, 32, dtype=np.int64),
            "delta": delta, "cohens_d": d, "selected": selected,
            "pole": np.where(d > 0, "high", "low"), "weight": np.where(selected, 0.875, np.nan),
        }))
    frame = pd.concat(frames, ignore_index=True)[list(DPNLE_COLUMNS)]
    write_parquet(run.neurons_path(concept), frame, metadata={
        "stage": "localize", "concept": concept, "method": "dpnle", "pairs_digest": "0123abcd",
        "model": (run.manifest().get("model") or {}).get("fingerprint")})
    run.record_stage("localize", concept, "done", method="dpnle", total_selected=int(frame["selected"].sum()),
                     layers="2-5", quantile=0.5, tau=1.0)


SETTINGS = {"limit": 4}


def write_eval(run: Run, rows: pd.DataFrame, settings: dict = SETTINGS) -> None:
    """Condition files with the provenance edit-eval writes (model, localization, settings
    digest), and the stage record that makes them the concepts' current conditions."""
    from dpnle.evaluate import _NEURON_SOURCES, condition_digest, localization_digests

    model = run.manifest()["model"]["fingerprint"]
    for (concept, key), part in rows.groupby(["concept", "condition"]):
        method = part["method"].iloc[0]
        source = _NEURON_SOURCES.get(method)
        localization = localization_digests(run, concept, [method])[source] if source else None
        write_parquet(run.eval_dir / concept / f"{key}.parquet", part.reset_index(drop=True), metadata={
            "kind": "eval", "concept": concept, "condition": {"method": method}, "model": model,
            "localization": localization, "settings_digest": condition_digest(settings, model["digest"], localization),
        })
    for concept, part in rows.groupby("concept"):
        run.record_stage("edit-eval", concept, "done", conditions=sorted(set(part["condition"])), settings=settings)


def neutral_rows(concepts, conditions) -> pd.DataFrame:
    records = []
    for concept in concepts:
        for cond in [Condition("none"), *conditions]:
            kl = 0.0 if cond.method == "none" else 0.02 * (1 + cond.gamma) * (2 if cond.method == "random" else 1)
            for scorer, value in (("kl", kl), ("perplexity", 20 + 10 * kl), ("perplexity_unedited", 20.0)):
                records.append({"concept": concept, "condition": cond.key, "method": cond.method,
                                "direction": cond.direction, "gamma": float(cond.gamma), "seed": cond.seed,
                                "benchmark": "neutral", "scorer": scorer, "item_id": "all", "dimension": "",
                                "key": np.nan, "prompt": "", "output": "", "raw": value, "score": value,
                                "chance": np.nan, "num_neurons": 0 if cond.method in ("none", "prompt") else 40})
    return pd.DataFrame(records)


def write_validity(run: Run, instrument: str, scorer: str, concepts, passed, with_columns: bool) -> None:
    frame = pd.DataFrame({c: [0.0] * len(concepts) for c in VALIDITY_COLUMNS})
    frame["instrument"], frame["scorer"], frame["concept"] = instrument, scorer, list(concepts)
    frame["passed"] = [bool(p) for p in passed]
    frame["cohens_d"] = [1.2 if p else 0.1 for p in passed]
    frame["sign_p"] = [0.001 if p else 0.4 for p in passed]
    frame["collapse"] = False
    frame["collapse_testable"] = instrument != "pvq40"
    if not with_columns:  # the layout the brief describes: instrument and scorer in the metadata only
        frame = frame.drop(columns=["instrument", "scorer"])
    write_parquet(run.eval_dir / "validity" / f"{instrument}-{scorer}.parquet", frame,
                  metadata={"kind": "validity", "instrument": instrument, "scorer": scorer})


def new_run(name: str, root: Path) -> Run:
    """A run whose run.json records its model's fingerprint, as collect-activations leaves it."""
    run = Run.create_or_open(name, "tiny/model", root=root)
    run.update_manifest(model={"id": "tiny/model", "fingerprint": {
        "digest": "abc123def4567890", "class": "LlamaForCausalLM", "num_layers": 6, "intermediate_size": 64}})
    return run


def make_full_run(root: Path) -> Run:
    run = new_run("synthetic", root)
    for i, concept in enumerate([*STEERED_TRAITS, *STEERED_VALUES]):
        write_neurons(run, concept, seed=i)
    rows = pd.concat([
        synthetic_rows("ipip120", "likert", TRAITS5, STEERED_TRAITS, CONDITIONS, shift, n_items=4),
        synthetic_rows("pvq40", "likert", CIRCLE, STEERED_VALUES, CONDITIONS, shift, n_items=4, seed=2),
        neutral_rows([*STEERED_TRAITS, *STEERED_VALUES], CONDITIONS),
    ], ignore_index=True)
    write_eval(run, rows)
    write_validity(run, "ipip120", "likert", TRAITS5, [False] * 5, with_columns=True)
    write_validity(run, "pvq40", "likert", CIRCLE, [c != "power" for c in CIRCLE], with_columns=False)
    return run


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = make_full_run(tmp_path_factory.mktemp("runs"))
    return run, report.build_report(run)


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 1024


# ---------------------------------------------------------------------------------------------


def test_all_files_appear(full_report):
    run, result = full_report
    root = run.report_dir
    assert result.path == root and result.index_html == root / "index.html" and result.report_md == root / "report.md"
    for name in ("leakage", "paper_table", "overlap", "validity", "neurons_per_layer", "shifts"):
        assert (root / f"{name}.parquet").exists(), name
        assert result.tables[name] == root / f"{name}.parquet"
    for instrument, scorer in (("ipip120", "likert"), ("pvq40", "likert")):
        for method in ("dpnle", "random", "prompt"):
            for direction in ("up", "down"):
                assert (root / f"leakage_matrix_{instrument}-{scorer}-{method}-{direction}.parquet").exists()
    names = {p.name for p in result.figures}
    assert {"neurons_per_layer.png", "overlap.png", "circumplex_pvq40-likert-dpnle.png",
            "leakage_ipip120-likert-dpnle.png", "leakage_pvq40-likert-random.png",
            "gamma_ipip120-likert.png", "gamma_pvq40-likert.png"} <= names
    for path in result.figures:
        assert path.exists() and path.parent == root / "figures"
        assert _is_png(path), path
    # No temporary folders left beside the report.
    assert not [p for p in run.path.iterdir() if p.name.startswith(".report")]
    assert run.stage_status("leakage-report", "all")["status"] == "done"


def test_tables_hold_the_numbers(full_report):
    run, _ = full_report
    root = run.report_dir
    leak = pd.read_parquet(root / "leakage.parquet")
    # Both gammas of DPN-LE are in the table; security's DPN-LE target never moves.
    assert set(leak.loc[leak["method"] == "dpnle", "gamma"]) == {0.5, 1.0}
    sec = leak[(leak["target"] == "security") & (leak["method"] == "dpnle")]
    assert not sec["target_moved"].any() and np.isfinite(sec["nlr"]).all()
    pvq = leak[leak["instrument"] == "pvq40"].set_index(["method", "direction", "gamma", "target"])
    assert pvq.loc[("dpnle", "up", 1.0, "power"), "valid"] == 0.0
    assert pvq.loc[("dpnle", "up", 1.0, "universalism"), "valid"] == 1.0
    assert set(leak.loc[leak["instrument"] == "ipip120", "valid"]) == {0.0}
    matrix = pd.read_parquet(root / "leakage_matrix_pvq40-likert-dpnle-up.parquet")
    assert {"target", "gamma", "target_moved", *CIRCLE} <= set(matrix.columns)
    assert len(matrix) == 2 * len(STEERED_VALUES)
    validity = pd.read_parquet(root / "validity.parquet")
    assert len(validity) == 15 and validity["instrument"].notna().all()
    overlap = pd.read_parquet(root / "overlap.parquet")
    assert len(overlap) == 15 and overlap["jaccard"].between(0, 1).all()
    paper = pd.read_parquet(root / "paper_table.parquet")
    # One row per gamma (dpnle at 0.5 and 1; random at 1; prompt; none): no cell mixes strengths.
    assert {"concept", "method", "neurons", "gamma"} <= set(paper.columns) and len(paper) == 6 * 5
    assert set(paper.loc[paper["method"] == "dpnle", "gamma"]) == {"0.5", "1"}


def test_html_is_self_contained(full_report):
    _, result = full_report
    text = result.index_html.read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == len(result.figures)
    for path in result.figures:
        assert base64.b64encode(path.read_bytes()).decode() in uris
    assert not re.search(r"https?://", text)
    assert not re.search(r"<(script|link|iframe)\b", text)
    assert "<table>" in text and "DPN-LE" in text


def test_markdown_content(full_report):
    run, result = full_report
    md = result.report_md.read_text()
    assert "abc123def4567890" in md and "tiny/model" in md
    assert "ipip120 / likert FAILED the validity check for every concept" in md
    assert "numbers from this instrument are not evidence on this model" in md
    assert "pvq40 / likert FAILED the validity check for power: for those concepts" in md
    assert "acquiescence cannot be tested" in md
    assert "NeVA" in md and "not public" in md and "random-neuron control" in md
    for path in result.figures:
        assert f"]({path.relative_to(run.report_dir).as_posix()})" in md
    assert "not moved" in md  # security's DPN-LE rows
    assert "DPN-LE at gamma 1: target change" in md


def test_rebuild_replaces_the_report(tmp_path):
    run = new_run("rebuild", tmp_path)
    for i, concept in enumerate(STEERED_TRAITS):
        write_neurons(run, concept, seed=20 + i)
    first = report.build_report(run)
    stale = run.report_dir / "figures" / "stale.png"
    stale.write_bytes(b"old")
    again = report.build_report(run)
    assert not stale.exists()
    assert sorted(p.name for p in again.figures) == sorted(p.name for p in first.figures)
    assert not [p for p in run.path.iterdir() if p.name.startswith(".report")]


_REPORT_VICTIM = """
import time
from matplotlib.figure import Figure
from dpnle import report

real_savefig = Figure.savefig

def slow_savefig(self, *args, **kwargs):
    real_savefig(self, *args, **kwargs)
    time.sleep(0.3)

Figure.savefig = slow_savefig
report.build_report({run!r})
"""


def test_killed_report_leaves_the_old_one_whole_and_rebuilds_the_same(tmp_path):
    import os
    import random
    import sys

    from helpers import kill_when

    from dpnle.runs import read_parquet

    run = make_full_run(tmp_path / "runs")
    old = report.build_report(run)
    old_tables = {name: read_parquet(path) for name, path in old.tables.items()}
    after = random.Random(5).randint(1, 4)  # kill after this many figures of the new build
    victim = subprocess.Popen([sys.executable, "-c", _REPORT_VICTIM.format(run=str(run.path))],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    kill_when(victim, lambda: len(list(run.path.glob(".report-*/figures/*.png"))) >= after, timeout=120)
    assert list(run.path.glob(".report-*")), "killed too late: the build had finished"
    # The report a reader finds is still the whole earlier one.
    assert (run.report_dir / "index.html").read_text() == old.index_html.read_text()
    rebuilt = report.build_report(run)
    assert not [p for p in run.path.iterdir() if p.name.startswith(".report")]
    assert sorted(rebuilt.tables) == sorted(old_tables)
    for name, path in rebuilt.tables.items():
        pd.testing.assert_frame_equal(read_parquet(path), old_tables[name], check_exact=True)
    assert sorted(p.name for p in rebuilt.figures) == sorted(p.name for p in old.figures)


def test_localize_only_run(tmp_path):
    run = new_run("loc-only", tmp_path)
    for i, concept in enumerate(TRAITS5):
        write_neurons(run, concept, seed=10 + i)
    result = report.build_report(run)
    assert {p.name for p in result.figures} == {"neurons_per_layer.png", "overlap.png"}
    assert all(_is_png(p) for p in result.figures)
    md = result.report_md.read_text()
    assert "no edit-eval results yet" in md and "dpnle edit-eval --run loc-only" in md
    assert (run.report_dir / "overlap.parquet").exists() and (run.report_dir / "index.html").exists()
    assert not (run.report_dir / "leakage.parquet").exists()


def test_empty_run(tmp_path):
    run = Run.create_or_open("empty", "tiny/model", root=tmp_path)
    result = report.build_report(str(run.path))
    assert result.figures == [] and result.index_html.exists()
    assert "No localization in this run yet" in result.report_md.read_text()


def test_capability_series_prefers_a_benchmark():
    rows = neutral_rows(["openness"], [Condition("dpnle", "up", 1.0)])
    cap, label = report.capability_series(rows)
    assert label == "KL on neutral text" and len(cap) == 2
    bench = rows.head(2).assign(benchmark="gsm8k", scorer="exact_match", score=[0.5, 0.25])
    cap, label = report.capability_series(pd.concat([rows, bench], ignore_index=True))
    assert label == "gsm8k (exact_match)" and len(cap) == 1


# ---------------------------------------------------------------------------------------------
# rendering in a real browser


def chromium_binary() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_html_renders_in_headless_chromium(full_report, tmp_path):
    browser = chromium_binary()
    if browser is None:
        pytest.skip("no chromium binary (apt-get install chromium) to render index.html")
    _, result = full_report
    shot = tmp_path / "report.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           result.index_html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    # The page is not blank: a real render has many distinct colours.
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 1500 and pixels.shape[1] >= 1000
    assert len(np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"


def test_screenshot_script_usage(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage" in usage.stderr
    missing = subprocess.run(["bash", str(SCRIPT), str(tmp_path), str(tmp_path / "x.png")], capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode == 1 and "leakage-report" in missing.stderr


def test_report_says_when_too_few_items_make_the_check_unpassable(tmp_path):
    run = Run.create_or_open("few-items", "tiny/model", root=tmp_path)
    frame = pd.DataFrame({c: [0.0, 0.0] for c in VALIDITY_COLUMNS})
    frame["instrument"], frame["scorer"], frame["concept"] = "pvq40", "statement", ["power", "universalism"]
    frame["n_items"] = [3, 6]
    frame["passed"] = False
    write_parquet(run.eval_dir / "validity" / "pvq40-statement.parquet", frame,
                  metadata={"kind": "validity", "instrument": "pvq40", "scorer": "statement"})
    md = report.build_report(run).report_md.read_text()
    line = next(text for text in md.splitlines() if "cannot reach" in text)
    assert "power (3 items, smallest possible p 0.25)" in line and "universalism" not in line
