"""lm-evaluation-harness tasks on dpnle's in-memory model, under an edit (``lmeval:<task>``).

The optional extra ``dpnle[lmeval]`` (``make setup-lmeval``: its own venv, ``.venv-lmeval``) lets
any lm-eval task score the edited model: :func:`run_lmeval_task` wraps the already-loaded
Hugging Face model and tokenizer in lm-eval's ``HFLM`` model type (the ``hf`` model of
``lm_eval --model hf``), runs ``lm_eval.simple_evaluate`` with ``log_samples=True``, and returns
one row per evaluated document in the shape of :data:`dpnle.capability.ROW_COLUMNS`, so the
capability summary (:func:`dpnle.capability.summarize`) and edit-eval's tables read them as they
read the built-in benchmarks. lm-eval is imported on first use; without it, every entry point
raises :class:`LmevalError`, one line naming the install command.

Benchmark names: ``lmeval:<task>`` or ``lmeval:<task>@<metric>`` (:func:`parse_benchmark`). The
task may be a task, group or tag known to lm-eval; local task YAMLs are found through
``include_path`` or the ``DPNLE_LMEVAL_INCLUDE`` environment variable (one directory, or several
joined by ``os.pathsep``), passed to lm-eval's ``TaskManager(include_path=...)``. A relative
``data_files`` path in a YAML is read from the working directory (lm-eval hands it to
``datasets.load_dataset``).

The edit. Every forward call lm-eval makes for log-likelihood requests (``HFLM._model_call``)
and every ``generate`` call (``HFLM._model_generate``) runs inside ``edit.apply(model,
prompt_length=P)``, the hooks dpnle's own evaluation uses, and is checked after the call: every
hooked layer ran, and every prompt or generated position that the position policy covers was
edited (for ``generate``, :meth:`dpnle.edits.EditHandle.assert_fired` as
:func:`dpnle.capability.generate_texts` calls it). A task during which the edit changed no
position at all (e.g. policy ``generated`` on one-token answers, whose scoring logit is read at
the last prompt position) is an error, not a silently unedited result. Position policies:

- ``all``: every position of every call; lm-eval's own batching is left as it is.
- ``prompt`` / ``generated`` on generation (``generate_until``): P is the left-padded prompt
  width of the batch, exactly as on dpnle's HF path.
- ``prompt`` / ``generated`` on log-likelihood (``multiple_choice``, ``loglikelihood``): lm-eval
  lays a batch out right-padded, ``context + continuation[:-1]`` from column 0, so the context
  ends at a different column in each row. dpnle hands lm-eval the requests in groups of equal
  in-window context length L and runs each group with P = L: the context is the prompt, the
  continuation the generated part, as in :mod:`dpnle.capability`. Scores do not depend on the
  grouping (a causal model's row does not see its right padding).
- refused before running: ``prompt`` / ``generated`` on ``loglikelihood_rolling`` tasks (a
  rolling window has no prompt), and stochastic edits (NPTI's per-call random keep mask: its
  generator stream follows how lm-eval batches forward calls, so it would not replay dpnle's HF
  path).

Items. ``limit=N`` evaluates N documents per task chosen as dpnle's built-in benchmarks choose
them (:func:`dpnle.capability.select_subset`: seeded by (``lmeval:<task>``, ``seed``, N), kept
in dataset order), through lm-eval's ``samples`` argument; ``item_id`` is the document's index in
the task's evaluation split (``<task>/<index>`` when a group holds several tasks), so items pair
across conditions. lm-eval's own seeds (few-shot
sampling, Python, numpy, torch) stay at lm-eval's defaults, so prompts are those of a stock
``lm_eval`` run.

Scores. Each row's ``score`` is lm-eval's own per-document value of one metric (``acc`` by
default for multiple choice: the task's first metric that lm-eval aggregates by mean; pick another
with ``metric=`` or ``lmeval:<task>@<metric>``). Only mean-aggregated metrics have a per-document
value whose mean is lm-eval's task score; corpus-level metrics (perplexities, BLEU, corpus F1) are
refused. The frame's ``attrs["lmeval"]`` (:func:`task_settings` plus the run's own record) holds
lm-eval's version, each task's version, few-shot count, a digest of its config and of its
documents, lm-eval's aggregate results, and the edit's position counts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpnle.errors import InputError

PREFIX = "lmeval:"
INCLUDE_ENV = "DPNLE_LMEVAL_INCLUDE"
INSTALL_HINT = "pip install 'dpnle[lmeval]' (in a clone: `make setup-lmeval`, then use .venv-lmeval/bin/dpnle)"
# The share of units NPTI's per-call mask keeps (dpnle.edits.NPTI_KEEP), for check_benchmark's message.
NPTI_KEEP = 0.9


class LmevalError(InputError):
    """lm-eval missing, an unknown or unloadable task, a metric without per-item values, or an edit
    that cannot apply exactly inside lm-eval's calls (refused before running); one line naming the fix."""


