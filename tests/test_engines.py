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


def test_npti_per_call_mask_accepted_on_vllm_and_its_batches_are_a_setting(monkeypatch):
    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    on_vllm = EvalConfig(engine="vllm", methods=("npti", "none"), benchmarks=("gsm8k",), npti_mask="per-call")
    assert on_vllm.engine == "vllm"
    # The masks' generators restart per generation batch, on either engine: the batches are part of the result.
    per_call = EvalConfig(methods=("npti", "none"), benchmarks=("gsm8k",), npti_mask="per-call", batch_size=4)
    assert per_call.condition_settings()["batch_size"] == 4
    assert EvalConfig(methods=("npti",), benchmarks=("personalitybench",)).condition_settings()["batch_size"] == 16
    assert "batch_size" not in EvalConfig(methods=("npti",), benchmarks=("gsm8k",), npti_mask="none").condition_settings()
    assert "batch_size" not in EvalConfig(methods=("npti",), benchmarks=("ipip120",)).condition_settings()


def _stochastic(positions: str = "generated") -> Edit:
    g = torch.Generator().manual_seed(5)
    units = {1: torch.randperm(64, generator=g)[:20], 2: torch.tensor([3, 9, 3, 40, 63])}  # a repeated unit too
    return Edit("npti", "gate", {layer: (idx, torch.rand(idx.numel(), generator=g) * 2 - 0.5)
                                 for layer, idx in units.items()},
                gamma=1.3, sign=-1, positions=positions, keep=0.9, clamp={2: [7, 8]},
                meta={"keep_seed": 11, "concept": "openness"})  # fmt: skip


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_plan_replays_the_hf_keep_mask_draws_on_every_rank(tp):
    # The per-call masks the Hugging Face hooks draw (edits._KeepMask, built by edit.apply on a tiny
    # model), call for call, against the worker's draw from the plan: each rank's slice, put back
    # together, is HF's full-width vector.
    from helpers import INTERMEDIATE, tiny_llama

    from dpnle.vllm_worker import _KeepDraw

    edit = _stochastic()
    model, _ = tiny_llama()
    assert INTERMEDIATE == 64
    plan = engines.edit_plan(edit, INTERMEDIATE)
    assert plan["stochastic"] and all(e["idx"] is None and e["values"] == [] for e in plan["layers"])
    with edit.apply(model) as handle:
        hf_masks = handle.keep_masks
        local = INTERMEDIATE // tp
        for entry in plan["layers"]:
            ranks = [_KeepDraw(entry["keep"], INTERMEDIATE, r * local, local) for r in range(tp)]
            for _ in range(5):
                expected = hf_masks[entry["layer"]](torch.device("cpu"), torch.float32)
                got = torch.cat([draw() for draw in ranks])
                assert torch.equal(got, expected)
            assert all(draw.draws == 5 for draw in ranks)
    # A different keep seed is a different stream.
    other = engines.edit_plan(Edit(**{**edit.__dict__, "meta": {"keep_seed": 12, "concept": "openness"}}), 64)
    assert other["layers"][0]["keep"]["seed"] != plan["layers"][0]["keep"]["seed"]


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


def _replay_counts(schedule, draws):
    counts = _counts(prompt=10, generated=sum(d for _, d in schedule), edited=(10, sum(d for _, d in schedule)))
    return {**counts, "schedule": schedule, "draws": {"3": draws}}


def test_check_counts_of_a_per_call_mask():
    plan = {"method": "npti", "positions": "generated", "stochastic": True}
    good = [(2, 0), (0, 2), (0, 2), (0, 1)]  # two requests, the longest 4 tokens: 4 passes, 3 decode draws
    engines.check_counts([_replay_counts(good, 3)], plan, 10, 5, requests=2, longest=4)
    engines.check_counts([_replay_counts(good, 4)], {**plan, "positions": "all"}, 10, 5, requests=2, longest=4)
    engines.check_counts([_replay_counts(good, 1)], {**plan, "positions": "prompt"}, 10, 5, requests=2, longest=4)
    with pytest.raises(RuntimeError, match="first pass prefilled 1 of the 2 prompts"):
        split = [(1, 0), (1, 1), (0, 2), (0, 1)]
        engines.check_counts([_replay_counts(split, 3)], plan, 10, 5, requests=2, longest=4)
    with pytest.raises(RuntimeError, match=r"drew \[2\] keep masks, not 3"):
        engines.check_counts([_replay_counts(good, 2)], plan, 10, 5, requests=2, longest=4)
    with pytest.raises(RuntimeError, match="4 forward passes, where HF generate makes 5"):
        engines.check_counts([_replay_counts(good, 3)], plan, 10, 5, requests=2, longest=5)
    with pytest.raises(RuntimeError, match="not checked against its batch"):
        engines.check_counts([_replay_counts(good, 3)], plan, 10, 5)


@pytest.mark.parametrize("size, expected", [
    (2, "--tensor-parallel-size splits the model over GPUs inside vLLM: pass --engine vllm"),
    (0, "--tensor-parallel-size must be at least 1, not 0."),
])
def test_tensor_parallel_size_needs_the_vllm_engine(size, expected):
    from dpnle.evaluate import EvalConfig, EvalError

    with pytest.raises(EvalError, match=re.escape(expected)):
        EvalConfig(engine="hf", tensor_parallel_size=size)
