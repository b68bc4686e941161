"""collect-activations' responses from an engine (``engine=``, ``--engine``): the ids the engine
returns are what the capture reads, the engine is in the capture key, and options that cannot
apply are refused before anything is written. (vLLM itself: tests/test_vllm_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_llama, tiny_pairs

from dpnle.collect import _Encoded, capture_dir, collect_concept, generate_response_ids, load_stats
from dpnle.models import LoadedModel, model_fingerprint
from dpnle.runs import ArtifactError, InputError, Run, read_parquet_table

torch.set_num_threads(1)


class HFEngine:
    """An engine whose ``generate_ids`` is the HF path one prompt at a time (no padding), and
    which records every call."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.calls = model, tokenizer, []

    def settings(self) -> dict:
        return {"engine": "test", "version": "1"}

    def generate_ids(self, prompts, *, max_new_tokens, repetition_penalty=1.0, stop_token_ids=()):
        self.calls.append({"prompts": [list(p) for p in prompts], "max_new_tokens": max_new_tokens,
                           "repetition_penalty": repetition_penalty, "stop_token_ids": list(stop_token_ids)})
        return [generate_response_ids(self.model, self.tokenizer, [_Encoded(list(p), 0)], max_new_tokens, 1,
                                      repetition_penalty=repetition_penalty)[0] for p in prompts]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_llama()
    return LoadedModel(model, tokenizer, "tiny-llama", "memory", model_fingerprint(model, tokenizer, "tiny-llama"))


def _capture(tmp_path, loaded, protocol, engine=None, name="r"):
    run = Run.create_or_open(name, "tiny-llama", root=tmp_path)
    run.record_model(loaded)
    collect_concept(run, loaded, "openness", pairs=tiny_pairs(3), site="gate", policy="response-mean",
                    npti_protocol=protocol, max_new_tokens=12, batch_size=1, shard_size=4, progress=False,
                    engine=engine)
    return run


@pytest.mark.parametrize("protocol", ["reference", "dpnle"])
def test_engine_responses_are_what_the_capture_reads(tmp_path, tiny, protocol):
    engine = HFEngine(tiny.model, tiny.tokenizer)
    on_engine = _capture(tmp_path, tiny, protocol, engine, name="engine")
    on_hf = _capture(tmp_path, tiny, protocol, None, name="hf")
    # NPTI's penalty reaches the engine; the dpnle protocol generates without one; greedy to the eos ids.
    penalty = 1.1 if protocol == "reference" else 1.0
    assert engine.calls and all(c["repetition_penalty"] == penalty and c["max_new_tokens"] == 12 for c in engine.calls)
    assert all(c["stop_token_ids"] == [tiny.tokenizer.eos_token_id] for c in engine.calls)
    assert sum(len(c["prompts"]) for c in engine.calls) == 6  # 3 pairs x 2 poles
    # batch size 1 on both: the engine's ids equal HF generate's, so the two captures agree exactly
    shards = [read_parquet_table(capture_dir(r, "openness", "gate", "response-mean") / "shard-00000.parquet")
              for r in (on_engine, on_hf)]
    assert shards[0].column("response").to_pylist() == shards[1].column("response").to_pylist()
    a, b = (load_stats(r, "openness", "gate", "response-mean") for r in (on_engine, on_hf))
    np.testing.assert_array_equal(a.mean_high, b.mean_high)
    np.testing.assert_array_equal(a.mean_low, b.mean_low)
    if protocol == "reference":
        np.testing.assert_array_equal(a.token_count_high, b.token_count_high)
    # the engine is recorded, in the manifest and the key
    manifest = a.meta
    assert manifest["engine"] == {"engine": "test", "version": "1"}
    assert manifest["key"]["engine"] == {"engine": "test", "version": "1"}
    assert "engine" not in b.meta["key"] and b.meta["engine"] == {"engine": "hf"}


def test_a_capture_begun_on_one_engine_is_not_resumed_on_another(tmp_path, tiny):
    run = _capture(tmp_path, tiny, "dpnle", HFEngine(tiny.model, tiny.tokenizer))
    with pytest.raises(ArtifactError, match="engine"):
        collect_concept(run, tiny, "openness", pairs=tiny_pairs(3), site="gate", policy="response-mean",
                        max_new_tokens=12, batch_size=1, shard_size=4, progress=False)


def test_an_engine_needs_responses_to_generate(tmp_path, tiny):
    run = Run.create_or_open("r", "tiny-llama", root=tmp_path)
    with pytest.raises(InputError, match="--policy last generates none"):
        collect_concept(run, tiny, "openness", pairs=tiny_pairs(2), policy="last", progress=False,
                        engine=HFEngine(tiny.model, tiny.tokenizer))
    assert not capture_dir(run, "openness", "mlp", "last").exists()


@pytest.mark.parametrize("args, expected", [
    (["--engine", "vllm"], "make setup-vllm"),
    (["--engine", "vllm", "--policy", "last"], "--policy last generates none"),
    (["--engine", "vllm", "--policy", "response-mean", "--num-processes", "2"], "captures in one process"),
    (["--tensor-parallel-size", "2", "--policy", "response-mean"], "pass --engine vllm"),
    (["--tensor-parallel-size", "0"], "must be at least 1, not 0"),
    (["--engine", "sglang"], "--engine 'sglang': choose one of hf, vllm"),
])
def test_cli_refuses_engine_options_before_loading_a_model(args, expected, monkeypatch, tmp_path, capsys):
    from dpnle import engines
    from dpnle.cli import main

    available = "make setup-vllm" not in expected
    monkeypatch.setattr(engines, "vllm_available", lambda: available)
    monkeypatch.setenv("DPNLE_RUNS", str(tmp_path))
    monkeypatch.delenv("DPNLE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["collect-activations", "--trait", "openness", "--num-pairs", "2", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and expected in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())  # nothing written