# ---------------------------------------------------------------------------------------------
# names, installation, include paths


def is_lmeval_benchmark(name: str) -> bool:
    """Whether a benchmark name asks for an lm-eval task (``lmeval:...``)."""
    return str(name).strip().lower().startswith(PREFIX)


def parse_benchmark(name: str) -> tuple[str, str | None]:
    """``"lmeval:<task>[@<metric>]"`` -> ``(task, metric or None)``; needs no lm-eval."""
    text = str(name).strip()
    if not is_lmeval_benchmark(text):
        raise LmevalError(f"{name!r} is not an lm-eval benchmark name: write lmeval:<task>, e.g. lmeval:arc_easy.")
    task, at, metric = text[len(PREFIX):].partition("@")
    task, metric = task.strip(), metric.strip()
    if not task or any(ch.isspace() for ch in task) or "@" in metric:
        raise LmevalError(f"{name!r} names no lm-eval task: write lmeval:<task> or lmeval:<task>@<metric>, "
                          "e.g. lmeval:hellaswag@acc_norm.")
    if at and not metric:
        raise LmevalError(f"{name!r} has an empty metric after '@': name one (e.g. lmeval:{task}@acc_norm) or drop "
                          "the '@' for the task's first metric.")
    return task, (metric or None)


def benchmark_name(task: str, metric: str | None = None) -> str:
    """The benchmark name rows carry: ``lmeval:<task>`` (``@<metric>`` when one was asked for)."""
    return f"{PREFIX}{task}" + (f"@{metric}" if metric else "")


