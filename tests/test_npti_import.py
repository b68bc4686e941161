"""dpnle import-npti: NPTI's published neuron lists as a run's NPTI localization."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import INTERMEDIATE, LAYERS

from dpnle.cli import main
from dpnle.edits import build_edit
from dpnle.localize import load_selection
from dpnle.npti_lists import NptiListError, import_npti_lists, read_npti_list
from dpnle.runs import Run, parquet_metadata, read_parquet

FINGERPRINT = {"id": "tiny-llama", "digest": "feed0123", "num_layers": LAYERS,
               "intermediate_size": INTERMEDIATE, "hidden_size": 32}
MIRROR = Path(os.environ.get("DPNLE_DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
NPTI_LISTS = MIRROR / "RUCAIBox" / "NPTI" / "630d2a236e5c8d2484fbd5b71249aedd1fc44195" / "NPTI" / "neuron_results"

HIGH = {"1": [[1, 5, 0.3, 0.8, 1.5], [1, 2, 0.12, 0.5, 0.7]], "3": [[3, 63, 0.5, 0.9, 2.0]]}
LOW = {"1": [[1, 7, 0.2, 0.6, 0.9]], "2": [[2, 0, 0.4, 0.7, 1.1]]}


def make_run(tmp_path, fingerprint=FINGERPRINT, name="r") -> Run:
    run = Run.create_or_open(name, fingerprint["id"], root=tmp_path)
    run.update_manifest(model={"id": fingerprint["id"], "fingerprint": fingerprint})
    return run


def write_lists(folder: Path, high=HIGH, low=LOW, trait="Openness") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    h, lo = folder / f"{trait}_dict.json", folder / f"{trait}_reversed_dict.json"
    h.write_text(json.dumps(high))
    lo.write_text(json.dumps(low))
    return h, lo


def test_synthetic_lists_round_trip_to_select_npti_rows(tmp_path):
    run = make_run(tmp_path)
    h, lo = write_lists(tmp_path / "lists")
    result = import_npti_lists(run, "openness", h, lo)
    assert (result.n_high, result.n_low) == (3, 2) and result.shape == {"num_layers": 4, "intermediate_size": 64}
    frame = read_parquet(run.neurons_path("openness", "npti"))
    assert list(frame.columns) == ["layer", "neuron", "p_high", "p_low", "delta_p", "pole", "v95", "selected"]
    expected = pd.DataFrame(
        [(1, 2, 0.5, 0.38, 0.12, "high", 0.7), (1, 5, 0.8, 0.5, 0.3, "high", 1.5), (1, 7, 0.4, 0.6, -0.2, "low", 0.9),
         (2, 0, 0.3, 0.7, -0.4, "low", 1.1), (3, 63, 0.9, 0.4, 0.5, "high", 2.0)],
        columns=["layer", "neuron", "p_high", "p_low", "delta_p", "pole", "v95"],
    )  # fmt: skip
    for column in ("layer", "neuron"):
        np.testing.assert_array_equal(frame[column].to_numpy(), expected[column].to_numpy())
    for column in ("p_high", "p_low", "delta_p", "v95"):
        np.testing.assert_allclose(frame[column].to_numpy(), expected[column].to_numpy(), atol=1e-12)
    assert list(frame["pole"]) == list(expected["pole"]) and frame["selected"].all()
    meta = parquet_metadata(run.neurons_path("openness", "npti"))
    assert meta["source"] == "published NPTI lists" and meta["imported"] is True and meta["method"] == "npti"
    assert [f["sha256"] for f in meta["files"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (h, lo)]
    assert run.stage_status("localize", "openness:npti")["status"] == "done"
    # What edit-eval reads: the selection (no pairs digest needed for imported lists) and the edit.
    assert len(load_selection(run, "openness", "npti")) == 5
    up = build_edit(run, "openness", "npti", "up", npti_mask="none")
    assert sorted(up.vectors) == [1, 3] and up.vectors[1][0].tolist() == [2, 5]
    assert up.clamp[1].tolist() == [7] and 2 not in up.clamp  # clamps only in layers with targets
    sig = lambda d: 1 / (1 + np.exp(-10 * (d - 0.15)))  # noqa: E731
    np.testing.assert_allclose(up.vectors[1][1].numpy(), [0.7 * sig(0.12), 1.5 * sig(0.3)], rtol=1e-6)
    down = build_edit(run, "openness", "npti", "down", npti_mask="none")
    # LOW targets: the sigmoid of the list's own (positive) difference, i.e. -delta_p.
    np.testing.assert_allclose(down.vectors[2][1].numpy(), [-1.1 * sig(0.4)], rtol=1e-6)


def test_lists_for_another_shape_are_refused_naming_both(tmp_path):
    run = make_run(tmp_path)
    wide = {"1": [[1, 64, 0.3, 0.8, 1.5]]}
    h, lo = write_lists(tmp_path / "wide", high=wide)
    with pytest.raises(NptiListError) as info:
        import_npti_lists(run, "openness", h, lo)
    assert "at least 3 layers x 65 neurons" in str(info.value) and "4 layers x 64 neurons" in str(info.value)
    deep = {"4": [[4, 1, 0.3, 0.8, 1.5]]}
    h, lo = write_lists(tmp_path / "deep", high=deep)
    with pytest.raises(NptiListError, match="5 layers x 8 neurons.*4 layers x 64"):
        import_npti_lists(run, "openness", h, lo)
    assert not run.neurons_path("openness", "npti").exists()


@pytest.mark.parametrize("case, match", [
    ({"high": {"1": [[1, 7, 0.3, 0.8, 1.5]]}}, "in both the HIGH and the reversed list"),
    ({"high": {"1": [[1, 5, 0.3, 0.8, float("nan")]]}}, "non-finite"),
    ({"high": {"1": [[1, 5, 0.3, 0.8, float("inf")]]}}, "non-finite"),
    ({"high": {"1": [[2, 5, 0.3, 0.8, 1.0]]}}, "names layer 2"),
    ({"high": {"1": [[1, 5, 0.3, 0.8]]}}, "not \\[layer, neuron"),
    ({"high": {"1": [[1, 5, 0.3, 0.8, 1.0], [1, 5, 0.2, 0.7, 1.0]]}}, "twice"),
])  # fmt: skip
def test_bad_lists_are_refused(tmp_path, case, match):
    run = make_run(tmp_path)
    h, lo = write_lists(tmp_path / "bad", **case)
    with pytest.raises(NptiListError, match=match):
        import_npti_lists(run, "openness", h, lo)


def test_existing_localization_needs_overwrite_and_run_needs_fingerprint(tmp_path):
    run = make_run(tmp_path)
    h, lo = write_lists(tmp_path / "lists")
    import_npti_lists(run, "openness", h, lo)
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_npti_lists(run, "openness", h, lo)
    import_npti_lists(run, "openness", h, lo, overwrite=True)
    bare = Run.create_or_open("bare", "tiny-llama", root=tmp_path)
    with pytest.raises(Exception, match="fingerprint"):
        import_npti_lists(bare, "openness", h, lo)
    with pytest.raises(ValueError, match="Big Five"):
        import_npti_lists(run, "power", h, lo)


def test_cli_import_and_missing_openness_registry_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPNLE_RUNS", str(tmp_path / "runs"))
    run = make_run(tmp_path / "runs")
    write_lists(tmp_path / "lists")
    with pytest.raises(SystemExit) as info:
        main(["import-npti", "--run", run.name, "--trait", "openness", "--dir", str(tmp_path / "lists")])
    out = capsys.readouterr()
    assert info.value.code == 0 and "3 HIGH + 2 LOW" in out.out
    with pytest.raises(SystemExit) as info:
        main(["import-npti", "--run", run.name, "--trait", "openness", "--from-registry", "--overwrite"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert info.value.code == 2 and len(lines) == 1  # one clear line
    assert "no pinned copy of NPTI's openness lists" in lines[0] and "--dir" in lines[0]


def _fake_llama3_8b():
    """Llama-3-8B's shape (32 layers, intermediate 14336) on the meta device: no weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.skipif(not (NPTI_LISTS / "Agreeableness_dict.json").is_file(), reason="needs the dataset mirror")
