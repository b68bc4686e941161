"""dpnle.vocab: one vocabulary of names, one check of them, and the configs speak it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml

from dpnle import vocab
from dpnle.errors import DpnleError, InputError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "paper").glob("*.yaml"))

TUPLES = [
    (vocab.SITES, vocab.Site),
    (vocab.POLICIES, vocab.Policy),
    (vocab.MEAN_POLICIES, vocab.MeanPolicy),
    (vocab.TOKENIZATIONS, vocab.Tokenization),
    (vocab.NPTI_PROTOCOLS, vocab.NptiProtocol),
    (vocab.PAIR_SAMPLINGS, vocab.PairSampling),
    (vocab.PAIR_RECIPES, vocab.PairRecipe),
    (vocab.LOCALIZATION_METHODS, vocab.LocalizationMethod),
    (vocab.NPTI_SELECTIONS, vocab.NptiSelection),
    (vocab.EDIT_METHODS, vocab.EditMethod),
    (vocab.DPNLE_METHODS, vocab.DpnleMethod),
    (vocab.RANDOM_METHODS, vocab.RandomMethod),
    (vocab.HOOKLESS_METHODS, vocab.HooklessMethod),
    (vocab.DIRECTIONS, vocab.Direction),
    (vocab.MODES, vocab.Mode),
    (vocab.POSITIONS, vocab.Position),
    (vocab.NPTI_MASKS, vocab.NptiMask),
    (vocab.SCORERS, vocab.Scorer),
    (vocab.ENGINES, vocab.Engine),
]


@pytest.mark.parametrize(("values", "literal"), TUPLES, ids=lambda x: ",".join(x) if isinstance(x, tuple) else "")
def test_each_tuple_is_its_literal(values, literal):
    assert isinstance(values, tuple) and values == get_args(literal)
    assert len(set(values)) == len(values)


def test_order_and_subsets():
    # The order tables and reports list methods in.
    assert vocab.EDIT_METHODS == ("dpnle", "dpnle-w", "npti", "caa", "random", "random-mag", "prompt", "none")
    assert vocab.LOCALIZATION_METHODS == ("dpnle", "npti", "caa")
    assert vocab.POLICIES == ("last", "prompt-mean", "response-mean")
    assert vocab.SITES == ("mlp", "gate", "resid")
    for subset in (vocab.DPNLE_METHODS, vocab.RANDOM_METHODS, vocab.HOOKLESS_METHODS):
        assert set(subset) <= set(vocab.EDIT_METHODS)
    assert set(vocab.MEAN_POLICIES) <= set(vocab.POLICIES)
    assert set(vocab.LOCALIZATION_METHODS) <= set(vocab.EDIT_METHODS)
    assert tuple(vocab.DIRECTION_SIGNS) == vocab.DIRECTIONS and vocab.DIRECTION_SIGNS == {"up": 1, "down": -1}
    assert vocab.NPTI_MASK_DEFAULT in vocab.NPTI_MASKS


def test_modules_share_the_vocabulary():
    from dpnle import arch, collect, edits, engines, evaluate, leakage, localize, matched, pairs

    assert arch.SITES is collect.SITES is vocab.SITES
    assert collect.POLICIES is vocab.POLICIES and collect.MEAN_POLICIES is vocab.MEAN_POLICIES
    assert collect.NPTI_PROTOCOLS is vocab.NPTI_PROTOCOLS and collect.TOKENIZATIONS is vocab.TOKENIZATIONS
    assert edits.EDIT_METHODS is evaluate.METHODS is leakage.METHOD_ORDER is vocab.EDIT_METHODS
    assert edits.RANDOM_METHODS is evaluate.RANDOM_METHODS is matched.DRAWN_METHODS is vocab.RANDOM_METHODS
    assert edits.HOOKLESS_METHODS is vocab.HOOKLESS_METHODS and matched.REFERENCE_METHODS is vocab.DPNLE_METHODS
    assert edits.POSITIONS is vocab.POSITIONS and edits.MODES is vocab.MODES
    assert edits.DIRECTIONS is vocab.DIRECTION_SIGNS and evaluate.DIRECTIONS is vocab.DIRECTIONS
    assert edits.NPTI_MASKS is vocab.NPTI_MASKS and edits.NPTI_MASK_DEFAULT == vocab.NPTI_MASK_DEFAULT
    assert evaluate.SCORERS is vocab.SCORERS and engines.ENGINES is vocab.ENGINES
    assert localize.METHODS is vocab.LOCALIZATION_METHODS and localize.NPTI_SELECTIONS is vocab.NPTI_SELECTIONS
    assert pairs.PAIR_SAMPLINGS is vocab.PAIR_SAMPLINGS and pairs.RECIPES is vocab.PAIR_RECIPES


def test_vocab_imports_nothing_heavy():
    code = ("import sys, dpnle.vocab; heavy = {'torch', 'transformers', 'pandas', 'numpy'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# check_choice


def test_check_choice_returns_an_allowed_value():
    assert vocab.check_choice("edit method", "npti", vocab.EDIT_METHODS) == "npti"
    assert vocab.check_choice("direction", "down", vocab.DIRECTION_SIGNS) == "down"  # a mapping: its keys


def test_check_choice_refuses_with_one_line():
    with pytest.raises(InputError) as err:
        vocab.check_choice("edit method", "x", vocab.EDIT_METHODS)
    assert str(err.value) == ("Unknown edit method 'x'; choose one of dpnle, dpnle-w, npti, caa, random, "
                              "random-mag, prompt, none.")
    assert isinstance(err.value, ValueError) and isinstance(err.value, DpnleError)


def test_check_choice_message_forms():
    with pytest.raises(InputError, match=r"^--mode 'x': choose one of both, directional\.$"):
        vocab.check_choice("--mode", "x", vocab.MODES)
    with pytest.raises(InputError, match=r"^Unknown site 'attn'; choose one of mlp, gate, resid \(e\.g\. --site mlp\)\.$"):
        vocab.check_choice("site", "attn", vocab.SITES, hint="(e.g. --site mlp)")
    with pytest.raises(InputError, match=r"^Unknown scorer 'vibes'; choose from likert, statement, yesno\.$"):
        vocab.check_choice("scorer", "vibes", vocab.SCORERS, choose="choose from")


@pytest.mark.parametrize("value", ["MLP", "mlp ", "", None, 1, ["mlp"]])
def test_check_choice_is_exact(value):
    with pytest.raises(InputError):
        vocab.check_choice("site", value, vocab.SITES)


def test_check_choice_raises_the_given_error():
    class Mine(ValueError):
        pass

    with pytest.raises(Mine, match="Unknown NPTI mask 'some'"):
        vocab.check_choice("NPTI mask", "some", vocab.NPTI_MASKS, error=Mine)


# ---------------------------------------------------------------------------------------------
# check_gamma


@pytest.mark.parametrize(("value", "expected"), [(1, 1.0), (0.5, 0.5), (-1.5, -1.5), ("0.8", 0.8), (0, 0.0)])
def test_check_gamma_accepts_finite_numbers(value, expected):
    gamma = vocab.check_gamma(value)
    assert isinstance(gamma, float) and gamma == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "abc", None, [1.0]])
def test_check_gamma_refuses_the_rest(value):
    with pytest.raises(InputError, match=r"gamma must be a finite number, not .*: pass e\.g\. --gammas 0\.5,1,1\.5\."):
        vocab.check_gamma(value)


def test_check_gamma_message_and_error():
    from dpnle.evaluate import EvalError

    with pytest.raises(EvalError) as err:
        vocab.check_gamma(float("nan"), error=EvalError)
    assert str(err.value) == "gamma must be a finite number, not nan: pass e.g. --gammas 0.5,1,1.5."


# ---------------------------------------------------------------------------------------------
# the configs shipped with dpnle use only names of the vocabulary

# Option -> the names it takes (comma-separated lists for the plural options).
CONFIG_OPTIONS = {
    ("edit-eval", "methods"): vocab.EDIT_METHODS,
    ("edit-eval", "directions"): vocab.DIRECTIONS,
    ("edit-eval", "mode"): vocab.MODES,
    ("edit-eval", "positions"): vocab.POSITIONS,
    ("edit-eval", "npti_mask"): vocab.NPTI_MASKS,
    ("edit-eval", "scorers"): vocab.SCORERS,
    ("edit-eval", "engine"): vocab.ENGINES,
    ("localize", "method"): vocab.LOCALIZATION_METHODS,
    ("localize", "npti_selection"): vocab.NPTI_SELECTIONS,
    ("collect-activations", "site"): vocab.SITES,
    ("collect-activations", "policy"): vocab.POLICIES,
    ("collect-activations", "tokenization"): vocab.TOKENIZATIONS,
    ("collect-activations", "npti_protocol"): vocab.NPTI_PROTOCOLS,
    ("collect-activations", "pair_sampling"): vocab.PAIR_SAMPLINGS,
    ("collect-activations", "recipe"): vocab.PAIR_RECIPES,
}


def _sections(path: Path) -> dict[str, dict]:
    data = yaml.safe_load(path.read_text()) or {}
    return {name: body for name, body in data.items() if isinstance(body, dict)}


def test_there_are_configs():
    assert any(path.parent.name == "paper" for path in CONFIGS) and len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_names_are_in_the_vocabulary(path):
    for stage, section in _sections(path).items():
        for option, value in section.items():
            key = option.replace("-", "_")
            allowed = CONFIG_OPTIONS.get((stage, key))
            if allowed is not None:
                for name in str(value).split(","):
                    assert name.strip() in allowed, f"{path.name}: {stage}.{option} names {name!r}"
            if key == "gammas":  # per-method strengths: method=value
                for part in str(value).split(","):
                    method, named, _ = part.rpartition("=")
                    if named:
                        assert method.strip() in vocab.EDIT_METHODS, f"{path.name}: {stage}.gammas names {method!r}"