def lmeval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def require_lmeval() -> Any:
    """The ``lm_eval`` module, or :class:`LmevalError` naming the install command."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401  (the entry points dpnle calls)
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "lm_eval"
        what = "is not installed" if missing.split(".")[0] == "lm_eval" else f"cannot import {missing}"
        raise LmevalError(f"lmeval: benchmarks need lm-evaluation-harness, which {what} here: {INSTALL_HINT}.") from None
    return lm_eval


def lmeval_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return str(getattr(require_lmeval(), "__version__", "unknown"))


def include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[str]:
    """The task directories to search besides lm-eval's own: ``include_path`` if given, else
    ``$DPNLE_LMEVAL_INCLUDE`` (``os.pathsep``-separated); each must exist."""
    if include_path is None:
        raw = os.environ.get(INCLUDE_ENV, "")
        entries: list[Any] = [p for p in raw.split(os.pathsep) if p.strip()]
        origin = f"${INCLUDE_ENV}"
    else:
        entries = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        origin = "include_path"
    paths = []
    for entry in entries:
        path = Path(entry).expanduser()
        if not path.exists():
            raise LmevalError(f"{origin} names {str(entry)!r}, which does not exist: give a directory (or YAML "
                              "file) of lm-eval task configs.")
        paths.append(str(entry))
    return paths


_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


def task_manager(include_path: Any = None, *, include_defaults: bool = True) -> Any:
    """lm-eval's ``TaskManager`` over :func:`include_paths`, plus lm-eval's own tasks unless
    ``include_defaults`` is False; one per setting and process (indexing lm-eval's own tasks reads
    every task YAML it ships, some 20 s on a 2-core CPU)."""
    require_lmeval()
    from lm_eval.tasks import TaskManager

    paths = tuple(include_paths(include_path))
    key = (paths, bool(include_defaults))
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(paths) or None, include_defaults=bool(include_defaults))
    return _MANAGERS[key]


# ---------------------------------------------------------------------------------------------
# tasks


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().strip("'\"") or type(exc).__name__
    return text.splitlines()[0][:300]


def load_tasks(task: str, include_path: Any = None) -> tuple[Any, dict[str, Any], Any]:
    """``(what to hand simple_evaluate, {leaf task name: Task}, the TaskManager that loaded them)``
    for a task, group or tag name.

    A name defined in the include paths is loaded from an index of those paths alone (fast); if it
    needs lm-eval's own tasks too (a local group of built-in tasks), or is not local, from the
    index of both, where the include paths take precedence as in lm-eval."""
    loaded = manager = None
    if include_paths(include_path):
        manager = task_manager(include_path, include_defaults=False)
        if task in manager.all_tasks:
            try:
                loaded = manager.load([task])
            except Exception:  # refers to lm-eval's own tasks: load it from the full index below
                loaded = None
    try:
        if loaded is None:
            manager = task_manager(include_path)
            loaded = manager.load([task])
    except KeyError:
        where = include_paths(include_path)
        hint = (f" (searched lm-eval's tasks and {', '.join(where)})" if where
                else f" (searched lm-eval's own tasks; put a local task directory in ${INCLUDE_ENV})")
        raise LmevalError(f"Unknown lm-eval task {task!r}{hint}: `lm-eval ls tasks` lists the names.") from None
    except Exception as exc:  # a task whose dataset or config cannot load: lm-eval and datasets raise many types
        raise LmevalError(f"lm-eval could not load task {task!r}: {type(exc).__name__}: {_one_line(exc)}") from None
    tasks = dict(sorted(loaded["tasks"].items()))
    if not tasks:
        raise LmevalError(f"lm-eval task {task!r} holds no tasks to run.")
    top = loaded["groups"].get(task) or loaded["tasks"].get(task)
    return ([top] if top is not None else list(tasks.values())), tasks, manager


def _output_type(task_obj: Any) -> str:
    return str(getattr(task_obj, "OUTPUT_TYPE", None) or task_obj.get_config("output_type"))


def _mean_metrics(task_obj: Any) -> list[str]:
    """The task's metrics that lm-eval aggregates by mean, in the order its config lists them."""
    from lm_eval.api.metrics import mean

    return [name for name, fn in task_obj.aggregation().items() if fn is mean]


def _pick_metric(name: str, task_obj: Any, metric: str | None) -> str:
    means = _mean_metrics(task_obj)
    listed = list(task_obj.aggregation())
    if metric is not None:
        if metric not in listed:
            raise LmevalError(f"lm-eval task {name!r} has no metric {metric!r}; it reports {', '.join(listed) or 'none'}.")
        if metric not in means:
            raise LmevalError(
                f"lm-eval aggregates metric {metric!r} of task {name!r} over the whole corpus, so no per-item score "
                f"averages to it; pick a mean-aggregated one ({', '.join(means) or 'the task has none'}).")
        return metric
    if not means:
        raise LmevalError(
            f"lm-eval task {name!r} has no per-item metric (its metrics {', '.join(listed) or '(none)'} are "
            "aggregated over the whole corpus), so it cannot give dpnle's per-item rows.")
    return means[0]


