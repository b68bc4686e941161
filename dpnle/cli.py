"""The ``dpnle`` command line: one thin command per pipeline stage over the Python API.

    dpnle collect-activations -> dpnle localize -> dpnle edit-eval -> dpnle leakage-report

Options can also come from a YAML file (``--config configs/x.yaml``): top-level keys apply to
every command that has an option of that name, a section named after a command applies to it
alone (``localize: {quantile: 0.99}``); flags on the command line win. A key that no command
reads (a typo, a section not named after a command) is refused, not ignored.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dpnle.concepts import Concept, resolve_concepts

console = Console(stderr=False)
err_console = Console(stderr=True)

app = typer.Typer(
    help="Find, edit and audit the neurons that carry personality traits and human values in LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Pinned public datasets and contrastive pairs.", no_args_is_help=True)
models_app = typer.Typer(help="Model aliases and the converted-model cache.", no_args_is_help=True)
runs_app = typer.Typer(help="Run directories and what they hold.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")


# ---------------------------------------------------------------------------------------------
# shared options

TraitOpt = Annotated[
    list[str] | None,
    typer.Option("--trait", "-t", help="Big Five trait to work on (repeatable): openness, conscientiousness, "
                 "extraversion, agreeableness, neuroticism."),
]
ValueOpt = Annotated[
    list[str] | None,
    typer.Option("--value", "-v", help="Schwartz value to work on (repeatable): self_direction, stimulation, "
                 "hedonism, achievement, power, security, conformity, tradition, benevolence, universalism."),
]
AllTraitsOpt = Annotated[bool, typer.Option("--all-traits", help="All five Big Five traits.")]
AllValuesOpt = Annotated[bool, typer.Option("--all-values", help="All ten Schwartz values.")]
ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Model: alias (smollm2-135m-instruct), hub id, local folder or .gguf file."),
]
RunOpt = Annotated[
    str | None,
    typer.Option("--run", "-r", help="Run name (a folder under runs/ or $DPNLE_RUNS), or the path of an existing "
                 "run folder. Default: for capture, the model's name; for later stages, the most recent run (of "
                 "--model if given)."),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(help="accelerate device_map (auto, balanced, sequential) for a model larger than one device; "
                 "hooks follow each layer to its device."),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB."),
]
OffloadOpt = Annotated[
    Path | None,
    typer.Option(help="With --device-map: folder for layers offloaded to disk."),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file of option defaults (see configs/); flags override it."),
]
PairSamplingOpt = Annotated[
    str,
    typer.Option(help="How pairs are drawn: dpnle (dpnle's own draw from its question pool, seeded by --seed) or "
                      "reference (the DPN-LE reference's build_contrastive_samples: the trait's first --num-pairs "
                      "PersonalityBench search questions, descriptions drawn by random.Random(--pair-seed); "
                      "personalitybench recipe only; needs `dpnle data fetch pb-search` on a machine with internet, "
                      "or --questions naming the search file or its folder)."),
]
PairSeedOpt = Annotated[
    int | None,
    typer.Option(help="Seed of --pair-sampling reference (default 42, the reference's).")
]


def _concepts(trait, value, all_traits, all_values, required: bool = True) -> list[Concept]:
    concepts = resolve_concepts(trait, value, all_traits, all_values)
    if required and not concepts:
        raise typer.BadParameter(
            "Name what to work on: --trait openness (repeatable), --value power, --all-traits or --all-values."
        )
    return concepts


def _open_run(run: str | None, model: str | None, write: bool = False):
    """The run a later stage works on; ``write``: the stage saves into it, so a read-only run
    folder is refused now rather than after the work."""
    from dpnle.models import DEFAULT_MODEL, resolve_model_id
    from dpnle.runs import Run, RunNotFoundError, latest_run

    if run is not None:
        target = Run.open(run)
    elif model is not None:
        target = latest_run(resolve_model_id(model))
    else:
        try:
            target = latest_run(resolve_model_id(DEFAULT_MODEL))
        except RunNotFoundError:
            target = latest_run()
    return target.check_writable() if write else target


# ---------------------------------------------------------------------------------------------
# stage 1


@app.command("collect-activations")
def collect_activations(
    trait: TraitOpt = None,
    value: ValueOpt = None,
    all_traits: AllTraitsOpt = False,
    all_values: AllValuesOpt = False,
    model: ModelOpt = "smollm2-135m-instruct",
    run: RunOpt = None,
    site: Annotated[str, typer.Option(help="mlp (down_proj input, DPN-LE), gate (act_fn output, NPTI) or "
                                           "resid (layer output, CAA).")] = "mlp",
    policy: Annotated[str, typer.Option(help="Token reduction: last (last prompt token, DPN-LE), prompt-mean, "
                                             "or response-mean (mean over the model's greedy response).")] = "last",
    layers: Annotated[str | None, typer.Option(help="Layers to keep, e.g. 12-31 or 0,4,8 (default: all).")] = None,
    batch_size: Annotated[str, typer.Option(help="Prompts per forward pass, or 'auto' to fill the device.")] = "auto",
    shard_size: Annotated[int, typer.Option(help="Samples per Parquet shard (the resume granularity).")] = 256,
    recipe: Annotated[str | None, typer.Option(help="Pair recipe: personalitybench (traits), anthropic-persona "
                                                    "(traits, CAA-style) or values. Default by concept kind.")] = None,
    num_pairs: Annotated[int, typer.Option(help="Contrastive pairs per concept (the paper: 1000).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of dpnle's pair sampling.")] = 0,
    questions: Annotated[Path | None, typer.Option(help="JSONL question file replacing dpnle's pool (with "
                                                        "--pair-sampling reference: the trait's PersonalityBench "
                                                        "search file, or the folder of <Trait>.json files).")] = None,
    pair_sampling: PairSamplingOpt = "dpnle",
    pair_seed: PairSeedOpt = None,
    tokenization: Annotated[str, typer.Option(help="dpnle (no special tokens added to a chat-templated prompt: one "
                                                   "BOS) or reference (the reference's tokenizer(text) defaults: "
                                                   "Llama-3's prompt starts with two BOS; prompts over 2048 tokens "
                                                   "are refused). Recorded in the capture; a capture resumes only "
                                                   "in its own mode.")] = "dpnle",
    max_new_tokens: Annotated[int | None, typer.Option(help="Response length for --policy response-mean "
                                                            "(default: 64; 500 with --npti-protocol reference).")] = None,
    npti_protocol: Annotated[str, typer.Option(help="How --policy response-mean makes and reads its responses: dpnle "
                                                    "(DPN-LE prompt, greedy 64 tokens, response text re-tokenized, "
                                                    "all its tokens) or reference (NPTI's search_neuron.py: its prompt, "
                                                    "greedy 500 tokens, repetition penalty 1.1, the generated ids "
                                                    "minus the last, i.e. its decode-step inputs; every layer unless "
                                                    "--layers is given on the command line). Recorded in the capture "
                                                    "key: one is never reused for the other.")] = "dpnle",
    engine: Annotated[str, typer.Option(help="What generates --policy response-mean's responses: hf (transformers "
                                             "generate) or vllm (as NPTI's own code; `make setup-vllm`). The "
                                             "activations are read by the hf model either way; the engine is in "
                                             "the capture key.")] = "hf",
    tensor_parallel_size: Annotated[int, typer.Option(help="--engine vllm: GPUs one model is split over.")] = 1,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU).")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: the best available).")] = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    num_processes: Annotated[int, typer.Option(help="Data-parallel capture in N processes started with accelerate "
                                                    "launch (one per GPU; on a CPU, N gloo processes).")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Discard an existing capture of this concept and start over.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Stage 1: run the model over each concept's contrastive pairs and cache the activations.

    Resumable: a killed run continues from its last complete shard. Data parallel with
    --num-processes N, or under `accelerate launch --multi_gpu --num_processes N -m dpnle
    collect-activations ...`."""
    from dpnle import distributed
    from dpnle.collect import check_batch_size, check_options, collect_concept
    from dpnle.models import default_device, load_model, resolve_model_id, resolve_source
    from dpnle.pairs import check_pair_sampling, make_pairs
    from dpnle.runs import InputError, Run, check_writable, default_run_name, run_location

    concepts = _concepts(trait, value, all_traits, all_values)
    # Options that cannot work fail here, before minutes of model loading.
    batch: int | str = check_batch_size(batch_size)
    from dpnle.collect import check_npti_protocol, resolve_max_new_tokens

    check_npti_protocol(npti_protocol, policy)
    max_new_tokens = resolve_max_new_tokens(max_new_tokens, npti_protocol)
    check_options(site, policy, batch, shard_size, max_new_tokens, tokenization)
    from dpnle.engines import check_engine

    engine = check_engine(engine)
    if engine != "hf" and policy != "response-mean":
        raise InputError(f"--engine {engine} generates responses, and --policy {policy} generates none: drop --engine, "
                         "or pass --policy response-mean.")
    if engine != "hf" and num_processes > 1:
        raise InputError(f"--engine {engine} captures in one process: drop --num-processes (vLLM splits a model over "
                         "GPUs with --tensor-parallel-size).")
    if tensor_parallel_size < 1:
        raise InputError(f"--tensor-parallel-size must be at least 1, not {tensor_parallel_size}.")
    if tensor_parallel_size > 1 and engine == "hf":
        raise InputError("--tensor-parallel-size splits the model over GPUs inside vLLM: pass --engine vllm.")
    check_pair_sampling(pair_sampling, pair_seed)
    _check_layer_syntax(layers)
    check_writable(run_location(run or default_run_name(resolve_model_id(model))), "run folder")
    if num_pairs < 1:
        raise InputError(f"--num-pairs must be at least 1, not {num_pairs}.")
    if num_processes < 1:
        raise InputError(f"--num-processes must be at least 1, not {num_processes}.")
    # Pairs first (seconds): missing search files or a bad recipe fail before the model loads.
    pair_sets = {
        c.name: make_pairs(c, recipe=recipe, num_pairs=num_pairs, seed=seed, questions_path=questions,
                           pair_sampling=pair_sampling, pair_seed=pair_seed)
        for c in concepts
    }
    memory = _max_memory(max_memory)
    if (num_processes > 1 or distributed.launched()) and device_map is not None:
        raise InputError(
            "Data-parallel capture puts a whole model on each process's device; drop --device-map, "
            "or capture in one process with --device-map for a model larger than one device."
        )
    if num_processes > 1 and not distributed.launched():
        if _ARGV is None:
            raise InputError("--num-processes works from the dpnle command line; in Python, use accelerate launch.")
        cpu = (device or default_device()) == "cpu"
        command, env = distributed.launch_command(
            num_processes, distributed.strip_option(_ARGV, "--num-processes"), cpu
        )
        console.print(f"[bold]launching[/] {num_processes} processes: accelerate launch {' '.join(command[3:])}")
        raise typer.Exit(distributed.run_launcher(command, env))
    workers = distributed.workers()
    say = console.print if workers.is_main else (lambda *a, **k: None)
    workers.main_first(lambda: resolve_source(model))  # a GGUF is converted once, by the main process
    loaded = load_model(model, dtype=dtype, device=workers.device or device, device_map=device_map,
                        max_memory=memory, offload_folder=offload_folder)
    layer_list = _layer_list(layers, loaded)
    if npti_protocol == "reference" and layers is not None and not _on_command_line("--layers"):
        # NPTI ranks every layer; a config file's layers (configs/llama3-8b.yaml: 12-31) are DPN-LE's.
        say(f"[bold]layers[/] all: --npti-protocol reference captures every layer, as NPTI ranks them all "
            f"(the config's layers {layers} are for DPN-LE; pass --layers on the command line to override).")
        layer_list = None
    _check_site_exists(loaded, site, layer_list)

    def open_target():
        target = Run.create_or_open(run, loaded.model_id)
        if workers.is_main:
            target.record_model(loaded)
        return target

    target = workers.main_first(open_target)
    say(f"[bold]run[/] {target.path}  [bold]model[/] {loaded.model_id} ({loaded.fingerprint.get('digest')})"
        + (f"  [bold]processes[/] {workers.world}" if workers.distributed else ""))
    from dpnle.engines import engine_for

    generator = engine_for(loaded, engine, tensor_parallel_size=tensor_parallel_size)
    for concept in concepts:
        summary = collect_concept(
            target, loaded, concept.name, pairs=pair_sets[concept.name], site=site, policy=policy, layers=layer_list,
            batch_size=batch, shard_size=shard_size, overwrite=overwrite, max_new_tokens=max_new_tokens,
            npti_protocol=npti_protocol, workers=workers, tokenization=tokenization, engine=generator,
        )
        say(
            f"[green]captured[/] {concept.name}: {summary.num_samples} samples, {summary.num_tokens} tokens, "
            f"{summary.seconds:.1f} s -> {summary.path}"
        )


