"""The paper presets (configs/paper/*.yaml) against the reference scripts' own settings.

The expected values are transcribed from the reference repositories' scripts (argparse
defaults and constants), read at DPN-LE 3fb5e72 and NPTI 630d2a2:

- DPN-LE experiments/personality_bench/evaluate.py: --method weighted, --neuron_mode both,
  --gamma 1.0; DPNLEInference edits generated tokens only (apply_on_prompt=False).
- DPN-LE experiments/ipip_neo/evaluate.py: --method weighted, --neuron_mode directional, --gamma 1.0.
- DPN-LE experiments/general_capability/evaluate_vllm.py: weighted, both, --gamma 0.8, decode steps.
- DPN-LE experiments/npti_general_capability/evaluate_vllm.py: --gamma 1.4, no mask, decode steps.
- NPTI NPTI/code/answer_question_change_neuron.py: val in 0.6 ... 1.5, mask rand <= 0.9 per call.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from dpnle import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "paper"


def _config(name: str) -> ev.EvalConfig:
    section = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["edit-eval"]
    gammas = ev.parse_gammas(str(section["gammas"]))
    return ev.EvalConfig(
        methods=section["methods"].split(","), directions=section["directions"].split(","), gammas=gammas,
        benchmarks=section["benchmarks"].split(","), mode=section["mode"], positions=section["positions"],
        npti_mask=section.get("npti_mask", "per-call"), random_draws=section.get("random_draws", 2),
        scorers=section.get("scorers", "likert,statement").split(","),
    )


def test_personality_preset_is_the_reference_protocol():
    config = _config("personality")
    assert config.gammas_for("dpnle-w") == (1.0,)
    assert config.gammas_for("npti") == pytest.approx(tuple(round(0.6 + 0.1 * i, 1) for i in range(10)))
    assert (config.mode, config.positions, config.npti_mask) == ("both", "generated", "per-call")
    assert list(config.benchmarks) == ["personalitybench"]


def test_ipip_preset_is_directional_dpnle_w_at_gamma_one_with_a_null():
    config = _config("ipip")
    assert config.gammas_for("dpnle-w") == (1.0,) and config.mode == "directional"
    assert config.positions == "all"  # a likelihood readout: see the preset's comment and the README
    assert config.random_draws >= ev.MIN_NULL_DRAWS
    assert "ipip300-test" in config.benchmarks and "neutral" in config.benchmarks


def test_capability_preset_is_dpnle_w_08_against_npti_14_unmasked():
    config = _config("capability")
    assert config.gammas_for("dpnle-w") == (0.8,) and config.gammas_for("npti") == (1.4,)
    assert (config.mode, config.positions, config.npti_mask) == ("both", "generated", "none")
    assert set(config.benchmarks) == {"gsm8k", "hotpotqa"}


def test_every_preset_names_its_own_suite_and_passes_the_config_check():
    import typer

    from dpnle.cli import app, check_config, load_config

    command = typer.main.get_command(app)
    suites = set()
    for path in sorted(PRESETS.glob("*.yaml")):
        config = load_config(path)
        check_config(command, config, path)  # every key is an edit-eval option
        suites.add(config["edit-eval"]["suite"])
    assert suites == {"paper-personality", "paper-ipip", "paper-capability"}


def test_make_paper_tables_runs_every_preset():
    out = subprocess.run(["make", "-n", "paper-run", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "--pair-sampling reference" in out and "--npti-protocol reference" in out
    assert "--npti-selection reference" in out
    for preset in ("personality", "ipip", "capability"):
        assert f"edit-eval --config configs/paper/{preset}.yaml" in out
    assert "--engine hf --suite paper-capability " in out


def test_engine_vllm_runs_the_capability_preset_in_the_vllm_venv_into_its_own_suite():
    out = subprocess.run(["make", "-n", "table-capability", "ENGINE=vllm", "VENV=/nonexistent-venv",
                          "VLLM_VENV=/nonexistent-vllm"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "/nonexistent-vllm/bin/dpnle edit-eval --config configs/paper/capability.yaml" in out
    assert "--engine vllm --suite paper-capability-vllm" in out
    assert "tables --run paper-smollm2-135m-instruct --suite paper-capability-vllm --kind capability" in out
    assert "configs/paper/personality.yaml" not in out  # only what the table reads


def _make_n(*args: str) -> str:
    return subprocess.run(["make", "-n", "paper-tables", "VENV=/nonexistent-venv", "VLLM_VENV=/nonexistent-vllm",
                           *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")


def test_limit_makes_paper_tables_a_smoke_run_and_no_limit_the_reference_sizes():
    smoke = _make_n("LIMIT=3")
    assert "--num-pairs 24 " in smoke and "--max-new-tokens 64 " in smoke
    evals = [line for line in smoke.splitlines() if "edit-eval --config configs/paper/" in line]
    assert len(evals) == 3  # personality, ipip, capability
    for line in evals:
        assert "--limit 3 --capability-limit 3 --open-ended-limit 3 --open-ended-tokens 64" in line
    assert "--random-draws 2 " in smoke  # the ipip preset's null, shrunk to two draws
    full = _make_n()
    assert "--num-pairs 1000 " in full and "--max-new-tokens 500 " in full
    # The reference's sizes: 400-token answers, the preset's 20 draws.
    assert "--limit" not in full and "--open-ended-tokens" not in full and "--random-draws" not in full
    assert "--open-ended-tokens 128" in _make_n("LIMIT=3", "OPEN_ENDED_TOKENS=128")


def test_engine_vllm_generates_the_personality_answers_in_the_vllm_venv_into_its_own_suite():
    out = _make_n("ENGINE=vllm")
    assert "/nonexistent-vllm/bin/dpnle edit-eval --config configs/paper/personality.yaml" in out
    assert "--engine vllm --suite paper-personality-vllm" in out
    assert "tables --run paper-smollm2-135m-instruct --suite paper-personality-vllm --kind personality" in out
    # The ipip preset scores log-likelihoods only: on the HF model, in its one suite.
    assert "/nonexistent-venv/bin/dpnle edit-eval --config configs/paper/ipip.yaml" in out
    assert "--suite paper-ipip " in out and "paper-ipip-vllm" not in out
    assert "--engine hf --suite paper-personality " in _make_n()