def _plain(value: Any) -> str:
    """A JSON fallback that is the same in every process: a function by its qualified name, any
    other object by its text with memory addresses removed."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(value))


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=_plain))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_plain).encode()).hexdigest()[:16]


def _config_digest(task_obj: Any) -> str:
    """A digest of the task's config; the YAML's location (``metadata.config_source``) left out,
    so the same task in another checkout keeps its digest."""
    config = dict(task_obj.dump_config())
    if isinstance(config.get("metadata"), Mapping):
        config["metadata"] = {k: v for k, v in config["metadata"].items() if k != "config_source"}
    return _digest(config)


def _docs_digest(task_obj: Any) -> tuple[int, str]:
    """(number of evaluation documents, a digest of their content): which copy of the data ran."""
    sha = hashlib.sha256()
    n = 0
    for doc in task_obj.eval_docs:
        sha.update(json.dumps(doc, sort_keys=True, default=str, ensure_ascii=False).encode())
        sha.update(b"\x00")
        n += 1
    return n, sha.hexdigest()[:16]


def check_edit(edit: Any, output_types: Mapping[str, str] | None = None) -> None:
    """Refuse an edit that cannot apply exactly inside lm-eval's calls (before anything runs):
    a stochastic edit (per-call random keep mask), or a prompt/generated policy on a rolling
    log-likelihood task (``output_types``: leaf task name -> lm-eval output type)."""
    if edit is None:
        return
    keep = float(getattr(edit, "keep", 1.0))
    _check_exact(str(getattr(edit, "method", "this")), str(getattr(edit, "positions", "all")),
                 keep < 1.0 or bool(getattr(edit, "stochastic", False)), keep, output_types or {})


def _check_exact(method: str, positions: str, stochastic: bool, keep: float, output_types: Mapping[str, str]) -> None:
    if stochastic:
        raise LmevalError(
            f"The {method} edit draws a fresh random keep mask ({keep:g} of its neurons) on every forward call; "
            "its generator stream follows how lm-eval batches and orders forward calls, so lm-eval tasks could not "
            "replay the edit of dpnle's own evaluation: use the npti mask 'fixed' or 'none' for lmeval: benchmarks.")
    if positions not in ("all", "prompt", "generated"):
        raise LmevalError(f"Unknown position policy {positions!r}: choose all, prompt or generated.")
    rolling = sorted(name for name, kind in output_types.items() if kind == "loglikelihood_rolling")
    if positions != "all" and rolling:
        raise LmevalError(
            f"The {method} edit's position policy {positions!r} has no meaning on {', '.join(rolling)} "
            "(loglikelihood_rolling: a rolling window scores every token and has no prompt): use positions 'all'.")


def task_settings(
    benchmark: str,
    *,
    include_path: Any = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    tasks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What identifies an lm-eval benchmark's results, without running a model: lm-eval's version,
    the metric, and per leaf task its version, output type, few-shot setting, and digests of its
    config and of its evaluation documents (not where the YAML lies: the same task in another
    checkout has the same settings). Loads the task (and its data) when ``tasks`` is not given.
    edit-eval puts this in the condition settings, so a new lm-eval, a changed task YAML or
    another copy of the data invalidates stored results."""
    task, metric = parse_benchmark(benchmark)
    if tasks is None:
        _, tasks, _ = load_tasks(task, include_path)
    leaves: dict[str, Any] = {}
    metrics = {}
    for name, task_obj in tasks.items():
        metrics[name] = _pick_metric(name, task_obj, metric)
        n_docs, docs_digest = _docs_digest(task_obj)
        leaves[name] = {
            "output_type": _output_type(task_obj),
            "version": _json_safe((task_obj.dump_config().get("metadata") or {}).get("version")),
            "num_fewshot": task_obj.get_config("num_fewshot"),
            "config_digest": _config_digest(task_obj),
            "n_docs": n_docs,
            "docs_digest": docs_digest,
        }
    return {
        "lm_eval": lmeval_version(),
        "task": task,
        "metric": metric,
        "metrics": metrics,
        "num_fewshot": num_fewshot,
        "apply_chat_template": bool(apply_chat_template),
        "tasks": leaves,
    }


def check_benchmark(benchmark: str, *, edit_positions: str = "all", stochastic: bool = False,
                    include_path: Any = None) -> dict[str, Any]:
    """edit-eval's check of one ``lmeval:`` benchmark before any model loads: lm-eval installed,
    the task loadable, a per-item metric, and the edit settings applicable; returns
    :func:`task_settings`."""
    require_lmeval()
    task, _ = parse_benchmark(benchmark)
    _, tasks, _ = load_tasks(task, include_path)
    _check_exact("configured", str(edit_positions), bool(stochastic), NPTI_KEEP if stochastic else 1.0,
                 {name: _output_type(t) for name, t in tasks.items()})
    return task_settings(benchmark, include_path=include_path, tasks=tasks)


