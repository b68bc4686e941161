"""dpnle's vocabulary: the names every stage accepts, in one place, and the one check of them.

Each kind of name is a :data:`typing.Literal` type (for annotations) and a tuple of its values
(for membership and for listing the choices), the tuple read off the type with
:func:`typing.get_args`, so the two cannot drift apart. Order matters: tables, reports and
``--help`` list methods in the order given here. Subsets (the random nulls, the methods that
need no hook, the mean policies) are Literal types of their own, nested in the full type.

No heavy imports (no torch, transformers or pandas): the command line and the pandas-only
modules (:mod:`dpnle.leakage`) use it without loading the model stack.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, TypeVar, get_args

from dpnle.errors import InputError

# ---------------------------------------------------------------------------------------------
# capture (collect-activations)

# Where a layer is read and edited (see dpnle.arch): the down_proj input (DPN-LE's neurons), the
# MLP activation's output (NPTI's site), the decoder layer's output (the residual stream, CAA's).
Site = Literal["mlp", "gate", "resid"]
SITES: tuple[Site, ...] = get_args(Site)

# How a capture reduces a prompt's tokens to one vector: the last prompt token, or a mean over the
# prompt's or the greedy response's tokens.
MeanPolicy = Literal["prompt-mean", "response-mean"]
Policy = Literal["last", MeanPolicy]
POLICIES: tuple[Policy, ...] = get_args(Policy)
MEAN_POLICIES: tuple[MeanPolicy, ...] = get_args(MeanPolicy)

# How prompts are tokenized: dpnle's (no special tokens added to a chat-templated prompt) or the
# reference's tokenizer(text) defaults (--tokenization).
Tokenization = Literal["dpnle", "reference"]
TOKENIZATIONS: tuple[Tokenization, ...] = get_args(Tokenization)

# How a response-mean capture makes and reads its responses: dpnle's or NPTI's (--npti-protocol).
NptiProtocol = Literal["dpnle", "reference"]
NPTI_PROTOCOLS: tuple[NptiProtocol, ...] = get_args(NptiProtocol)

# How contrastive pairs are drawn: dpnle's own sampling or the reference's (--pair-sampling).
PairSampling = Literal["dpnle", "reference"]
PAIR_SAMPLINGS: tuple[PairSampling, ...] = get_args(PairSampling)

# Where the pairs' personas and questions come from (--recipe).
PairRecipe = Literal["personalitybench", "anthropic-persona", "values"]
PAIR_RECIPES: tuple[PairRecipe, ...] = get_args(PairRecipe)

# ---------------------------------------------------------------------------------------------
# localization (localize)

LocalizationMethod = Literal["dpnle", "npti", "caa"]
LOCALIZATION_METHODS: tuple[LocalizationMethod, ...] = get_args(LocalizationMethod)

# How NPTI's neurons are ranked: over all layers as NPTI's code does, or the top k in each layer
# (--npti-selection).
NptiSelection = Literal["reference", "per-layer"]
NPTI_SELECTIONS: tuple[NptiSelection, ...] = get_args(NptiSelection)

# ---------------------------------------------------------------------------------------------
# edits (edit-eval)

# The DPN-LE edit and its weighted variant (DPN-LE_w).
DpnleMethod = Literal["dpnle", "dpnle-w"]
# The random nulls of the DPN-LE edit: one condition per seed (edit-eval draws them N times).
RandomMethod = Literal["random", "random-mag"]
# Conditions run without hooks: a persona prompt, or no edit at all (build_edit returns None).
HooklessMethod = Literal["prompt", "none"]
EditMethod = Literal[DpnleMethod, "npti", "caa", RandomMethod, HooklessMethod]
EDIT_METHODS: tuple[EditMethod, ...] = get_args(EditMethod)
DPNLE_METHODS: tuple[DpnleMethod, ...] = get_args(DpnleMethod)
RANDOM_METHODS: tuple[RandomMethod, ...] = get_args(RandomMethod)
HOOKLESS_METHODS: tuple[HooklessMethod, ...] = get_args(HooklessMethod)

# Which way an edit steers its concept, and the sign it multiplies the edit by.
Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)
DIRECTION_SIGNS: dict[Direction, int] = {"up": 1, "down": -1}

# "both": edit HIGH and LOW neurons together; "directional": HIGH alone to raise, LOW alone to lower.
Mode = Literal["both", "directional"]
MODES: tuple[Mode, ...] = get_args(Mode)

# Which tokens an edit touches: every position, the prompt's, or the generated ones.
Position = Literal["all", "prompt", "generated"]
POSITIONS: tuple[Position, ...] = get_args(Position)

# How an NPTI edit draws its kept share of targets (--npti-mask): a fresh mask on every forward
# call (NPTI's code, the default), every target, or one seeded subset.
NptiMask = Literal["per-call", "none", "fixed"]
NPTI_MASKS: tuple[NptiMask, ...] = get_args(NptiMask)
NPTI_MASK_DEFAULT: NptiMask = "per-call"

# How a questionnaire answer is scored (see dpnle.instruments).
Scorer = Literal["likert", "statement", "yesno"]
SCORERS: tuple[Scorer, ...] = get_args(Scorer)

# Which engine generates text (see dpnle.engines).
Engine = Literal["hf", "vllm"]
ENGINES: tuple[Engine, ...] = get_args(Engine)

# ---------------------------------------------------------------------------------------------
# checks

T = TypeVar("T")

GAMMA_EXAMPLE = "--gammas 0.5,1,1.5"


def check_choice(
    kind: str,
    value: T,
    allowed: Iterable[object],
    *,
    error: type[Exception] = InputError,
    hint: str = "",
    choose: str = "choose one of",
) -> T:
    """``value`` if it is one of ``allowed``; else raise ``error`` with one line naming the choices.

    ``kind`` names what is chosen: ``check_choice("edit method", "x", EDIT_METHODS)`` raises
    "Unknown edit method 'x'; choose one of dpnle, dpnle-w, ...". A ``kind`` that is a command-line
    flag names the flag instead: ``check_choice("--mode", "x", MODES)`` raises "--mode 'x': choose
    one of both, directional.". ``hint`` follows the list (e.g. "(e.g. --site mlp)"); ``choose``
    replaces the words before it.
    """
    names = tuple(allowed)
    if value in names:
        return value
    listing = ", ".join(str(name) for name in names)
    head = f"{kind} {value!r}:" if kind.startswith("--") else f"Unknown {kind} {value!r};"
    tail = f" {hint}" if hint else ""
    raise error(f"{head} {choose} {listing}{tail}.")


def check_gamma(value: object, *, error: type[Exception] = InputError) -> float:
    """An edit strength as a float; anything that is not a finite number raises ``error``."""
    try:
        gamma = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        gamma = math.nan
    if not math.isfinite(gamma):
        raise error(f"gamma must be a finite number, not {value!r}: pass e.g. {GAMMA_EXAMPLE}.")
    return gamma


__all__ = [
    "DIRECTIONS",
    "DIRECTION_SIGNS",
    "DPNLE_METHODS",
    "EDIT_METHODS",
    "ENGINES",
    "HOOKLESS_METHODS",
    "LOCALIZATION_METHODS",
    "MEAN_POLICIES",
    "MODES",
    "NPTI_MASKS",
    "NPTI_MASK_DEFAULT",
    "NPTI_PROTOCOLS",
    "NPTI_SELECTIONS",
    "PAIR_RECIPES",
    "PAIR_SAMPLINGS",
    "POLICIES",
    "POSITIONS",
    "RANDOM_METHODS",
    "SCORERS",
    "SITES",
    "TOKENIZATIONS",
    "Direction",
    "DpnleMethod",
    "EditMethod",
    "Engine",
    "HooklessMethod",
    "LocalizationMethod",
    "MeanPolicy",
    "Mode",
    "NptiMask",
    "NptiProtocol",
    "NptiSelection",
    "PairRecipe",
    "PairSampling",
    "Policy",
    "Position",
    "RandomMethod",
    "Scorer",
    "Site",
    "Tokenization",
    "check_choice",
    "check_gamma",
]
