"""dpnle: find the MLP neurons that carry a personality trait or a human value, edit them,
and measure what the edit does to the target and to everything else."""

__version__ = "0.1.0"

# The public API, imported on first use (``dpnle.Edit`` imports dpnle.edits, and torch, then):
# ``import dpnle`` and ``dpnle --help`` stay fast. The chain, each step on in-memory values:
#   dpnle.collect.collect(model, tokenizer, prompts) -> Capture   (per-sample activations; not
#       re-exported: the name is the submodule's)
#   layer_stats(high, low) -> LayerStats               (per-layer means, variances, counts)
#   select_dpnle(stats, layers) -> DataFrame           (the DPN-LE neuron selection)
#   Edit.from_selection(frame, ...) -> Edit            (apply / generate_with_edit / save / load)
_EXPORTS = {
    "Capture": "dpnle.collect",
    "LayerStats": "dpnle.stats",
    "RunningMoments": "dpnle.stats",
    "cohens_d": "dpnle.stats",
    "layer_stats": "dpnle.stats",
    "stats_from_moments": "dpnle.stats",
    "edit_vectors": "dpnle.localize",
    "select_caa": "dpnle.localize",
    "select_dpnle": "dpnle.localize",
    "select_npti": "dpnle.localize",
    "Edit": "dpnle.edits",
    "EditHandle": "dpnle.edits",
    "bake_edit": "dpnle.edits",
    "build_edit": "dpnle.edits",
    "export_checkpoint": "dpnle.edits",
    "generate_with_edit": "dpnle.edits",
    "selection_vectors": "dpnle.edits",
    "LoadedModel": "dpnle.models",
    "load_model": "dpnle.models",
    "model_fingerprint": "dpnle.models",
    "get_concept": "dpnle.concepts",
    "make_pairs": "dpnle.pairs",
    "render_prompt": "dpnle.pairs",
    "to_samples": "dpnle.pairs",
    "Run": "dpnle.runs",
    "load_run_model": "dpnle.runs",
    "ArtifactError": "dpnle.runs",
    "InputError": "dpnle.runs",
    "DpnleError": "dpnle.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    # Never export a name of a submodule here: ``from dpnle import <submodule>`` asks this first.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpnle' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