# ---------------------------------------------------------------------------------------------
# the model


class _EditState:
    """The edit, where it applies, and what it did across one task's model calls."""

    def __init__(self, edit: Any, target: Any):
        self.edit = edit
        self.target = target  # what edit.apply is given: the LoadedModel (digest check) or the module
        self.policy = str(getattr(edit, "positions", "all")) if edit is not None else "all"
        self.prompt_length: int | None = None  # set per group of log-likelihood requests
        self.calls = 0
        self.seen = {"prompt": 0, "generated": 0}
        self.edited = {"prompt": 0, "generated": 0}

    @property
    def restricted(self) -> bool:
        return self.edit is not None and self.policy != "all"

    def run(self, call: Callable[[], Any], prompt_length: int | None, *, prompt_width: int | None = None) -> Any:
        """``call()`` under the edit; ``prompt_width`` (generate calls) asks for the generation check."""
        if self.edit is None:
            return call()
        if self.restricted and prompt_length is None:
            raise RuntimeError(f"The {self.policy!r} edit reached an lm-eval model call whose prompt length dpnle "
                               "does not know; this lm-eval code path is not supported under that policy.")
        with self.edit.apply(self.target, prompt_length=prompt_length) as handle:
            out = call()
            if hasattr(handle, "assert_fired"):
                if prompt_width is not None:
                    handle.assert_fired(new_tokens=int(out.shape[1] - prompt_width), rows=int(out.shape[0]))
                else:
                    handle.assert_fired()
            self._count(handle)
        return out

    def _count(self, handle: Any) -> None:
        self.calls += 1
        seen = getattr(handle, "positions_seen", None)
        edited = getattr(handle, "positions_edited", None)
        if seen is None or edited is None:
            return
        for kind in ("prompt", "generated"):
            self.seen[kind] += int(seen[kind])
            self.edited[kind] += int(edited[kind])
            if self.policy in ("all", kind) and seen[kind] and edited[kind] != seen[kind]:
                raise RuntimeError(
                    f"The {getattr(self.edit, 'method', '')} edit (positions={self.policy!r}) changed "
                    f"{edited[kind]} of the {seen[kind]} {kind} positions of an lm-eval model call: it did not "
                    "fire where its policy requires.")

    def check_fired(self, task: str) -> None:
        """After the task: an edit that changed no position at all is an error."""
        if self.edit is None:
            return
        if self.calls == 0 or not any(self.edited.values()):
            raise RuntimeError(
                f"The {getattr(self.edit, 'method', '')} edit (positions={self.policy!r}) changed no position in "
                f"{self.calls} lm-eval model calls on {task!r} (seen: {self.seen}). With policy 'generated' a "
                "one-token answer is scored from the last prompt position, which that policy leaves alone: use "
                "positions 'all' for log-likelihood tasks.")

    def record(self) -> dict[str, Any]:
        return {"policy": self.policy, "model_calls": self.calls, "positions_seen": dict(self.seen),
                "positions_edited": dict(self.edited)}


_EDITED_HFLM: type | None = None