def _max_memory(spec: str | None) -> dict[int | str, str] | None:
    """``0=70GiB,1=70GiB,cpu=200GiB`` -> {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'}."""
    from dpnle.runs import InputError

    if spec is None:
        return None
    memory: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        device, sep, amount = part.partition("=")
        if not sep or not amount.strip():
            raise InputError(f"--max-memory {spec!r}: write DEVICE=AMOUNT pairs, e.g. 0=70GiB,cpu=200GiB.")
        device = device.strip()
        memory[int(device) if device.isdigit() else device] = amount.strip()
    return memory


def _layer_list(spec: str | None, loaded) -> list[int] | None:
    from dpnle.arch import architecture, parse_layers
    from dpnle.runs import InputError

    if spec is None:
        return None
    num_layers = architecture(loaded.model).num_layers
    try:
        return parse_layers(spec, num_layers)
    except ValueError as exc:
        raise InputError(f"--layers {spec!r}: {exc} Pass e.g. --layers 0-{num_layers - 1} or 0,4,8.") from None


# More layers than any model has: parse_layers checks a selection's syntax against it.
_ANY_LAYER_COUNT = 10**6


def _check_layer_syntax(spec: str | None) -> None:
    """The --layers checks that need no model (numbers, separators, empty ranges), before it loads.

    The layer count is known once the model is loaded (_layer_list); so is whether a range from a
    negative to a non-negative index (``-2-3``) is empty."""
    from dpnle.arch import parse_layers
    from dpnle.runs import InputError

    if spec is None or re.search(r"(^|,)\s*-\d+-\d", spec):
        return
    fix = "Pass e.g. --layers 12-31, 0,4,8 or -4--1 (the last four)."
    if spec.strip() and not any(part.strip() for part in spec.split(",")):
        raise InputError(f"--layers {spec!r} names no layer. {fix}")
    try:
        parse_layers(spec, _ANY_LAYER_COUNT)
    except ValueError as exc:
        if "out of range" not in str(exc):  # against the real layer count, once the model is loaded
            raise InputError(f"--layers {spec!r}: {str(exc).rstrip('.')}. {fix}") from None


