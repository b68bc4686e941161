"""Stage 3 (edit-eval): steer each concept, measure every trait or value, and measure the cost.

A *condition* is one (method, direction, gamma) — plus a seed for the random nulls. For each
condition the stage scores, with the edit applied:

- the questionnaires (judge-free, one forward pass per item) with each scorer — every dimension
  of the instrument, not only the target, because leakage needs the off-target scores;
- capability benchmarks (``gsm8k``, ``mmlu``, ``arc``, ``hellaswag``, ``truthfulqa``,
  ``hotpotqa``) and ``neutral``: KL divergence from the unedited model and perplexity on a
  fixed neutral text set, which stay informative where a small model sits at chance;
- ``personalitybench``: open-ended answers to the trait's test questions, rated by a judge.

Before any condition, each (instrument, scorer) gets a validity check on this model (does it
separate high- from low-persona prompts, without collapsing into acquiescence?). Its verdict
travels with every number computed from that instrument.

Layout: ``eval/validity/<instrument>-<scorer>.parquet``, ``eval/<concept>/<condition>.parquet``
(one row per item; a finished condition is never recomputed unless its settings change), and
``eval/<concept>/summary.parquet`` (target-dimension effects against no edit, paired by item).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from dpnle import vocab
from dpnle.concepts import TRAITS, VALUES, get_concept
from dpnle.lmeval import is_lmeval_benchmark
from dpnle.progress import Progress, subtask
from dpnle.runs import (
    ArtifactError,
    InputError,
    Run,
    atomic_path,
    parquet_metadata,
    read_parquet,
    remove_temp_files,
    write_parquet,
)
from dpnle.vocab import (
    HOOKLESS_METHODS,
    Direction,
    EditMethod,
    Engine,
    Mode,
    NptiMask,
    Position,
    Scorer,
    check_choice,
    check_gamma,
)

# The vocabulary of edit-eval (defined in dpnle.vocab): its methods in table order, the random
# nulls (one condition per seed, ``random_draws`` of them), directions and scorers.
METHODS = vocab.EDIT_METHODS
RANDOM_METHODS = vocab.RANDOM_METHODS
DIRECTIONS = vocab.DIRECTIONS
QUESTIONNAIRES = ("ipip120", "ipip300-test", "ipip300", "pvq40")
SCORERS = vocab.SCORERS
CAPABILITY = ("gsm8k", "mmlu", "arc", "hellaswag", "truthfulqa", "hotpotqa")
NEUTRAL = "neutral"
OPEN_ENDED = "personalitybench"
BENCHMARKS = QUESTIONNAIRES + CAPABILITY + (NEUTRAL, OPEN_ENDED)
# The benchmarks that generate text (--engine applies to them; the rest score log-likelihoods).
GENERATING = ("gsm8k", "hotpotqa", OPEN_ENDED)

ROW_COLUMNS = [
    "concept", "condition", "method", "direction", "gamma", "seed", "benchmark", "scorer",
    "item_id", "dimension", "key", "prompt", "output", "raw", "score", "chance",
]


class EvalError(InputError):
    """Bad edit-eval settings (an :class:`InputError`, so a ``ValueError``)."""


@dataclass(frozen=True)
class Condition:
    method: str
    direction: str = "-"
    gamma: float = 0.0
    seed: int = 0

    @property
    def key(self) -> str:
        if self.method == "none":
            return "none"
        if self.method == "prompt":
            return f"prompt-{self.direction}"
        tail = f"-s{self.seed}" if self.method in RANDOM_METHODS else ""
        return f"{self.method}-{self.direction}-g{self.gamma:g}{tail}"


@dataclass
class EvalConfig:
    methods: Sequence[EditMethod] = ("dpnle", "random", "prompt", "none")
    directions: Sequence[Direction] = DIRECTIONS
    # Edit strengths of every edit method, unless ``method_gammas`` names the method: the
    # DPN-LE paper's capability table runs DPN-LE at 0.8 and NPTI at 1.4 (see parse_gammas).
    gammas: Sequence[float] = (1.0,)
    benchmarks: Sequence[str] = ("ipip120", NEUTRAL)
    scorers: Sequence[Scorer] = ("likert", "statement")
    limit: int | None = None  # questionnaire items per dimension
    capability_limit: int | None = 100  # items per capability benchmark
    open_ended_limit: int | None = 20  # PersonalityBench questions per trait
    # New tokens per PersonalityBench answer; None: the DPN-LE reference's 400
    # (dpnle.judges.PB_MAX_NEW_TOKENS). Smoke runs shorten it (make paper-tables LIMIT=N).
    open_ended_tokens: int | None = None
    judge: str = "none"
    positions: Position = "all"
    mode: Mode = "both"
    seed: int = 0
    # Draws of each random null (random, random-mag): with N draws the smallest null p is 1/(N+1).
    random_draws: int = 20
    batch_size: int = 16
    validity_personas: int = 4
    # Score conditions only with the scorers that passed the validity check for the target (or,
    # when none passed, with the one that separated best, flagged invalid): a failed scorer's
    # numbers are not evidence, and scoring them under every condition doubles the cost.
    valid_scorers_only: bool = True
    # Per-method edit strengths, e.g. {"dpnle": (0.8,), "npti": (1.4,)}; methods not named use
    # ``gammas``.
    method_gammas: Mapping[str, Sequence[float]] = field(default_factory=dict)
    # How NPTI edits draw their kept 90% of targets (dpnle.edits.NPTI_MASKS): "per-call" (NPTI's
    # code: a fresh mask per forward call), "none" (DPN-LE's re-implementation), "fixed".
    npti_mask: NptiMask = vocab.NPTI_MASK_DEFAULT
    # Which engine generates (GSM8K, HotpotQA, PersonalityBench answers): "hf" or "vllm"
    # (dpnle.engines); log-likelihood scoring always runs on the Hugging Face model.
    engine: Engine = "hf"
    # vLLM's tensor parallelism: each rank edits the MLP units of its slice (dpnle.vllm_worker).
    tensor_parallel_size: int = 1
    # Folder(s) of local lm-eval task YAMLs for ``lmeval:<task>`` benchmarks (else DPNLE_LMEVAL_INCLUDE).
    lmeval_include: str | None = None

    def __post_init__(self) -> None:
        for method in self.methods:
            check_choice("method", method, METHODS, error=EvalError, choose="choose from")
        for direction in self.directions:
            check_choice("direction", direction, DIRECTIONS, error=EvalError, choose="choose from")
        if isinstance(self.gammas, Mapping):  # {"dpnle": [...], "*": [...]}: the per-method form
            named = dict(self.gammas)
            self.gammas = tuple(named.pop("*", ()))
            self.method_gammas = {**named, **dict(self.method_gammas)}
        self.method_gammas = {str(m).strip().lower(): tuple(v) for m, v in dict(self.method_gammas).items()}
        for gamma in [*self.gammas, *(g for v in self.method_gammas.values() for g in v)]:
            check_gamma(gamma, error=EvalError)
        for method, values in self.method_gammas.items():
            if method not in METHODS or method in HOOKLESS_METHODS:
                raise EvalError(f"--gammas names {method!r}, which takes no edit strength; name edit methods "
                                f"({', '.join(m for m in METHODS if m not in HOOKLESS_METHODS)}).")
            if method not in self.methods:
                raise EvalError(f"--gammas names {method!r}, which is not among the methods "
                                f"({', '.join(self.methods)}): add it to --methods or drop it from --gammas.")
            if not values:
                raise EvalError(f"--gammas gives {method!r} no value; pass e.g. --gammas {method}=0.8.")
        check_choice("NPTI mask", self.npti_mask, vocab.NPTI_MASKS, error=EvalError)
        for bench in self.benchmarks:
            if not is_lmeval_benchmark(bench):
                check_choice("benchmark", bench, BENCHMARKS, error=EvalError, choose="choose from",
                             hint="or lmeval:<task>")
        for scorer in self.scorers:
            check_choice("scorer", scorer, SCORERS, error=EvalError, choose="choose from")
        if self.random_draws < 1:
            raise EvalError("random_draws must be at least 1.")
        if not (self.methods and self.benchmarks):
            raise EvalError("Name at least one method and one benchmark (e.g. --methods dpnle,none "
                            "--benchmarks ipip120).")
        ungiven = [m for m in self.methods if m not in HOOKLESS_METHODS and not self.gammas_for(m)]
        if ungiven:
            raise EvalError(f"No edit strength for {', '.join(ungiven)}: pass e.g. --gammas 1, or per method "
                            f"--gammas {ungiven[0]}=1 (methods not named use the unnamed values).")
        if any(m != "none" for m in self.methods) and not self.directions:
            raise EvalError("Name at least one direction: --directions up,down.")
        for name in ("batch_size", "validity_personas"):
            if int(getattr(self, name)) < 1:
                raise EvalError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("limit", "capability_limit", "open_ended_limit"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise EvalError(f"{name} must be at least 1 (or unset for all items), not {value}.")
        if self.open_ended_tokens is not None and int(self.open_ended_tokens) < 1:
            raise EvalError(f"open_ended_tokens (new tokens per PersonalityBench answer) must be at least 1, not "
                            f"{self.open_ended_tokens}.")
        if str(self.judge).strip().lower() not in ("", "none"):  # refused before any model loads
            from dpnle.judges import check_judge_spec

            check_judge_spec(self.judge)
        from dpnle.engines import check_eval_engine

        self.engine = check_eval_engine(self.engine, self.methods, self.npti_mask, self.benchmarks)
        if int(self.tensor_parallel_size) < 1:
            raise EvalError(f"--tensor-parallel-size must be at least 1, not {self.tensor_parallel_size}.")
        if int(self.tensor_parallel_size) > 1 and self.engine != "vllm":
            raise EvalError("--tensor-parallel-size splits the model over GPUs inside vLLM: pass --engine vllm, or "
                            "--device-map auto to spread a model over devices on the hf engine.")
        self.lmeval_settings()  # lm-eval installed, each task loadable, its metric per item, the edit applicable

    def lmeval_settings(self) -> dict[str, Any]:
        """What each ``lmeval:`` benchmark is (lm-eval's version, the task's config and documents
        digests); checked once per process and setting."""
        lmeval = tuple(b for b in self.benchmarks if is_lmeval_benchmark(b))
        if not lmeval:
            return {}
        stochastic = "npti" in self.methods and self.npti_mask == "per-call"
        return copy.deepcopy(_lmeval_settings(lmeval, self.positions, stochastic, self.lmeval_include))

    def gammas_for(self, method: str) -> tuple[float, ...]:
        """The edit strengths of ``method``: its own (``method_gammas``) or the shared ``gammas``."""
        return tuple(float(g) for g in self.method_gammas.get(method, self.gammas))

    @property
    def questionnaires(self) -> list[str]:
        return [b for b in self.benchmarks if b in QUESTIONNAIRES]

    def condition_settings(self) -> dict[str, Any]:
        """What a stored condition must match to be reused (everything that changes its rows)."""
        keys = ("benchmarks", "scorers", "limit", "capability_limit", "open_ended_limit", "judge",
                "positions", "mode", "seed", "valid_scorers_only")
        from dpnle.judges import redact_judge_spec

        settings = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(self).items() if k in keys}
        if self.open_ended_tokens is not None and OPEN_ENDED in self.benchmarks:
            # Only where it matters: runs made at the reference length keep their digests.
            settings["open_ended_tokens"] = int(self.open_ended_tokens)
        if "npti" in self.methods:
            # Only where it matters: a run without NPTI keeps the digests it had before the option existed.
            settings["npti_mask"] = self.npti_mask
            if self.npti_mask == "per-call" and any(b in GENERATING for b in self.benchmarks):
                # The per-call masks' generators restart with each generation batch (on either engine),
                # so the batches are part of what an NPTI answer is.
                settings["batch_size"] = int(self.batch_size)
        if self.engine != "hf" and any(b in GENERATING for b in self.benchmarks):
            # Results of one engine are never reused as the other's (parity is tested, not assumed);
            # "hf" adds nothing, so results computed before engines existed stay current.
            from dpnle.engines import engine_settings

            settings.update(engine_settings(self.engine))
            if int(self.tensor_parallel_size) > 1:  # another reduction order: other numerics
                settings["tensor_parallel_size"] = int(self.tensor_parallel_size)
        lmeval = self.lmeval_settings()
        if lmeval:  # only then: digests of runs without lm-eval tasks stay as they were
            settings["lmeval"] = lmeval
        return {**settings, "judge": redact_judge_spec(str(self.judge))}  # no secret in artifacts


@functools.lru_cache(maxsize=32)
def _lmeval_settings(benchmarks: tuple[str, ...], positions: str, stochastic: bool,
                     include: str | None) -> dict[str, Any]:
    from dpnle.lmeval import check_benchmark

    return {b: check_benchmark(b, edit_positions=positions, stochastic=stochastic, include_path=include)
            for b in benchmarks}


def conditions(config: EvalConfig) -> list[Condition]:
    out: list[Condition] = []
    for method in config.methods:
        if method == "none":
            out.append(Condition("none"))
        elif method == "prompt":
            out.extend(Condition("prompt", d) for d in config.directions)
        else:
            draws = range(config.random_draws) if method in RANDOM_METHODS else [config.seed]
            for d in config.directions:
                for g in config.gammas_for(method):
                    for s in draws:
                        out.append(Condition(method, d, float(g), int(s)))
    return out


def parse_gammas(text: str) -> dict[str, tuple[float, ...]]:
    """``--gammas``: ``0.8,1`` (every edit method) or per method, ``dpnle=0.8,npti=1.4,1``.

    Returns ``{method: values}`` with key ``"*"`` for the unnamed values (what methods not named
    use); EvalConfig accepts the mapping as ``gammas``. A method named twice gets both values.
    """
    out: dict[str, list[float]] = {}
    parts = [part.strip() for part in str(text).split(",")]
    if not all(parts):
        raise EvalError(f"--gammas {text!r} has an empty item; pass e.g. --gammas 0.5,1,1.5 or "
                        "--gammas dpnle=0.8,npti=1.4.")
    for part in parts:
        method, named, value = part.rpartition("=")
        if named and not method.strip():
            raise EvalError(f"--gammas: {part!r} names no method; pass e.g. --gammas 0.5,1,1.5 or "
                            "--gammas dpnle=0.8,npti=1.4.")
        method = method.strip().lower() or "*"
        try:
            number = float(value)
        except ValueError:
            raise EvalError(f"--gammas: {part!r} is not a number or METHOD=NUMBER; pass e.g. --gammas 0.5,1,1.5 or "
                            "--gammas dpnle=0.8,npti=1.4.") from None
        out.setdefault(method, []).append(number)
    return {k: tuple(v) for k, v in out.items()}


def instrument_concepts(instrument: str) -> tuple[str, ...]:
    return VALUES if instrument == "pvq40" else TRAITS


def instruments_for(concept: str, config: EvalConfig) -> list[str]:
    """The questionnaires that measure ``concept``'s kind (IPIP for traits, PVQ for values)."""
    kind = get_concept(concept).kind
    return [q for q in config.questionnaires if (q == "pvq40") == (kind == "value")]