def edited_hflm_class() -> type:
    """lm-eval's ``HFLM`` with every model call under a dpnle edit (defined on first use)."""
    global _EDITED_HFLM
    if _EDITED_HFLM is not None:
        return _EDITED_HFLM
    require_lmeval()
    from lm_eval.models.huggingface import HFLM

    class EditedHFLM(HFLM):
        """``HFLM`` on an in-memory causal model; ``dpnle_state`` (an :class:`_EditState`) applies
        the edit around each forward (``_model_call``) and ``generate`` (``_model_generate``)."""

        dpnle_state: _EditState

        def _window_prompt_length(self, context: Sequence[int], continuation: Sequence[int]) -> int:
            # HFLM feeds (context + continuation)[-(max_length + 1):][:-1]: continuation[:-1] at
            # the end, the (possibly left-truncated) context before it.
            fed = min(len(context) + len(continuation), self.max_length + 1) - 1
            return max(fed - (len(continuation) - 1), 0)

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            state = self.dpnle_state
            if not state.restricted:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            groups: dict[int, list[int]] = {}
            for i, (_, context, continuation) in enumerate(requests):
                groups.setdefault(self._window_prompt_length(context, continuation), []).append(i)
            out: list[Any] = [None] * len(requests)
            for length, index in sorted(groups.items()):
                state.prompt_length = length
                try:
                    results = super()._loglikelihood_tokens([requests[i] for i in index], *args, **kwargs)
                finally:
                    state.prompt_length = None
                for i, result in zip(index, results, strict=True):
                    out[i] = result
            return out

        def _model_call(self, inps, *args, **kwargs):
            parent = super()._model_call
            return self.dpnle_state.run(lambda: parent(inps, *args, **kwargs), self.dpnle_state.prompt_length)

        def _model_generate(self, context, *args, **kwargs):
            parent = super()._model_generate
            width = int(context.shape[1])
            return self.dpnle_state.run(lambda: parent(context, *args, **kwargs), width, prompt_width=width)

        def get_model_info(self) -> dict:
            # The model is in memory: no hub look-up of a revision (dpnle records its fingerprint).
            params = sum(p.numel() for p in self._model.parameters())
            return {"model_num_parameters": int(params), "model_dtype": str(getattr(self._model, "dtype", ""))}

    _EDITED_HFLM = EditedHFLM
    return EditedHFLM


def make_lm(model: Any, tokenizer: Any, *, edit: Any = None, batch_size: int = 8, max_length: int | None = None) -> Any:
    """An lm-eval model (``HFLM``) on ``model`` (a ``LoadedModel`` or a causal LM) under ``edit``.

    The tokenizer is copied: lm-eval may set its pad token, and dpnle's own copy stays as it was."""
    from dpnle.models import LoadedModel

    module = model.model if isinstance(model, LoadedModel) else model
    if tokenizer is None and isinstance(model, LoadedModel):
        tokenizer = model.tokenizer
    if tokenizer is None:
        raise LmevalError("run_lmeval_task needs the model's tokenizer (or a LoadedModel).")
    if getattr(getattr(module, "config", None), "is_encoder_decoder", False):
        raise LmevalError("lmeval: benchmarks run on decoder-only models; dpnle edits no encoder-decoder model.")
    if int(batch_size) < 1:
        raise LmevalError(f"batch_size must be at least 1, not {batch_size}.")
    cls = edited_hflm_class()
    # HFLM warns that an in-memory model skips its loading options: that is this use, not news.
    quiet = logging.getLogger("lm_eval.models.huggingface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        lm = cls(pretrained=module, tokenizer=copy.deepcopy(tokenizer), backend="causal",
                 batch_size=int(batch_size), max_length=max_length)
    finally:
        quiet.setLevel(level)
    lm.dpnle_state = _EditState(edit, model)
    return lm


# ---------------------------------------------------------------------------------------------
# running a task


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """The process's global random generators (Python, numpy, torch) as they were, afterwards."""
    import random

    import torch

    state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _empty_row(benchmark: str, metric: str, item_id: str, prompt: str) -> dict[str, Any]:
    return {
        "benchmark": benchmark, "item_id": item_id, "prompt": prompt, "output": "", "reference": "",
        "score": float("nan"), "metric": metric, "correct_index": -1, "pred_index": -1, "chance": 0.0,
        "acc": float("nan"), "acc_norm": float("nan"), "exact_match": float("nan"), "f1": float("nan"),
        "choice_logprobs": [], "choice_logprobs_norm": [],
    }


def _scalar(value: Any) -> float | None:
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return float(value)
    return None


def _gold_indices(target: Any, choices: Sequence[str]) -> list[int]:
    """lm-eval's reading of a multiple-choice target: an index, a choice string, or a list of them."""
    golds = target if isinstance(target, (list, tuple)) else [target]
    out = []
    for gold in golds:
        if isinstance(gold, str):
            out.append(choices.index(gold) if gold in choices else -1)
        else:
            index = int(gold)
            out.append(index if 0 <= index < len(choices) else -1)
    return out


def _context(sample: Mapping[str, Any]) -> str:
    arguments = sample.get("arguments") or []
    first = arguments[0] if arguments else ""
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    return str(first)