def _check_site_exists(loaded, site: str, layers: list[int] | None) -> None:
    """A site the model lacks (--site gate on GPT-2) fails before any pair is made."""
    from dpnle.arch import architecture

    architecture(loaded.model).module_for(site, (layers or [0])[0])


# ---------------------------------------------------------------------------------------------
# stage 2


@app.command("localize")
def localize(
    trait: TraitOpt = None,
    value: ValueOpt = None,
    all_traits: AllTraitsOpt = False,
    all_values: AllValuesOpt = False,
    all_captured: Annotated[bool, typer.Option("--all", help="Every concept captured in the run, then the "
                                                             "cross-concept overlap table.")] = False,
    run: RunOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Pick the latest run of this model.")] = None,
    method: Annotated[str, typer.Option(help="dpnle (Cohen's d + magnitude), npti (gate firing rates) or caa "
                                             "(residual mean difference).")] = "dpnle",
    quantile: Annotated[float | None, typer.Option(help="Magnitude cut: keep |delta| above this per-layer "
                                                        "quantile (DPN-LE: 0.995). Default: the model's config.")] = None,
    d_threshold: Annotated[float | None, typer.Option(help="Keep |Cohen's d| above this (DPN-LE: 0.8 Llama, "
                                                           "0.3 Qwen). Default: the model's config.")] = None,
    layers: Annotated[str | None, typer.Option(help="Layers, e.g. 12-31, or 'auto' (from the first layer "
                                                    "where high and low separate). Default: the model's config.")] = None,
    layer: Annotated[int | None, typer.Option(help="CAA only: the residual layer (default: best separated).")] = None,
    npti_selection: Annotated[str, typer.Option(help="NPTI only: reference (NPTI's process_neuron.py: firing rates "
                                                      "pooled over tokens, one list per direction sorted over all "
                                                      "captured layers together, the first 2000 then while delta_p >= "
                                                      "0.1, v95 from the pole's 301-bin histogram; needs a capture "
                                                      "with pooled counts; a --layers from a config file is DPN-LE's "
                                                      "and is not applied) or per-layer (dpnle's earlier rule: top "
                                                      "2000 per layer with delta_p >= 0.1 from per-sample fractions, "
                                                      "v95 from per-sample means).")] = "reference",
    config: ConfigOpt = None,
) -> None:
    """Stage 2: select each concept's neurons from the cached statistics (seconds, no model)."""
    from dpnle import localize as loc

    loc.check_parameters(method, quantile=quantile, d_threshold=d_threshold)
    concepts = [] if all_captured else _concepts(trait, value, all_traits, all_values)
    target = _open_run(run, model, write=True)
    params: dict[str, Any] = {"quantile": quantile, "d_threshold": d_threshold, "layers": layers, "layer": layer}
    if method == "npti":
        params["npti_selection"] = npti_selection
        if npti_selection == "reference" and layers is not None and not _on_command_line("--layers"):
            console.print(f"[bold]layers[/] every captured layer: NPTI's reference selection ranks them all "
                          f"(the config's layers {layers} are for DPN-LE; pass --layers to override).")
            params["layers"] = None
    if all_captured:
        results = loc.localize_all(target, method=method, **params)
    else:
        results = [loc.localize_concept(target, c.name, method=method, **params) for c in concepts]
    for result in results:
        _print_localize(result)
    if all_captured and len(results) > 1:
        overlap = loc.overlap_table(target, [r.concept for r in results], method=method)
        _print_overlap(overlap)