def _settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# validity


def validity_path(run: Run, instrument: str, scorer: str) -> Path:
    return run.validity_dir / f"{instrument}-{scorer}.parquet"


def ensure_validity(run: Run, loaded, instrument: str, scorer: str, config: EvalConfig,
                    log: Callable[[str], None] = print) -> pd.DataFrame:
    """The validity table of (instrument, scorer) for this run's model: computed once, then read."""
    from dpnle.instruments import validity_check, validity_items

    path = validity_path(run, instrument, scorer)
    items = validity_items(instrument)
    settings = {"limit": config.limit, "n_personas": config.validity_personas,
                "model": loaded.fingerprint.get("digest")}
    if items != instrument:  # recorded only where it differs, so other checks stay valid
        settings["items"] = items
    if path.exists():
        with contextlib.suppress(ArtifactError):  # an unreadable cached table is computed again
            if parquet_metadata(path).get("settings") == settings:
                return read_parquet(path)
    where = f" (on {items}'s items: {instrument}'s are held out)" if items != instrument else ""
    log(f"validity check: {instrument} / {scorer} on {len(instrument_concepts(instrument))} concepts{where}")
    table = validity_check(
        loaded.model, loaded.tokenizer, items, scorer, list(instrument_concepts(instrument)),
        n_personas=config.validity_personas, batch_size=config.batch_size, limit=config.limit,
    )
    # The verdict is about scoring ``instrument``; ``items`` says which items it was reached on.
    table = table.assign(instrument=instrument, items=items)
    remove_temp_files(path)
    write_parquet(path, table, metadata={"kind": "validity", "instrument": instrument, "scorer": scorer,
                                         "settings": settings, "model": loaded.fingerprint})
    return table