def _sample_row(benchmark: str, metric: str, item_prefix: str, task_obj: Any, sample: Mapping[str, Any]) -> dict[str, Any]:
    row = _empty_row(benchmark, metric, f"{item_prefix}{sample['doc_id']}", _context(sample))
    kind = _output_type(task_obj)
    responses = sample.get("filtered_resps") or []
    for column in ("acc", "acc_norm", "exact_match", "f1"):
        value = _scalar(sample.get(column))
        if value is not None:
            row[column] = value
    if kind == "multiple_choice":
        choices = [str(c) for c in task_obj.doc_to_choice(sample["doc"])]
        lls = [float(r[0]) for r in responses][: len(choices)]  # acc_mutual_info appends unconditional ones
        norms = [ll / max(1, len(c)) for ll, c in zip(lls, choices, strict=True)]
        byte_norms = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, choices, strict=True)]
        ranked = {"acc_norm": norms, "acc_bytes": byte_norms}.get(metric, lls)
        pred = int(np.argmax(np.asarray(ranked)))  # first maximum on ties, as lm-eval's np.argmax
        golds = _gold_indices(sample.get("target"), choices)
        gold = next((g for g in golds if g >= 0), -1)
        row.update(
            output=choices[pred], reference=choices[gold] if gold >= 0 else str(sample.get("target")),
            correct_index=gold, pred_index=pred, chance=len([g for g in golds if g >= 0]) / len(choices),
            choice_logprobs=lls, choice_logprobs_norm=norms,
        )
    elif kind == "generate_until":
        output = responses[0] if responses else ""
        row.update(output=str(output[0] if isinstance(output, (list, tuple)) and output else output),
                   reference=str(sample.get("target")))
    else:  # loglikelihood, loglikelihood_rolling: the (log-probability, is-greedy) answer of the request
        first = responses[0] if responses else None
        row.update(output=str(first), reference=str(sample.get("target")))
    score = _scalar(sample.get(metric))
    if score is None:
        raise LmevalError(f"lm-eval gave no per-item value of {metric!r} for {benchmark} (got "
                          f"{type(sample.get(metric)).__name__}); pick a mean-aggregated metric.")
    row["score"] = score
    return row