def _print_localize(result) -> None:
    summary = result.summary
    table = Table(title=f"{result.concept} · {result.method} -> {result.path}")
    for col in summary.columns:
        table.add_column(str(col), justify="right")
    for row in summary.itertuples(index=False):
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    if result.method == "caa":
        console.print(f"CAA vector: {result.total_selected} residual units at the chosen layer")
    else:
        console.print(
            f"selected {result.total_selected} neurons = {100 * result.total_share:.3f}% of the model's MLP neurons"
        )


def _print_overlap(overlap) -> None:
    concepts = sorted(set(overlap["concept_a"]) | set(overlap["concept_b"]))
    table = Table(title="Jaccard overlap of selected neurons (shared with opposite poles)")
    table.add_column("")
    for c in concepts:
        table.add_column(c[:12], justify="right")
    lookup = {(r.concept_a, r.concept_b): r for r in overlap.itertuples(index=False)}
    for a in concepts:
        cells = []
        for b in concepts:
            r = lookup.get((a, b)) or lookup.get((b, a))
            cells.append("-" if a == b or r is None else f"{r.jaccard:.3f} ({r.shared_opposite_pole})")
        table.add_row(a, *cells)
    console.print(table)


# ---------------------------------------------------------------------------------------------
# stages 3 and 4


def _csv(text: str, option: str) -> list[str]:
    """The comma-separated items of an option; an empty item (``1,,2``, ``up,``) is an error,
    never silently dropped."""
    from dpnle.runs import InputError

    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        example = {"--gammas": "0.5,1,1.5", "--directions": "up,down"}.get(option, "a,b")
        raise InputError(f"{option} {text!r} has an empty item; pass e.g. {option} {example}.")
    return parts


def _floats(text: str, option: str) -> list[float]:
    from dpnle.runs import InputError

    values = []
    for part in _csv(text, option):
        try:
            values.append(float(part))
        except ValueError:
            raise InputError(f"{option}: {part!r} is not a number; pass e.g. {option} 0.5,1,1.5.") from None
    return values


SuiteOpt = Annotated[
    str | None,
    typer.Option(help="Evaluation suite: a named protocol whose results live apart from the run's main evaluation "
                      "(runs/<run>/suites/<suite>/); the configs/paper/*.yaml presets set one each."),
]