def load_validity(run: Run) -> pd.DataFrame:
    folder = run.validity_dir
    frames = []
    for path in sorted(folder.glob("*.parquet")) if folder.exists() else []:
        meta = parquet_metadata(path)
        frame = read_parquet(path)
        for position, column in enumerate(("instrument", "scorer")):
            if column not in frame:
                frame.insert(position, column, meta.get(column))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------
# one condition


def condition_path(run: Run, concept: str, condition: Condition) -> Path:
    return run.eval_dir / concept / f"{condition.key}.parquet"


def _persona(concept: str, direction: str) -> str:
    """The persona description of the ``prompt`` method: the first high (or low) description."""
    from dpnle.instruments import default_personas

    high, low = default_personas([concept])[concept]
    return high[0] if direction == "up" else low[0]


def condition_scorers(run: Run, concept: str, config: EvalConfig) -> dict[str, list[str]]:
    """Per questionnaire, the scorers conditions are scored with (see ``valid_scorers_only``)."""
    chosen: dict[str, list[str]] = {}
    for instrument in instruments_for(concept, config):
        if not config.valid_scorers_only:
            chosen[instrument] = list(config.scorers)
            continue
        rows = []
        for scorer in config.scorers:
            table = read_parquet(validity_path(run, instrument, scorer))
            row = table[table["concept"] == concept]
            if len(row):
                rows.append((scorer, bool(row["passed"].iloc[0]), float(row["cohens_d"].iloc[0])))
        passed = [scorer for scorer, ok, _ in rows if ok]
        if not passed and rows:
            passed = [max(rows, key=lambda r: (np.nan_to_num(r[2], nan=-np.inf)))[0]]
        chosen[instrument] = passed
    return chosen


# Passes of the unedited model that every condition and concept of an evaluation shares (the
# no-edit questionnaire scores, the neutral-text reference of the KL): the same model, items and
# batch size give the same numbers, so one process computes each once.
_UNEDITED: dict[tuple, tuple[Any, Any]] = {}  # key -> (weak reference to the model, value)