def test_published_agreeableness_lists(tmp_path):
    high, low = read_npti_list(NPTI_LISTS / "Agreeableness_dict.json"), read_npti_list(
        NPTI_LISTS / "Agreeableness_reversed_dict.json")
    assert (len(high), len(low)) == (21008, 21083)
    llama3 = {"id": "meta-llama/Meta-Llama-3-8B-Instruct", "digest": "0123beef", "num_layers": 32,
              "intermediate_size": 14336, "hidden_size": 4096}
    run = make_run(tmp_path, llama3)
    result = import_npti_lists(run, "agreeableness", NPTI_LISTS / "Agreeableness_dict.json",
                               NPTI_LISTS / "Agreeableness_reversed_dict.json")
    assert result.shape == {"num_layers": 32, "intermediate_size": 14336}
    edit = build_edit(run, "agreeableness", "npti", "up", gamma=1.4, positions="generated")
    assert edit.num_neurons == 21008 and edit.keep == 0.9
    assert sum(v.numel() for v in edit.clamp.values()) == 21083
    with edit.apply(_fake_llama3_8b()) as handle:  # the shape check accepts Llama-3-8B's shape
        assert handle.active
    llama2 = {**llama3, "id": "llama-2-7b", "num_layers": 32, "intermediate_size": 11008}
    other = make_run(tmp_path, llama2, name="llama2")
    with pytest.raises(NptiListError, match="32 layers x 14336 neurons.*32 layers x 11008 neurons"):
        import_npti_lists(other, "agreeableness", NPTI_LISTS / "Agreeableness_dict.json",
                          NPTI_LISTS / "Agreeableness_reversed_dict.json")


@pytest.mark.skipif(not (NPTI_LISTS / "Agreeableness_dict.json").is_file(), reason="needs the dataset mirror")
def test_registry_pins_the_published_lists(tmp_path, monkeypatch):
    from dpnle import datasets
    from dpnle.npti_lists import registry_paths

    monkeypatch.setenv("DPNLE_DATA_MIRROR", str(MIRROR))
    monkeypatch.setenv("DPNLE_CACHE", str(tmp_path / "cache"))
    high, low = registry_paths("agreeableness")
    assert high.read_bytes() == (NPTI_LISTS / "Agreeableness_dict.json").read_bytes()
    assert datasets.REGISTRY["npti-neurons-agreeableness-reversed"].sha256 == hashlib.sha256(low.read_bytes()).hexdigest()
    assert datasets.npti_list_names("openness") is None