@app.command("edit-eval")
def edit_eval(
    trait: TraitOpt = None,
    value: ValueOpt = None,
    all_traits: AllTraitsOpt = False,
    all_values: AllValuesOpt = False,
    run: RunOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Pick the latest run of this model.")] = None,
    methods: Annotated[str, typer.Option(help="Comma list of: dpnle, dpnle-w, npti, caa, random (size-matched "
                                              "random neurons outside the DPN-LE set, the control), random-mag "
                                              "(magnitude-only null: as many neurons drawn from those passing the "
                                              "|delta| quantile cut alone, with their own deltas), prompt (persona "
                                              "in the prompt), none.")] = "dpnle,random,prompt,none",
    directions: Annotated[str, typer.Option(help="Comma list of up (raise the concept) and down.")] = "up,down",
    gammas: Annotated[str, typer.Option(help="Comma list of edit strengths (DPN-LE: 1.0; 0.8 for capability), for "
                                             "every method, or per method: dpnle=0.8,dpnle-w=0.8,npti=1.4,random=0.8 "
                                             "(the DPN-LE paper's capability table); methods not named use the "
                                             "unnamed values.")] = "1",
    benchmarks: Annotated[str | None, typer.Option(help="Comma list of: ipip120, ipip300-test, ipip300, pvq40, gsm8k, "
                                                 "mmlu, arc, hellaswag, truthfulqa, hotpotqa, neutral (KL and "
                                                 "perplexity on neutral text), personalitybench, lmeval:<task>[@metric] "
                                                 "(any lm-evaluation-harness task; `make setup-lmeval`). Default: traits "
                                                 "on IPIP-300's 180 held-out items (ipip300-test; the validity check "
                                                 "reads the other 120), values on pvq40, and neutral.")] = None,
    lmeval_include: Annotated[str | None, typer.Option(help="Folder(s) of local lm-eval task YAMLs, ':'-separated "
                                                            "(default: $DPNLE_LMEVAL_INCLUDE).")] = None,
    scorers: Annotated[str, typer.Option(help="Questionnaire scorers: likert, statement, yesno.")] = "likert,statement",
    limit: Annotated[int | None, typer.Option(help="Questionnaire items per trait/value (default: all).")] = None,
    capability_limit: Annotated[int, typer.Option(help="Items per capability benchmark (seeded subset); 0 = all.")] = 100,
    open_ended_limit: Annotated[int, typer.Option(help="PersonalityBench test questions per trait; 0 = all.")] = 20,
    open_ended_tokens: Annotated[int | None, typer.Option(help="New tokens per PersonalityBench answer (default: the "
                                                               "DPN-LE reference's 400).")] = None,
    judge: Annotated[str, typer.Option(help="Open-ended rater: openai:BASE_URL#MODEL, hf:MODEL or none.")] = "none",
    positions: Annotated[str, typer.Option(help="Where the edit applies: all, prompt or generated (a generated-only "
                                                "edit never touches a log-likelihood score).")] = "all",
    mode: Annotated[str, typer.Option(help="both (HIGH and LOW sets together) or directional (HIGH to raise, "
                                           "LOW to lower).")] = "both",
    seed: Annotated[int, typer.Option(help="Seed of subsets, masks and random controls.")] = 0,
    npti_mask: Annotated[str, typer.Option(help="How an NPTI edit keeps 90% of its target neurons: per-call (NPTI's "
                                                "code: a fresh random mask on every forward call, seeded by --seed), "
                                                "none (every target: DPN-LE's re-implementation) or fixed (one "
                                                "seeded subset).")] = "per-call",
    suite: SuiteOpt = None,
    random_draws: Annotated[int, typer.Option(help="Draws of each random null (random, random-mag) per setting: the nulls each DPN-LE change is tested against (p >= 1/(N+1)).")] = 20,
    validity_personas: Annotated[int, typer.Option(help="High and low persona prompts per concept in the "
                                                        "instrument validity check.")] = 4,
    all_scorers: Annotated[bool, typer.Option(help="Score conditions with every scorer, not only those that "
                                                   "passed the validity check for the target.")] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 16,
    engine: Annotated[str, typer.Option(help="What generates GSM8K, HotpotQA and PersonalityBench answers: hf "
                                             "(transformers generate) or vllm (same edits, `make setup-vllm`); "
                                             "log-likelihood scores always run on hf.")] = "hf",
    tensor_parallel_size: Annotated[int, typer.Option(help="--engine vllm: GPUs one model is split over (vLLM "
                                                         "tensor parallelism; each rank edits its slice).")] = 1,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, mps (default: the best available).")] = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Stage 3: steer each concept with its neurons and measure the trait, the other traits and capability.

    Every condition's rows are saved as soon as it finishes; a re-run computes only what is missing."""
    from dpnle import evaluate as ev
    from dpnle.runs import InputError

    for option, count in (("--capability-limit", capability_limit), ("--open-ended-limit", open_ended_limit)):
        if count < 0:
            raise InputError(f"{option} must be 0 (all items) or a positive count, not {count}.")
    concepts = _concepts(trait, value, all_traits, all_values)
    if benchmarks is None:
        kinds = {concept.kind for concept in concepts}
        benchmarks = ",".join([*(["ipip300-test"] if "trait" in kinds else []),
                               *(["pvq40"] if "value" in kinds else []), "neutral"])
    eval_config = ev.EvalConfig(
        methods=_csv(methods, "--methods"), directions=_csv(directions, "--directions"),
        gammas=ev.parse_gammas(gammas), npti_mask=npti_mask, benchmarks=_csv(benchmarks, "--benchmarks"),
        scorers=_csv(scorers, "--scorers"), limit=limit,
        capability_limit=capability_limit if capability_limit > 0 else None,
        open_ended_limit=open_ended_limit if open_ended_limit > 0 else None, open_ended_tokens=open_ended_tokens,
        judge=judge, positions=positions, mode=mode, seed=seed,
        random_draws=random_draws, batch_size=batch_size, valid_scorers_only=not all_scorers,
        validity_personas=validity_personas, engine=engine, tensor_parallel_size=tensor_parallel_size,
        lmeval_include=lmeval_include,
    )
    _check_edit_options(positions, mode)
    target = _open_run(run, model, write=True).with_suite(suite)
    loaded = _load_run_model(target, dtype=dtype, device=device, device_map=device_map,
                             max_memory=_max_memory(max_memory), offload_folder=offload_folder)
    for concept in concepts:
        result = ev.evaluate_concept(target, loaded, concept.name, eval_config, log=lambda m: console.print(m),
                                     progress=console.is_terminal)
        console.print(f"[green]{concept.name}[/]: {len(result.computed)} condition(s) computed, "
                      f"{len(result.reused)} reused, {result.seconds:.0f} s")
    console.print(ev.write_run_tables(target), highlight=False)


def _check_edit_options(positions: str, mode: str) -> None:
    """edit-eval's --positions and --mode, checked before the run's model loads (EvalConfig checks
    the other options, --judge included)."""
    from dpnle.vocab import MODES, POSITIONS, check_choice

    check_choice("--positions", positions, POSITIONS)
    check_choice("--mode", mode, MODES)


def _load_run_model(run, dtype: str, device: str | None, device_map: str | None, max_memory=None,
                    offload_folder: Path | None = None):
    """Load the model a run was made with, and refuse one whose weights differ
    (:func:`dpnle.runs.load_run_model`)."""
    from dpnle.runs import load_run_model

    return load_run_model(run, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder)


@app.command("tables")
def tables(
    run: RunOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Pick the latest run of this model.")] = None,
    kind: Annotated[str, typer.Option(help="personality (trait score up/down vs no edit), capability (change vs "
                                           "no edit, KL, perplexity), leakage, matched (each method's target "
                                           "change at common KL costs, from a gamma sweep), or all.")] = "all",
    suite: SuiteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print a run's results as Markdown tables in the DPN-LE paper's layout (from its eval Parquet)."""
    from dpnle import evaluate as ev

    target = _open_run(run, model).with_suite(suite)
    from dpnle.runs import InputError

    known = ("personality", "capability", "leakage", "matched")
    if kind != "all" and kind not in known:
        raise InputError(f"--kind {kind!r}: choose one of {', '.join(known)} or all.")
    kinds = list(known) if kind == "all" else [kind]
    summary = None
    for k in kinds:
        if k == "matched":
            import pandas as pd

            from dpnle.matched import matched_cost

            if summary is None:
                summary = ev.summarize(ev.load_eval(target), ev.load_validity(target))
            if not (summary["benchmark"] == "neutral").any():
                if kind == "matched":
                    raise InputError("--kind matched needs each condition's cost: run edit-eval with --benchmarks "
                                     "including neutral.")
                continue
            pairs = summary.loc[summary["benchmark"].isin(ev.QUESTIONNAIRES), ["benchmark", "scorer"]].drop_duplicates()
            frames = [matched_cost(summary, b, s) for b, s in pairs.itertuples(index=False)]
            table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            console.print(f"\n[bold]matched cost[/] ({target.name}): target change at the KL of the DPN-LE "
                          "conditions; random: median of the draws [2.5-97.5 percentile band]")
            console.print(ev.to_markdown(table.round(4)), highlight=False, soft_wrap=True)
            continue
        if k == "leakage":
            from dpnle.leakage import leakage_table

            table = leakage_table(ev.load_eval(target), ev.load_validity(target))
            table = table[table["target"] == "mean"].drop(columns=["target"])
        else:
            if summary is None:
                summary = ev.summarize(ev.load_eval(target), ev.load_validity(target))
            table = ev.paper_table(summary, kind=k)
        console.print(f"\n[bold]{k}[/] ({target.name})")
        console.print(ev.to_markdown(table.round(4) if k == "leakage" else table), highlight=False, soft_wrap=True)
    stale = ev.stale_note(ev.condition_files(target))
    if stale:
        err_console.print(f"[yellow]{stale}[/yellow]", highlight=False, soft_wrap=True)


@app.command("export")
def export(
    out: Annotated[Path, typer.Argument(help="Folder for the standalone checkpoint.")],
    trait: Annotated[str | None, typer.Option("--trait", "-t", help="The Big Five trait to bake in.")] = None,
    value: Annotated[str | None, typer.Option("--value", "-v", help="The Schwartz value to bake in.")] = None,
    run: RunOpt = None,
    method: Annotated[str, typer.Option(help="dpnle or dpnle-w.")] = "dpnle",
    direction: Annotated[str, typer.Option(help="up (raise the concept) or down.")] = "up",
    gamma: Annotated[float, typer.Option(help="Edit strength.")] = 1.0,
    mode: Annotated[str, typer.Option(help="both or directional.")] = "both",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Bake a DPN-LE edit into the MLP output bias: a checkpoint any transformers-compatible server runs
    at zero cost (the edit applies at every position)."""
    from dpnle.edits import build_edit, export_checkpoint

    names = [n for n in (trait, value) if n]
    if len(names) != 1:
        raise typer.BadParameter("Name exactly one concept: --trait openness or --value power.")
    concept = _concepts([trait] if trait else None, [value] if value else None, False, False)[0]
    _check_export_folder(out, overwrite)
    target = _open_run(run, None)
    edit = build_edit(target, concept.name, method, direction=direction, gamma=gamma, mode=mode, positions="all")
    loaded = _load_run_model(target, dtype="float32", device="cpu", device_map=None)
    path = export_checkpoint(loaded, loaded.tokenizer, edit, out, in_place=True, overwrite=overwrite)
    console.print(f"[green]exported[/] {concept.name} {method} {direction} gamma={gamma} "
                  f"({edit.num_neurons} neurons) -> {path}")


def _check_export_folder(out: Path, overwrite: bool) -> None:
    """export's folder, checked before the model loads: a new, empty or (--overwrite) replaceable
    folder that can be written."""
    from dpnle.runs import InputError, check_writable

    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a folder: pass a new or empty folder for the checkpoint.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} exists and is not empty: pick another folder, or pass --overwrite to replace it.")
    check_writable(out, "export folder")


@app.command("import-npti")
def import_npti(
    trait: Annotated[str, typer.Option("--trait", "-t", help="The Big Five trait whose lists to import.")],
    run: RunOpt = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="Folder holding NPTI's <Trait>_dict.json and "
                                                               "<Trait>_reversed_dict.json.")] = None,
    from_registry: Annotated[bool, typer.Option(help="Take the lists from dpnle's dataset registry (pinned "
                                                     "RUCAIBox/NPTI@630d2a2, verified by SHA-256; A, C, E, N).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing NPTI localization of the trait.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Use NPTI's published neuron lists (Llama-3-8B-Instruct) as a run's NPTI localization.

    Writes neurons/<trait>.npti.parquet in the schema `dpnle localize --method npti` writes, so
    `dpnle edit-eval --methods npti` edits the published neurons. Refuses lists that do not fit
    the run's model (layers x intermediate size), a neuron in both lists and non-finite values."""
    from dpnle import npti_lists
    from dpnle.runs import InputError

    if (directory is None) == (not from_registry):
        raise InputError("Name where the lists are: --dir FOLDER or --from-registry (not both).")
    concept = _concepts([trait], None, False, False)[0]
    target = _open_run(run, None, write=True)
    registry = None
    if from_registry:
        from dpnle import datasets

        high, low = npti_lists.registry_paths(concept.name)
        registry = datasets.npti_list_names(concept.name)
    else:
        high_name, low_name = npti_lists.list_file_names(concept.name)
        high, low = directory / high_name, directory / low_name
    result = npti_lists.import_npti_lists(target, concept.name, high, low, overwrite=overwrite, registry=registry)
    model_id = (target.manifest().get("model") or {}).get("id")
    if not npti_lists.looks_like_made_for(model_id):
        err_console.print(f"[yellow]warning:[/yellow] NPTI's lists were made for {npti_lists.MADE_FOR}; run "
                          f"{target.name} uses {model_id!r}, which has the same shape but other neurons.",
                          highlight=False, soft_wrap=True)
    console.print(f"[green]imported[/] {result.concept}: {result.n_high} HIGH + {result.n_low} LOW neurons "
                  f"(lists fit {result.shape['num_layers']} layers x {result.shape['intermediate_size']}) -> "
                  f"{result.path}")


@app.command("leakage-report")
def leakage_report(
    run: RunOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Pick the latest run of this model.")] = None,
    suite: SuiteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Stage 4: leakage of each edit into the concepts it was not aimed at; tables, figures, report.md and a
    self-contained index.html under runs/<run>/report/ (a suite's: runs/<run>/suites/<suite>/report/)."""
    from dpnle.report import build_report

    target = _open_run(run, model, write=True).with_suite(suite)
    result = build_report(target, log=lambda m: console.print(m))
    console.print(f"[green]report[/] {result.report_md}\n[green]html[/]   {result.index_html}")


# ---------------------------------------------------------------------------------------------
# data


@data_app.command("list")
def data_list() -> None:
    """Every pinned dataset file: where it comes from, its licence, whether it is cached."""
    from dpnle import datasets

    table = Table(title="dpnle datasets (pinned; groups: " + ", ".join(datasets.GROUPS) + ")")
    for col in ("name", "source", "path", "licence", "cached"):
        table.add_column(col)
    for row in datasets.list_entries():
        pinned = "" if row.verifiable else " (unpinned)"
        table.add_row(row.name, row.source + pinned, row.path, row.licence, "yes" if row.cached else "-")
    console.print(table)


@data_app.command("fetch")
def data_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Dataset names or groups (see `dpnle data list`).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every verifiable dataset.")] = False,
    force: Annotated[bool, typer.Option(help="Fetch again even when the cached copy verifies.")] = False,
) -> None:
    """Download (or copy from $DPNLE_DATA_MIRROR) and verify datasets into the cache."""
    from dpnle import datasets

    selected = datasets.resolve_names(names or [], all_entries=all_)
    if not selected:
        raise typer.BadParameter("Name datasets to fetch (see `dpnle data list`) or pass --all.")
    for name in selected:
        path = datasets.fetch(name, force=force)
        note = "" if datasets.is_pinned(name) else " [yellow](not verified: no pinned digest)[/]"
        console.print(f"[green]ok[/] {name} -> {path}{note}")
    console.print(datasets.fetch_summary(selected))


@data_app.command("verify")
def data_verify(
    names: Annotated[list[str] | None, typer.Argument(help="Dataset names or groups (default: all cached).")] = None,
) -> None:
    """Check the hashes of cached datasets."""
    from dpnle import datasets

    selected = datasets.resolve_names(names or [], all_entries=not names)
    bad = 0
    for name in selected:
        result = datasets.verify(name)
        if not result.present:
            console.print(f"[yellow]missing[/] {name}")
        elif result.verified:
            console.print(f"[green]ok[/] {name}")
        elif result.ok:
            console.print(f"[yellow]not verified[/] {name}: no pinned digest to check it against")
        else:
            bad += 1
            console.print(f"[red]hash mismatch[/] {name}: {result.path} has sha256 {result.actual_sha256}; "
                          f"delete it and run `dpnle data fetch {name}`")
    if bad:
        raise typer.Exit(code=1)


@data_app.command("pairs")
def data_pairs(
    trait: TraitOpt = None,
    value: ValueOpt = None,
    all_traits: AllTraitsOpt = False,
    all_values: AllValuesOpt = False,
    concept: Annotated[list[str] | None, typer.Option("--concept", help="Trait or value by name (repeatable).")] = None,
    recipe: Annotated[str | None, typer.Option(help="personalitybench, anthropic-persona or values "
                                                    "(default by concept kind).")] = None,
    num_pairs: Annotated[int, typer.Option(help="Pairs per concept.")] = 1000,
    seed: Annotated[int, typer.Option(help="Sampling seed: same seed, same pairs.")] = 0,
    questions: Annotated[Path | None, typer.Option(help="JSONL question file replacing dpnle's pool (with "
                                                        "--pair-sampling reference: the trait's search file, or "
                                                        "the folder of <Trait>.json files).")] = None,
    pair_sampling: PairSamplingOpt = "dpnle",
    pair_seed: PairSeedOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the dpnle cache's pairs/).")] = None,
    show: Annotated[int, typer.Option(help="Print this many example pairs.")] = 1,
    config: ConfigOpt = None,
) -> None:
    """Write question-matched contrastive pairs (Parquet) for each concept."""
    from dpnle.concepts import get_concept
    from dpnle.pairs import default_pairs_path, make_pairs, write_pairs

    concepts = resolve_concepts(trait, value, all_traits, all_values) + [get_concept(c) for c in concept or []]
    if not concepts:
        raise typer.BadParameter("Name a concept: --concept openness, --trait ..., --value ..., --all-traits.")
    for c in concepts:
        pairs = make_pairs(c, recipe=recipe, num_pairs=num_pairs, seed=seed, questions_path=questions,
                           pair_sampling=pair_sampling, pair_seed=pair_seed)
        used_seed = pairs.attrs["pairs_info"]["pair_seed"]
        path = default_pairs_path(c.name, pairs["recipe"].iloc[0], num_pairs, used_seed, pair_sampling)
        if out is not None:
            path = out / path.name
        write_pairs(pairs, path, seed=used_seed, questions_path=questions)
        console.print(f"[green]{len(pairs)} pairs[/] {c.name} ({pairs['recipe'].iloc[0]}) -> {path}")
        for row in pairs.head(show).itertuples(index=False):
            console.print(
                f"[bold]high[/]: {row.high_message}{row.high_response_prefix}\n"
                f"[bold]low[/]: {row.low_message}{row.low_response_prefix}",
                highlight=False,
            )


# ---------------------------------------------------------------------------------------------
# models and runs


@models_app.command("list")
def models_list() -> None:
    """Known model aliases and converted models in the cache."""
    from dpnle.models import list_models

    table = Table(title="models")
    for col in ("name", "kind", "source", "status"):
        table.add_column(col)
    for row in list_models():
        table.add_row(row["name"], row["kind"], row["source"], row["status"])
    console.print(table)


@runs_app.command("list")
def runs_list() -> None:
    """Every run under runs/ (or $DPNLE_RUNS) with its model and finished stages."""
    from dpnle.runs import ArtifactError, list_runs

    table = Table(title="runs")
    for col in ("run", "model", "stages done", "updated"):
        table.add_column(col)
    unreadable = []
    for r in list_runs():
        updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.manifest_path.stat().st_mtime))
        try:
            manifest = r.manifest()
        except ArtifactError as exc:  # listed as unreadable; the other runs are still listed
            unreadable.append(str(exc))
            table.add_row(r.name, "[red]unreadable run.json[/]", "-", updated)
            continue
        stages = manifest.get("stages", {})
        done = ", ".join(
            f"{stage} ({sum(1 for e in entries.values() if e.get('status') == 'done')})"
            for stage, entries in stages.items()
        )
        table.add_row(r.name, manifest.get("model", {}).get("id", "?"), done or "-", updated)
    console.print(table)
    for problem in unreadable:
        err_console.print(f"[yellow]warning:[/yellow] {problem}", highlight=False, soft_wrap=True)


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(help="Run name or path.")]) -> None:
    """What a run holds: model, stages with their parameters, artifacts."""
    from dpnle.runs import Run

    r = Run.open(run)
    manifest = r.manifest()
    fp = manifest.get("model", {}).get("fingerprint", {})
    console.print(f"[bold]{r.name}[/] at {r.path}\nmodel {manifest['model'].get('id')} (digest {fp.get('digest', '?')})")
    for stage, entries in manifest.get("stages", {}).items():
        table = Table(title=stage)
        table.add_column("concept")
        table.add_column("status")
        table.add_column("parameters")
        for concept, entry in entries.items():
            params = {k: v for k, v in entry.items() if k not in ("status",)}
            table.add_row(concept, entry.get("status", "?"), ", ".join(f"{k}={v}" for k, v in params.items()))
        console.print(table)
    files = sorted(p.relative_to(r.path) for p in r.path.rglob("*.parquet"))
    console.print(f"{len(files)} Parquet artifacts")