def _unedited(loaded, key: tuple, compute):
    import weakref

    model = loaded.model
    full_key = (id(model), (loaded.fingerprint or {}).get("digest"), *key)
    found = _UNEDITED.get(full_key)
    if found is not None and found[0]() is model:  # not another model at a recycled address
        return found[1]
    for stale in [k for k, (ref, _) in _UNEDITED.items() if ref() is None]:
        del _UNEDITED[stale]
    value = compute()
    _UNEDITED[full_key] = (weakref.ref(model), value)
    return value


def evaluate_condition(run: Run, loaded, concept: str, condition: Condition, config: EvalConfig,
                       scorers: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Score every requested benchmark under one condition; one row per item. ``scorers`` maps
    each questionnaire to its scorers (default: every requested scorer)."""
    from dpnle import capability
    from dpnle.edits import build_edit
    from dpnle.engines import engine_for
    from dpnle.instruments import score_items

    model, tokenizer = loaded.model, loaded.tokenizer
    engine = (engine_for(loaded, config.engine, tensor_parallel_size=config.tensor_parallel_size)
              if any(b in GENERATING for b in config.benchmarks) else None)
    edit = None
    if condition.method not in HOOKLESS_METHODS:
        edit = build_edit(run, concept, condition.method, direction=condition.direction, gamma=condition.gamma,
                          mode=config.mode, positions=config.positions, seed=condition.seed,
                          npti_mask=config.npti_mask)
    persona = _persona(concept, condition.direction) if condition.method == "prompt" else None
    frames: list[pd.DataFrame] = []
    for instrument in instruments_for(concept, config):
        for scorer in (scorers or {}).get(instrument, config.scorers):
            def score(instrument=instrument, scorer=scorer) -> pd.DataFrame:
                return score_items(model, tokenizer, instrument, scorer, persona=persona, edit=edit,
                                   batch_size=config.batch_size, limit=config.limit)

            if edit is None and persona is None:  # the no-edit scores: the same for every concept
                items = _unedited(loaded, ("items", instrument, scorer, config.limit, config.batch_size), score)
            else:
                items = score()
            frames.append(pd.DataFrame({
                "benchmark": instrument, "scorer": scorer, "item_id": items["item_id"],
                "dimension": items["dimension"], "key": items["key"].astype(float), "prompt": "",
                "output": "", "raw": items["raw"], "score": items["score"], "chance": np.nan,
            }))
    for bench in config.benchmarks:
        if bench in CAPABILITY:
            def run(bench=bench) -> pd.DataFrame:
                return capability.run_benchmark(model, tokenizer, bench, edit=edit, limit=config.capability_limit,
                                                engine=engine, seed=config.seed, batch_size=config.batch_size)

            # The capability prompts carry no persona, so every unedited condition (none, prompt)
            # of every concept scores the same items the same way: computed once per process.
            if edit is None:
                rows = _unedited(loaded, ("capability", bench, config.capability_limit, config.seed,
                                          config.batch_size, config.engine, config.tensor_parallel_size), run)
            else:
                rows = run()
            frames.append(pd.DataFrame({
                "benchmark": bench, "scorer": rows["metric"], "item_id": rows["item_id"].astype(str),
                "dimension": "", "key": np.nan, "prompt": rows["prompt"], "output": rows["output"].astype(str),
                "raw": rows["score"].astype(float), "score": rows["score"].astype(float),
                "chance": rows["chance"].astype(float),
            }))
        elif is_lmeval_benchmark(bench):
            frames.append(_lmeval_rows(loaded, bench, edit, config))
        elif bench == NEUTRAL:
            reference = _unedited(loaded, ("neutral", config.batch_size), lambda: capability.neutral_reference(
                model, tokenizer, batch_size=config.batch_size))
            measures = capability.kl_and_perplexity(model, tokenizer, edit=edit, batch_size=config.batch_size,
                                                    reference=reference)
            frames.append(pd.DataFrame({
                "benchmark": NEUTRAL, "scorer": ["kl", "perplexity", "perplexity_unedited"],
                "item_id": "all", "dimension": "", "key": np.nan, "prompt": "", "output": "",
                "raw": [measures["kl"], measures["perplexity"], measures["perplexity_unedited"]],
                "score": [measures["kl"], measures["perplexity"], measures["perplexity_unedited"]],
                "chance": np.nan,
            }))
        elif bench == OPEN_ENDED and get_concept(concept).kind == "trait":
            frames.append(_open_ended(loaded, concept, edit, persona, config, condition.key, engine=engine))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ROW_COLUMNS[7:])
    frame.insert(0, "concept", concept)
    frame.insert(1, "condition", condition.key)
    frame.insert(2, "method", condition.method)
    frame.insert(3, "direction", condition.direction)
    frame.insert(4, "gamma", float(condition.gamma))
    frame.insert(5, "seed", int(condition.seed))
    frame["num_neurons"] = int(edit.num_neurons) if edit is not None else 0
    return frame[[*ROW_COLUMNS, "num_neurons"]]


def _lmeval_rows(loaded, bench: str, edit, config: EvalConfig) -> pd.DataFrame:
    """An lm-eval task's per-document rows under ``edit``, on the HF model (whatever the engine),
    as condition rows; unedited, once per process."""
    from dpnle.lmeval import run_lmeval_task

    def run() -> pd.DataFrame:
        return run_lmeval_task(loaded, None, bench, edit=edit, limit=config.capability_limit, seed=config.seed,
                               batch_size=config.batch_size, include_path=config.lmeval_include)

    rows = (_unedited(loaded, ("lmeval", bench, config.capability_limit, config.seed, config.batch_size,
                               config.lmeval_include), run) if edit is None else run())
    return pd.DataFrame({
        "benchmark": bench, "scorer": rows["metric"], "item_id": rows["item_id"].astype(str), "dimension": "",
        "key": np.nan, "prompt": rows["prompt"], "output": rows["output"].astype(str),
        "raw": rows["score"].astype(float), "score": rows["score"].astype(float),
        "chance": rows["chance"].astype(float),
    })


def _open_ended(loaded, concept: str, edit, persona: str | None, config: EvalConfig, key: str,
                engine=None) -> pd.DataFrame:
    from dpnle import datasets
    from dpnle.judges import generate_answers, judge_for

    questions = datasets.load_pb_test(concept)
    if config.open_ended_limit is not None:
        questions = questions[: config.open_ended_limit]
    lengths = {} if config.open_ended_tokens is None else {"max_new_tokens": int(config.open_ended_tokens)}
    answers = generate_answers(loaded.model, loaded.tokenizer, [q.text for q in questions], edit=edit,
                               persona=persona, batch_size=config.batch_size, engine=engine, **lengths)
    judge = judge_for(config.judge)
    rows = []
    with subtask(f"ratings ({judge.spec})", len(questions)) as advance:
        ratings = judge.rate_many(concept, [q.text for q in questions], answers, condition=key,
                                  on_rated=lambda: advance(1))
    for q, answer, rating in zip(questions, answers, ratings, strict=True):
        for scorer, value in (("trait", rating.trait_score), ("fluency", rating.fluency)):
            rows.append({"benchmark": OPEN_ENDED, "scorer": scorer, "item_id": q.id, "dimension": concept,
                         "key": 1.0, "prompt": q.text, "output": answer, "raw": value, "score": value,
                         "chance": np.nan})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class EvalResult:
    concept: str
    conditions: list[str]
    computed: list[str]
    reused: list[str]
    summary: pd.DataFrame
    seconds: float
    paths: list[Path] = field(default_factory=list)


def _evaluate_or_reuse(run: Run, loaded, concept: str, condition: Condition, config: EvalConfig,
                       scorers: Any, settings: dict[str, Any], localization: dict[str, Any], model_digest: Any,
                       log: Callable[[str], None]) -> tuple[Path, bool]:
    """One condition: reused if nothing that made it changed (settings, model, and the neurons
    file its method reads), else computed and written with its provenance. Returns the
    condition's file and whether it was computed (False: reused)."""
    source = _NEURON_SOURCES.get(condition.method)
    digest = condition_digest(settings, model_digest, localization.get(source) if source else None)
    path = condition_path(run, concept, condition)
    if path.exists():
        with contextlib.suppress(ArtifactError):
            if parquet_metadata(path).get("settings_digest") == digest:
                return path, False
    t0 = time.perf_counter()
    frame = evaluate_condition(run, loaded, concept, condition, config, scorers)
    remove_temp_files(path)  # what a killed run left; never read
    write_parquet(path, frame, metadata={
        "kind": "eval", "run": run.name, "concept": concept, "condition": asdict(condition),
        "settings": settings, "settings_digest": digest, "model": loaded.fingerprint,
        "localization": localization.get(source) if source else None, "seconds": time.perf_counter() - t0,
    })
    log(f"{concept}: {condition.key} done in {time.perf_counter() - t0:.1f} s")
    return path, True


def evaluate_concept(run: Run, loaded, concept: str, config: EvalConfig,
                     log: Callable[[str], None] = print, progress: bool = False) -> EvalResult:
    """Run every condition of ``config`` for ``concept`` (resuming finished ones), then summarize.

    ``progress`` shows a rich progress bar over the conditions (reused ones count at once; the
    rate and the time left come from the computed ones)."""
    start = time.perf_counter()
    concept = get_concept(concept).name
    _check_localizations(run, concept, config)
    for instrument in instruments_for(concept, config):
        for scorer in config.scorers:
            ensure_validity(run, loaded, instrument, scorer, config, log=log)
    scorers = condition_scorers(run, concept, config)
    settings = {**config.condition_settings(), "condition_scorers": scorers}
    localization = localization_digests(run, concept, config.methods)
    model_digest = loaded.fingerprint.get("digest")
    computed, reused, paths = [], [], []
    todo = conditions(config)
    with Progress(f"{concept}: conditions", len(todo), enabled=progress, unit="condition") as bar:
        for condition in todo:
            path, was_computed = _evaluate_or_reuse(run, loaded, concept, condition, config, scorers, settings,
                                                    localization, model_digest, log)
            (computed if was_computed else reused).append(condition.key)
            paths.append(path)
            # Reused conditions move the bar, not the rate or the time left.
            bar.advance(timed=was_computed)
    keys = [c.key for c in todo]
    # The conditions of this call are the concept's current ones: tables and reports use them
    # alone, and list every other condition file as stale (see condition_files).
    run.record_stage(run.eval_stage, concept, "done", conditions=keys, settings=settings)
    rows = pd.concat([read_parquet(p) for p in paths], ignore_index=True)
    summary = summarize(rows, load_validity(run))
    remove_temp_files(run.eval_dir / concept / "summary.parquet")
    write_parquet(run.eval_dir / concept / "summary.parquet", summary,
                  metadata={"kind": "eval-summary", "run": run.name, "concept": concept, "settings": settings,
                            "conditions": keys})
    return EvalResult(concept, keys, computed, reused, summary, time.perf_counter() - start, paths)


def _check_localizations(run: Run, concept: str, config: EvalConfig) -> None:
    """Fail before the validity checks (minutes) when an edited method's neurons file is missing,
    unreadable or from another run."""
    from dpnle.localize import load_selection

    needed = {"dpnle": "dpnle", "dpnle-w": "dpnle", "random": "dpnle", "random-mag": "dpnle", "npti": "npti",
              "caa": "caa"}
    for method in dict.fromkeys(needed[m] for m in config.methods if m in needed):
        load_selection(run, concept, method)


_NEURON_SOURCES = {"dpnle": "dpnle", "dpnle-w": "dpnle", "random": "dpnle", "random-mag": "dpnle", "npti": "npti",
                   "caa": "caa"}


def localization_digests(run: Run, concept: str, methods: Sequence[str]) -> dict[str, str]:
    """A digest of each neurons file the methods read: re-localizing (new thresholds, layers)
    makes the edited conditions stale, so they are recomputed instead of reused."""
    out = {}
    for source in sorted({_NEURON_SOURCES[m] for m in methods if m in _NEURON_SOURCES}):
        path = run.neurons_path(concept, source)
        out[source] = _neurons_digest(path) if path.exists() else "missing"
    return out


def _neurons_digest(path: Path) -> str:
    """What a neurons file says (its metadata) and holds (every row), so a new selection changes
    it even when the localization options did not."""
    frame = read_parquet(path)
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()
    return _settings_digest({"metadata": parquet_metadata(path), "rows": hashlib.sha256(rows).hexdigest()})


def condition_digest(settings: dict[str, Any], model_digest: str | None, localization: str | None) -> str:
    """What a condition file must carry to count as made by ``settings`` on this model and
    localization (None for methods that read no neurons file)."""
    return _settings_digest({**settings, "model": model_digest, "localization": localization})


@dataclass(frozen=True)
class ConditionFile:
    """One condition file of a run and whether tables may use it: ``current`` (made by the
    concept's latest edit-eval, on the run's model, from its current localization), ``stale``
    (anything else; ``reason`` says what differs) or ``unreadable``."""

    concept: str
    key: str
    path: Path
    status: str
    reason: str = ""


def _concept_folders(run: Run, concept: str | None) -> list[Path]:
    if concept:
        return [run.eval_dir / concept]
    if not run.eval_dir.exists():
        return []
    return sorted(p for p in run.eval_dir.iterdir() if p.is_dir() and p.name != "validity")


def condition_files(run: Run, concept: str | None = None) -> list[ConditionFile]:
    """Every condition file of the run (of one concept) with its status (:class:`ConditionFile`).

    A file is current when its condition is among those of the concept's latest recorded
    edit-eval and its settings digest equals the one those settings give today, with the run's
    model and the concept's current neurons files: re-localizing, another model or other
    options make it stale. A missing provenance field never counts as a match.
    """
    model_digest = ((run.manifest().get("model") or {}).get("fingerprint") or {}).get("digest")
    out: list[ConditionFile] = []
    for folder in _concept_folders(run, concept):
        name = folder.name
        entry = run.stage_status(run.eval_stage, name) or {}
        keys, settings = entry.get("conditions") or [], entry.get("settings")
        localization = localization_digests(run, name, list(_NEURON_SOURCES))
        for path in sorted(folder.glob("*.parquet")):
            if path.name == "summary.parquet":
                continue
            key = path.stem
            try:
                meta = parquet_metadata(path)
            except ArtifactError as exc:
                out.append(ConditionFile(name, key, path, "unreadable", str(exc)))
                continue
            method = (meta.get("condition") or {}).get("method") or key.split("-", 1)[0]
            source = _NEURON_SOURCES.get(method)
            current = localization.get(source) if source else None
            if settings is None or key not in keys:
                reason = f"not among the conditions of the latest edit-eval of {name}"
            elif not model_digest or (meta.get("model") or {}).get("digest") != model_digest:
                reason = "made with another model than the run's (or the file or run.json names none)"
            elif source and meta.get("localization") != current:
                reason = f"made from an earlier {source} localization of {name}"
            elif meta.get("settings_digest") != condition_digest(settings, model_digest, current):
                reason = "made with other edit-eval settings than the latest"
            else:
                out.append(ConditionFile(name, key, path, "current"))
                continue
            out.append(ConditionFile(name, key, path, "stale", reason))
    return out


def stale_note(files: Sequence[ConditionFile]) -> str | None:
    """One paragraph listing the condition files that tables leave out, and why (None: none)."""
    left = [f for f in files if f.status != "current"]
    if not left:
        return None
    listed = "; ".join(f"{f.concept}/{f.key} ({f.reason if f.status == 'stale' else 'unreadable'})" for f in left)
    return (f"{len(left)} condition file(s) left out of these tables, as stale or unreadable: {listed}. "
            "Re-run edit-eval with the options you want in one call (finished conditions are reused), or delete them.")


def suite_flag(run: Run) -> str:
    """`` --suite NAME`` for commands that name ``run``'s evaluation suite ("" for the main one)."""
    return "" if run.suite is None else f" --suite {run.suite}"


def load_eval(run: Run, concept: str | None = None, keys: Sequence[str] | None = None,
              allow_empty: bool = False) -> pd.DataFrame:
    """The per-item rows of a run's current evaluations (of one concept, of some conditions).

    Only current condition files (:func:`condition_files`) are read; a current one that cannot
    be read is an error, never a silent gap in a table. No current file: an error, or an empty
    frame with ``allow_empty``."""
    files = [f for f in condition_files(run, concept) if keys is None or f.key in keys]
    frames = []
    for f in files:
        if f.status == "unreadable" and f.key in ((run.stage_status(run.eval_stage, f.concept) or {}).get("conditions") or []):
            raise ArtifactError(f"{f.reason} It holds condition {f.key} of {f.concept}'s latest edit-eval: delete it and "
                                f"run that edit-eval again (only this condition is recomputed).")
        if f.status == "current":
            try:
                frames.append(read_parquet(f.path))
            except ArtifactError as exc:
                raise ArtifactError(f"{exc} Delete it and run edit-eval again for {f.concept} "
                                    "(only this condition is recomputed).") from None
    if not frames:
        if allow_empty:
            return pd.DataFrame()
        raise ArtifactError(f"No current evaluations in {run.eval_dir}; run `dpnle edit-eval --run {run.name}{suite_flag(run)} ...` first.")
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# summaries


def paired_effect(edited: pd.Series, base: pd.Series) -> dict[str, float]:
    """Mean item-wise difference edited - base with a 95% t interval and Cohen's d_z."""
    joined = pd.concat([edited.rename("e"), base.rename("b")], axis=1, join="inner").dropna()
    diff = (joined["e"] - joined["b"]).to_numpy(dtype=float)
    n = len(diff)
    if n == 0:
        return {"delta": np.nan, "ci_low": np.nan, "ci_high": np.nan, "d_z": np.nan, "p": np.nan, "n_items": 0}
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else np.nan
    if n > 1 and sd > 0:
        half = float(sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
        p = float(sps.ttest_1samp(diff, 0.0).pvalue)
        d_z = mean / sd
    else:
        half, p, d_z = np.nan, np.nan, np.nan
    return {"delta": mean, "ci_low": mean - half, "ci_high": mean + half, "d_z": d_z, "p": p, "n_items": n}


def summarize(rows: pd.DataFrame, validity: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (concept, condition, benchmark, scorer, dimension): the mean score, and for every
    edited condition its paired change against no edit with a 95% interval.

    Questionnaire rows carry ``valid`` (the instrument passed its validity check for the
    *target* concept on this model) and ``target`` (the dimension is the steered concept).
    """
    keyed = rows.assign(item=rows["item_id"].astype(str) + "|" + rows["dimension"].astype(str))
    group_cols = ["concept", "benchmark", "scorer", "dimension"]
    records = []
    for group, part in keyed.groupby(group_cols, sort=False, dropna=False):
        base = part[part["method"] == "none"].set_index("item")["score"]
        for key, sub in part.groupby("condition", sort=False):
            first = sub.iloc[0]
            record = dict(zip(group_cols, group, strict=True))
            record.update(
                condition=key, method=first["method"], direction=first["direction"], gamma=first["gamma"],
                seed=first["seed"], num_neurons=int(first.get("num_neurons", 0)),
                mean=float(sub["score"].mean()), n=int(sub["score"].notna().sum()),
                chance=float(sub["chance"].mean()) if sub["chance"].notna().any() else np.nan,
            )
            if key != "none" and len(base):
                record.update(paired_effect(sub.set_index("item")["score"], base))
            records.append(record)
    summary = pd.DataFrame(records)
    if summary.empty:
        return summary
    summary["target"] = summary["dimension"] == summary["concept"]
    summary["valid"] = np.nan
    if validity is not None and not validity.empty:
        # 1.0 passed, 0.0 failed, NaN not checked (float, so the column stays numeric).
        verdict = {(r.instrument, r.scorer, r.concept): float(bool(r.passed)) for r in validity.itertuples()}
        mask = summary["benchmark"].isin(QUESTIONNAIRES)
        summary.loc[mask, "valid"] = [
            verdict.get((b, s, c), np.nan)
            for b, s, c in summary.loc[mask, ["benchmark", "scorer", "concept"]].itertuples(index=False)
        ]
    return _null_test(summary)


# Methods whose changes are tested against the random-edit null, and the draws that null needs:
# with N draws the smallest attainable null_p is 1/(N+1) (0.5 with one draw, 0.048 with 20).
NULL_TESTED = vocab.DPNLE_METHODS
MIN_NULL_DRAWS = 20
_NULL_KEY = ["concept", "benchmark", "scorer", "dimension", "direction", "gamma"]
_NULL_FAMILY = ["benchmark", "scorer", "method", "direction", "gamma"]


# The nulls a DPN-LE change is tested against: (method of the draws, prefix of the columns).
# ``random``: size-matched random neurons outside the selection; ``random-mag``: neurons drawn
# from the magnitude passers alone (what Cohen's d adds beyond |delta|). The mag_null_ columns
# come first, so null_n..null_q stay the summary's last four columns, as before.
NULLS = (("random-mag", "mag_null_"), ("random", "null_"))


def _null_test(summary: pd.DataFrame) -> pd.DataFrame:
    """Add ``null_n``, ``null_p``, ``null_z``, ``null_q``: is a DPN-LE change larger in magnitude
    than the changes of size-matched random edits? And the same four against the magnitude-only
    null, ``mag_null_n``, ``mag_null_p``, ``mag_null_z``, ``mag_null_q``.

    For each DPN-LE-family row (method ``dpnle`` or ``dpnle-w``) with change ``d`` (its
    ``delta``), the null is the ``delta`` of every random-control draw (method ``random``, one
    row per seed; ``random-mag`` for the ``mag_null_`` columns) of the same (concept, benchmark,
    scorer, dimension, direction, gamma) with a finite change, ``r_1..r_N``:

    - ``null_n`` = N;
    - ``null_p`` = (1 + #{i : |r_i| >= |d|}) / (N + 1), the empirical two-sided p with the +1
      correction (ties count against the edit; at least 1/(N+1), so N >= ``MIN_NULL_DRAWS``
      draws are needed for p <= 0.05);
    - ``null_z`` = (d - mean(r)) / std(r, ddof=1), NaN when N < 2 or the std is 0;
    - ``null_q`` = Benjamini-Hochberg adjusted ``null_p`` across the target rows (dimension ==
      concept) of this summary, per (benchmark, scorer, method, direction, gamma) family; NaN
      for non-target rows.

    Rows of other methods, and rows whose own change is NaN, get NaN (``null_n`` still counts
    the draws for a DPN-LE row without a change). A summary without ``random-mag`` draws has
    ``mag_null_n`` 0 on DPN-LE rows and NaN in the other ``mag_null_`` columns.
    """
    out = summary.copy()
    for _, prefix in NULLS:
        for column in ("n", "p", "z", "q"):
            out[prefix + column] = np.nan
    if "delta" not in out:
        return out
    for method, prefix in NULLS:
        _add_null(out, method, prefix)
    return out


def _add_null(out: pd.DataFrame, method: str, prefix: str) -> None:
    """Fill ``<prefix>n/p/z/q`` of the DPN-LE rows of ``out`` against the draws of ``method``."""
    n_col, p_col, z_col, q_col = (prefix + c for c in ("n", "p", "z", "q"))
    draws: dict[tuple, list[float]] = {}
    random_rows = out[out["method"] == method]
    for key, delta in zip(random_rows[_NULL_KEY].itertuples(index=False, name=None), random_rows["delta"],
                          strict=True):
        if np.isfinite(delta):
            draws.setdefault(key, []).append(float(delta))
    tested = out.index[out["method"].isin(NULL_TESTED)]
    for index, key in zip(tested, out.loc[tested, _NULL_KEY].itertuples(index=False, name=None), strict=True):
        r = np.asarray(draws.get(key, []), dtype=float)
        n = len(r)
        out.at[index, n_col] = n
        d = out.at[index, "delta"]
        if n == 0 or not np.isfinite(d):
            continue
        out.at[index, p_col] = (1 + int(np.sum(np.abs(r) >= abs(d)))) / (n + 1)
        if n >= 2:
            sd = float(r.std(ddof=1))
            if sd > 0:
                out.at[index, z_col] = (d - float(r.mean())) / sd
    family = out[out["target"] & out[p_col].notna()]
    for _, part in family.groupby(_NULL_FAMILY, sort=False, dropna=False):
        out.loc[part.index, q_col] = sps.false_discovery_control(part[p_col].to_numpy(float), method="bh")


TABLE_KINDS = ("all", "personality", "capability")


def write_run_tables(run: Run) -> str:
    """The paper table of a run's current conditions, written as ``paper_table.parquet`` and
    ``summary.md`` next to its eval folders (what ``dpnle edit-eval`` leaves); returns the Markdown
    (with the note on stale condition files, if any)."""
    table = paper_table(summarize(load_eval(run), load_validity(run)))
    stale = stale_note(condition_files(run))
    markdown = to_markdown(table) + (f"\n{stale}\n" if stale else "")
    write_parquet(run.eval_dir / "paper_table.parquet", table, metadata={"kind": "paper-table", "run": run.name})
    with atomic_path(run.eval_dir / "summary.md") as tmp:
        tmp.write_text(markdown)
    return markdown


def paper_table(summary: pd.DataFrame, kind: str = "all") -> pd.DataFrame:
    """The DPN-LE paper's layout, per concept and method: neurons edited, target score up and
    down (change vs no edit, with 95% CI), and capability change vs no edit.

    A questionnaire cell ends in ``[invalid]`` when the instrument failed its validity check for
    that concept on this model, ``[unchecked]`` when no check is stored; a questionnaire column is
    marked ``held-out`` when its items are disjoint from those the
    validity check (the scorer choice) read (:func:`dpnle.instruments.held_out`: IPIP-300's 180
    test items); unmarked questionnaire columns report on the items the check also read.

    Questionnaire and judge columns are one per (benchmark, scorer), capability one per
    benchmark; ``kind`` keeps the personality columns, the capability columns, or all.
    """
    from dpnle.instruments import held_out

    check_choice("table", kind, TABLE_KINDS, error=EvalError)
    if summary.empty:
        return summary
    out = []
    personality = QUESTIONNAIRES + (OPEN_ENDED,) if kind != "capability" else ()
    target = summary[summary["target"] & summary["benchmark"].isin(personality)]
    capability = summary[(summary["benchmark"].isin(CAPABILITY + (NEUTRAL,)) | summary["benchmark"].map(
        is_lmeval_benchmark)) if kind != "personality" else np.zeros(len(summary), dtype=bool)]
    # One row per gamma: a cell never averages conditions of different strength.
    for (concept, method, gamma), part in summary.groupby(["concept", "method", "gamma"], sort=False):
        row: dict[str, Any] = {"concept": concept, "method": method, "neurons": int(part["num_neurons"].max()),
                               "gamma": f"{gamma:g}" if method not in HOOKLESS_METHODS else ""}
        same = (target["concept"] == concept) & (target["method"] == method) & (target["gamma"] == gamma)
        for (bench, scorer), sub in target[same].groupby(["benchmark", "scorer"], sort=False):
            # Validity is per concept: marked in the cell, so one column holds every concept.
            valid = sub["valid"].iloc[0]
            mark = "" if bench not in QUESTIONNAIRES or valid == 1.0 else " [invalid]" if valid == 0.0 else " [unchecked]"
            tag = f"{bench}/{scorer}"
            if bench in QUESTIONNAIRES and held_out(bench):
                tag += " held-out"
            for direction in DIRECTIONS:
                d = sub[sub["direction"] == direction]
                if len(d):
                    cell = _fmt_effect(d)
                    row[f"{tag} {direction}"] = cell if cell == NO_BASELINE else cell + mark
            if method == "none":
                row[f"{tag} score"] = f"{sub['mean'].iloc[0]:.3f}" + mark
        cap = capability[(capability["concept"] == concept) & (capability["method"] == method)
                         & (capability["gamma"] == gamma)]
        for (bench, scorer), sub in cap.groupby(["benchmark", "scorer"], sort=False):
            if bench == NEUTRAL and scorer == "perplexity_unedited":
                continue
            name = f"{bench}" if bench != NEUTRAL else f"neutral {scorer}"
            if method == "none" or bench == NEUTRAL:
                row[name] = _by_direction(sub, "mean", "{:.3f}")
            else:
                row[f"{name} change"] = _by_direction(sub, "delta", "{:+.3f}")
        out.append(row)
    table = pd.DataFrame(out)
    order = {m: i for i, m in enumerate(METHODS)}
    concepts = {c: i for i, c in enumerate(dict.fromkeys(table["concept"]))}
    table = table.iloc[sorted(range(len(table)), key=lambda i: (concepts[table["concept"].iloc[i]],
                                                               order.get(table["method"].iloc[i], 99),
                                                               float(table["gamma"].iloc[i] or 0)))]
    return table.reset_index(drop=True)


def _by_direction(part: pd.DataFrame, column: str, fmt: str) -> str:
    """``up x / down y`` (means over random draws, one gamma), or the bare value without a direction."""
    values = part.groupby("direction")[column].mean()
    if list(values.index) == ["-"]:
        return fmt.format(values.iloc[0])
    return " / ".join(f"{d} {fmt.format(values[d])}" for d in DIRECTIONS if d in values.index)


NO_BASELINE = "no baseline"


def _fmt_effect(part: pd.DataFrame) -> str:
    if "delta" not in part or part["delta"].isna().all():
        # A change needs the unedited scores of the same items: without them, no number.
        return NO_BASELINE
    if len(part) > 1:  # random draws: mean and range of the draws' changes
        return f"{part['delta'].mean():+.3f} [{part['delta'].min():+.3f}..{part['delta'].max():+.3f}]"
    r = part.iloc[0]
    cell = f"{r['delta']:+.3f} ({r['ci_low']:+.3f},{r['ci_high']:+.3f})"
    return cell + _fmt_null(r)


def _fmt_null(r: pd.Series) -> str:
    """`` p_null 0.05 z +2.10 q 0.10 (N=19)`` for a DPN-LE row tested against random draws, then
    `` p_mag 0.05 z +1.30 q 0.10 (N=20)`` where it was tested against magnitude-only draws, else
    ``""`` (z only where defined: N >= 2 and draws that differ)."""
    if r.get("method") not in NULL_TESTED:
        return ""
    text = ""
    for prefix, label in (("null_", "p_null"), ("mag_null_", "p_mag")):
        n, p, q = r.get(prefix + "n", np.nan), r.get(prefix + "p", np.nan), r.get(prefix + "q", np.nan)
        z = r.get(prefix + "z", np.nan)
        if not (n >= 1) or not np.isfinite(p):
            continue
        z_text = f" z {z:+.2f}" if np.isfinite(z) else ""
        q_text = f" q {_fmt_p(q)}" if np.isfinite(q) else ""
        text += f" {label} {_fmt_p(p)}{z_text}{q_text} (N={int(n)})"
    return text


def _fmt_p(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 else f"{p:.1e}"


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    if frame.empty:
        return "(no rows)\n"
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join("" if (isinstance(v, float) and math.isnan(v)) else str(v)
                                       for v in row) + " |")
    return "\n".join(lines) + "\n"