def _aggregates(results: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in names:
        values = results.get("results", {}).get(name, {})
        out[name] = {k: float(v) for k, v in values.items()
                     if _scalar(v) is not None and math.isfinite(float(v)) and "stderr" not in k}
    return out


def run_lmeval_task(
    model: Any,
    tokenizer: Any,
    task: str,
    *,
    edit: Any = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: Any = None,
    seed: int = 0,
    metric: str | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    filter_name: str | None = None,
    max_length: int | None = None,
) -> pd.DataFrame:
    """Run one lm-eval task (or group, or tag) on ``model`` under ``edit``; one row per document
    (columns: :data:`dpnle.capability.ROW_COLUMNS`, ``benchmark`` = ``lmeval:<task>``).

    ``model``: a :class:`dpnle.models.LoadedModel` (``tokenizer`` may then be None; an edit made for
    another model is refused by its fingerprint) or a causal LM with ``tokenizer``. ``task``:
    ``"hellaswag"``, ``"lmeval:hellaswag"`` or ``"lmeval:hellaswag@acc_norm"``. ``limit`` and
    ``seed`` pick the documents as dpnle's built-in benchmarks do; ``metric`` the per-document
    score (default: the task's first mean-aggregated metric); ``num_fewshot`` overrides the task's
    few-shot count; ``filter_name`` picks one of the task's filters (default: its first).
    ``frame.attrs["lmeval"]`` records lm-eval's version, the task settings and digests, lm-eval's
    own aggregate scores and the edit's position counts (see the module docstring). The process's
    global random generators are as they were afterwards (lm-eval seeds them, datasets draws).
    """
    require_lmeval()
    with _random_state_kept():
        return _run_task(model, tokenizer, task, edit=edit, limit=limit, batch_size=batch_size,
                         include_path=include_path, seed=seed, metric=metric, num_fewshot=num_fewshot,
                         apply_chat_template=apply_chat_template, filter_name=filter_name, max_length=max_length)


def _run_task(model: Any, tokenizer: Any, task: str, *, edit: Any, limit: int | None, batch_size: int,
              include_path: Any, seed: int, metric: str | None, num_fewshot: int | None,
              apply_chat_template: bool, filter_name: str | None, max_length: int | None) -> pd.DataFrame:
    from lm_eval import evaluator

    from dpnle.capability import select_subset

    spec = task if is_lmeval_benchmark(task) else f"{PREFIX}{task}"
    name, picked = parse_benchmark(spec)
    if metric is not None and picked is not None and metric != picked:
        raise LmevalError(f"{spec!r} asks for metric {picked!r} but metric={metric!r} was passed: name one.")
    metric = metric or picked
    benchmark = benchmark_name(name, picked)
    if limit is not None and int(limit) < 1:
        raise LmevalError(f"limit must be at least 1 (None for every document), not {limit}.")
    top, tasks, manager = load_tasks(name, include_path)
    check_edit(edit, {leaf: _output_type(t) for leaf, t in tasks.items()})
    settings = task_settings(spec, include_path=include_path, num_fewshot=num_fewshot,
                             apply_chat_template=apply_chat_template, tasks=tasks)
    metrics = settings["metrics"]
    samples = None
    if limit is not None:
        samples = {leaf: [int(i) for i in select_subset(range(info["n_docs"]), f"{PREFIX}{leaf}", int(limit), seed)]
                   for leaf, info in settings["tasks"].items()}

    lm = make_lm(model, tokenizer, edit=edit, batch_size=batch_size, max_length=max_length)
    results = evaluator.simple_evaluate(
        model=lm, tasks=top, num_fewshot=num_fewshot, batch_size=int(batch_size), samples=samples,
        log_samples=True, task_manager=manager, bootstrap_iters=0, apply_chat_template=apply_chat_template,
    )
    if results is None:  # lm-eval returns None off rank 0; dpnle runs one process
        raise RuntimeError("lm-eval returned no results (not rank 0).")
    lm.dpnle_state.check_fired(name)

    rows: list[dict[str, Any]] = []
    filters: dict[str, str] = {}
    for leaf, task_obj in tasks.items():
        logged = list(results.get("samples", {}).get(leaf, []))
        keys = list(dict.fromkeys(s.get("filter") for s in logged))
        chosen = filter_name if filter_name is not None else (keys[0] if keys else None)
        if logged and chosen not in keys:
            raise LmevalError(f"lm-eval task {leaf!r} has no filter {chosen!r}; its filters: {', '.join(map(str, keys))}.")
        filters[leaf] = str(chosen)
        prefix = f"{leaf}/" if len(tasks) > 1 else ""
        for sample in sorted((s for s in logged if s.get("filter") == chosen), key=lambda s: int(s["doc_id"])):
            rows.append(_sample_row(benchmark, metrics[leaf], prefix, task_obj, sample))

    from dpnle.capability import ROW_COLUMNS

    frame = pd.DataFrame(rows, columns=ROW_COLUMNS)
    for column in ("correct_index", "pred_index"):
        frame[column] = frame[column].astype(np.int64)
    frame.attrs["lmeval"] = {
        **settings,
        "benchmark": benchmark,
        "include_path": include_paths(include_path),
        "limit": None if limit is None else int(limit),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "filters": filters,
        "n_shot": _json_safe(results.get("n-shot", {})),
        "versions": _json_safe(results.get("versions", {})),
        "results": _aggregates(results, list(tasks)),
        "edit": None if edit is None else _json_safe(edit.summary() if hasattr(edit, "summary") else repr(edit)),
        "edit_positions": lm.dpnle_state.record(),
    }
    return frame


__all__ = [
    "INCLUDE_ENV",
    "INSTALL_HINT",
    "PREFIX",
    "LmevalError",
    "benchmark_name",
    "check_benchmark",
    "check_edit",
    "edited_hflm_class",
    "include_paths",
    "is_lmeval_benchmark",
    "lmeval_available",
    "load_tasks",
    "make_lm",
    "parse_benchmark",
    "require_lmeval",
    "run_lmeval_task",
    "task_manager",
    "task_settings",
]
