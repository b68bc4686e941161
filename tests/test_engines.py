"""dpnle.engines without vLLM: engine choice, the edit as plain data, the fired-edit check.

The parity of vLLM with the Hugging Face path is in tests/test_vllm_parity.py (``make test-vllm``)."""

from __future__ import annotations

import re

import pytest
import torch

from dpnle import engines
from dpnle.edits import Edit
from dpnle.evaluate import EvalConfig
from dpnle.runs import InputError


def test_unknown_engine_is_one_line():
    with pytest.raises(InputError, match="choose one of hf, vllm"):
        engines.check_engine("tgi")


def test_vllm_missing_names_the_setup(monkeypatch):
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(InputError) as err:
        engines.check_engine("vllm")
    assert "make setup-vllm" in str(err.value) and "dpnle[vllm]" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="make setup-vllm"):
        EvalConfig(engine="vllm", benchmarks=("gsm8k",))


def test_cli_engine_vllm_without_vllm(monkeypatch, tmp_path, capsys):
    from dpnle.cli import main

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    monkeypatch.setenv("DPNLE_RUNS", str(tmp_path))
    monkeypatch.delenv("DPNLE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["edit-eval", "--trait", "openness", "--engine", "vllm", "--benchmarks", "gsm8k"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "make setup-vllm" in err and "Traceback" not in err


def test_engine_recorded_only_where_it_generates(monkeypatch):
    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    monkeypatch.setattr(engines, "engine_settings", lambda name: {"engine": name, "vllm": "x"})
    hf = EvalConfig(benchmarks=("gsm8k",)).condition_settings()
    assert "engine" not in hf  # digests of results made before --engine stay valid
    on_vllm = EvalConfig(engine="vllm", benchmarks=("gsm8k",)).condition_settings()
    assert on_vllm["engine"] == "vllm"
    # Log-likelihood only: the engine changes nothing, results stay shared.
    assert "engine" not in EvalConfig(engine="vllm", benchmarks=("ipip120",)).condition_settings()


def test_npti_per_call_mask_refused_on_vllm(monkeypatch):
    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    with pytest.raises(InputError, match="per-call"):
        EvalConfig(engine="vllm", methods=("npti", "none"), benchmarks=("gsm8k",), npti_mask="per-call")
    EvalConfig(engine="vllm", methods=("npti", "none"), benchmarks=("gsm8k",), npti_mask="fixed")
    EvalConfig(engine="vllm", methods=("npti", "none"), benchmarks=("ipip120",), npti_mask="per-call")


def test_stochastic_edit_refused():
    edit = Edit("npti", "gate", {1: ([1, 2, 3], [1.0, 1.0, 1.0])}, keep=0.9, meta={"keep_seed": 0})
    with pytest.raises(InputError, match="per-call"):
        engines.edit_plan(edit, 16)


def _dense_from_plan(plan, width):
    out = {}
    for entry in plan["layers"]:
        dense = torch.zeros(width)
        if entry["idx"] is None:
            dense = torch.tensor(entry["values"])
        elif entry["values"]:
            dense[torch.tensor(entry["idx"])] = torch.tensor(entry["values"])
        out[entry["layer"]] = dense
    return out


def test_plan_equals_the_dense_vectors_exactly():
    # Repeated indices add up, as in Edit.dense_vectors.
    edit = Edit("dpnle", "mlp", {0: ([5, 1, 5], [0.3, -1.25, 0.7]), 2: ([0], [2.0])}, gamma=1.7, sign=-1,
                positions="generated")  # fmt: skip
    plan = engines.edit_plan(edit, 8)
    assert plan["site"] == "mlp" and plan["positions"] == "generated" and plan["width"] == 8
    dense = edit.dense_vectors(8)
    for layer, vector in _dense_from_plan(plan, 8).items():
        assert torch.equal(vector, dense[layer])


def test_plan_carries_clamp_and_resid_vectors():
    npti = Edit("npti", "gate", {1: ([2], [0.5])}, clamp={1: [7, 3], 4: [0]})
    plan = engines.edit_plan(npti, 8)
    by_layer = {e["layer"]: e for e in plan["layers"]}
    assert by_layer[1]["clamp"] == [3, 7] and by_layer[4]["clamp"] == [0] and by_layer[4]["values"] == []
    caa = Edit("caa", "resid", {3: (None, [1.0, 2.0, 3.0])}, gamma=2.0)
    (entry,) = engines.edit_plan(caa, 3)["layers"]
    assert entry["idx"] is None and entry["values"] == [2.0, 4.0, 6.0]
    with pytest.raises(InputError, match="layers 0-1"):
        engines.edit_plan(caa, 3, num_layers=2)


def _counts(prompt=10, generated=6, edited=(10, 6), problems=(), calls=1):
    return {"rank": 0, "seen": {"prompt": prompt, "generated": generated},
            "edited": {"prompt": edited[0], "generated": edited[1]}, "passes": 4,
            "calls": {"3": calls}, "problems": list(problems)}  # fmt: skip


def test_check_counts():
    plan = {"method": "dpnle", "positions": "all"}
    engines.check_counts([_counts()], plan, 10, 6)
    with pytest.raises(RuntimeError, match="recomputed after preemption"):
        engines.check_counts([_counts(prompt=14)], plan, 10, 6)
    with pytest.raises(RuntimeError, match="never ran"):
        engines.check_counts([_counts(calls=0)], plan, 10, 6)
    with pytest.raises(RuntimeError, match="no generated position was edited"):
        engines.check_counts([_counts(edited=(10, 0))], plan, 10, 6)
    with pytest.raises(RuntimeError, match="had 12 rows"):
        engines.check_counts([_counts(problems=["a forward pass had 12 rows but ..."])], plan, 10, 6)
    engines.check_counts([_counts(edited=(0, 6))], {**plan, "positions": "generated"}, 10, 6)
    with pytest.raises(RuntimeError, match="no installed edit"):
        engines.check_counts([None], plan, 10, 6)


@pytest.mark.parametrize("size, expected", [
    (2, "--tensor-parallel-size splits the model over GPUs inside vLLM: pass --engine vllm"),
    (0, "--tensor-parallel-size must be at least 1, not 0."),
])
def test_tensor_parallel_size_needs_the_vllm_engine(size, expected):
    from dpnle.evaluate import EvalConfig, EvalError

    with pytest.raises(EvalError, match=re.escape(expected)):
        EvalConfig(engine="hf", tensor_parallel_size=size)