# ---------------------------------------------------------------------------------------------
# entry point with YAML defaults and readable errors


def _config_path(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def _default_map(command, config: dict[str, Any]) -> dict[str, Any]:
    """Click default_map for every (sub)command: top-level scalars, overridden by a section per command."""
    common = {k.replace("-", "_"): v for k, v in config.items() if not isinstance(v, dict)}
    result: dict[str, Any] = {}
    # Typer's groups carry their subcommands in `.commands` (typer vendors its own click).
    if isinstance(getattr(command, "commands", None), dict):
        for name, sub in command.commands.items():
            section = config.get(name, {}) if isinstance(config.get(name), dict) else {}
            result[name] = _default_map(sub, {**{k: v for k, v in config.items() if not isinstance(v, dict)},
                                              **section})
        return result
    params = {p.name for p in command.params}
    return {k: v for k, v in common.items() if k in params}


def load_config(path: Path) -> dict[str, Any]:
    import yaml

    from dpnle.runs import InputError

    if not path.exists():
        raise InputError(f"Config file {path} does not exist: pass the path of a YAML file of option defaults "
                         "(examples in configs/).")
    if path.is_dir():
        raise InputError(f"Config file {path} is a folder: pass a YAML file, e.g. configs/demo.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"Config file {path} is not valid YAML ({problem}{where}): fix that line.") from None
    except UnicodeDecodeError:
        raise InputError(f"Config file {path} is not a text file: pass a YAML file of option defaults.") from None
    if not isinstance(data, dict):
        raise InputError(f"Config file {path} must hold a mapping of option names to values (e.g. "
                         f"'num_pairs: 64'), not a {type(data).__name__}.")
    return data


def _options(command) -> set[str]:
    """The option names a config can set for ``command`` (for a group: for any command in it)."""
    subcommands = getattr(command, "commands", None)
    if isinstance(subcommands, dict):
        return set().union(*(_options(sub) for sub in subcommands.values()))
    return {p.name for p in command.params if p.name and p.name != "config"}


def _suggest(key: str, names: set[str]) -> str:
    import difflib

    for variant in (key.replace("_", "-"), key.replace("-", "_")):
        if variant in names:
            return f" (did you mean {variant}?)"
    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_config(command, config: dict[str, Any], path: Path, section: tuple[str, ...] = ()) -> None:
    """Refuse a key no command reads (a typo would leave the default in force without a word):
    top-level keys must be an option of some command, sections must be named after a command,
    and a command's section may hold only its own options."""
    from dpnle.runs import InputError

    subcommands = getattr(command, "commands", None)
    subcommands = subcommands if isinstance(subcommands, dict) else {}
    options = _options(command)
    command_name = f"dpnle {' '.join(section)}" if section else "dpnle"
    for raw_key, value in config.items():
        key, name = str(raw_key), str(raw_key).replace("-", "_")
        if isinstance(value, dict) and key in subcommands:
            check_config(subcommands[key], value, path, (*section, key))
        elif isinstance(value, dict) and subcommands:
            raise InputError(f"Config file {path}: {command_name} has no command {key!r} to name a section after"
                             f"{_suggest(key, set(subcommands))}. Sections: {', '.join(sorted(subcommands))}.")
        elif name not in options:
            owner = f"{command_name} has no option" if not subcommands else f"no {command_name} command has an option"
            raise InputError(f"Config file {path}: {owner} {key!r}{_suggest(name, options)}. "
                             f"Valid options: {', '.join(sorted(options))}.")
        elif isinstance(value, dict):
            raise InputError(f"Config file {path}: option {key!r} of {command_name} takes a value, not a mapping: "
                             f"write {key}: VALUE.")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input or state: shown as one readable message, not a traceback.

    Every such dpnle error derives from :class:`dpnle.errors.DpnleError` (ArtifactError,
    InputError, PairsError, ModelLoadError, UnsupportedModelError, UnknownConceptError,
    EvalError, DatasetError, CapabilityError, JudgeError, ...)."""
    from dpnle.errors import DpnleError

    return (DpnleError, FileNotFoundError, FileExistsError)


def _error_line(message: str) -> None:
    """One line on stderr: ``error: ...`` (no wrapping, no markup read from the message)."""
    from rich.markup import escape

    err_console.print(f"[red]error:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)


_ARGV: list[str] | None = None  # the command line, for --num-processes to relaunch itself


def _on_command_line(option: str) -> bool:
    """Whether ``option`` was typed on the command line (not taken from a --config file).
    Outside :func:`main` (no command line known) every given value counts as typed."""
    if _ARGV is None:
        return True
    return any(arg == option or arg.startswith(option + "=") for arg in _ARGV)
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})  # met mid-stage: one line, too


def main(argv: list[str] | None = None) -> None:
    global _ARGV
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV = argv
    command = typer.main.get_command(app)
    default_map = None
    from dpnle.compat import untested_versions
    from dpnle.distributed import MainProcessFailed

    for line in untested_versions():
        err_console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
    try:
        config_path = _config_path(argv)
        if config_path is not None:
            config = load_config(config_path)
            check_config(command, config, config_path)
            default_map = _default_map(command, config)
        command.main(args=argv, prog_name="dpnle", default_map=default_map, standalone_mode=True)
    except MainProcessFailed:
        sys.exit(2)  # a data-parallel helper process: the main process shows the error
    except user_errors() as exc:
        if os.environ.get("DPNLE_DEBUG"):
            raise
        _error_line(str(exc))
        sys.exit(2)
    except OSError as exc:
        from dpnle.runs import is_disk_full  # ENOSPC, or EDQUOT (a quota used up)

        if os.environ.get("DPNLE_DEBUG"):
            raise
        if exc.errno in _NOT_WRITABLE and exc.filename:
            _error_line(f"{exc.strerror or os.strerror(exc.errno)}: {exc.filename}. Give yourself access to it "
                        "(chmod u+rw), or point DPNLE_RUNS (runs) / DPNLE_CACHE (datasets, models) at a folder "
                        "you can write.")
            sys.exit(2)
        if not is_disk_full(exc):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        _error_line(
            f"The disk is full{where} ({exc.strerror or os.strerror(exc.errno)}). Free space there, or point "
            "DPNLE_RUNS (runs) / DPNLE_CACHE (datasets, models) at a disk with room, then run the same command "
            "again: finished work is kept and no partial file was left."
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
