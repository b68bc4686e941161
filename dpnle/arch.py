"""Where the neurons are: per-architecture locations of the three capture and edit sites.

Sites, per decoder layer:

- ``mlp``: the input of the MLP's output projection (``down_proj`` / ``c_proj`` /
  ``dense_4h_to_h``). For a gated MLP this is ``act_fn(gate_proj(x)) * up_proj(x)``; these are
  the "neurons" of DPN-LE. Read with a forward pre-hook on the output projection.
- ``gate``: the output of the MLP's activation module (``act_fn(gate_proj(x))`` for a gated
  MLP; the NPTI baseline's site). Read with a forward hook on the activation module.
- ``resid``: the decoder layer's output, i.e. the residual stream after the layer (CAA's site).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dpnle.errors import DpnleError
from dpnle.vocab import SITES, Site, check_choice

# Attribute paths from the top-level model to the list of decoder layers, tried in order.
_LAYER_LIST_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3
    "model.language_model.layers",  # multimodal wrappers (Gemma3ForConditionalGeneration)
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)
_OUTPUT_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2")
_ACTIVATIONS = ("act_fn", "activation_fn", "act")
_GATE_PROJECTIONS = ("gate_proj", "gate_up_proj", "w1")


class UnsupportedModelError(ValueError, DpnleError):
    pass


@dataclass
class LayerSites:
    index: int
    layer: nn.Module
    mlp: nn.Module
    output_projection: nn.Module
    output_projection_name: str
    activation: nn.Module | None
    gated: bool


@dataclass
class Architecture:
    """The decoder layers of a model and the modules that hold each site."""

    model_class: str
    layers: list[LayerSites]
    hidden_size: int
    intermediate_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def gated(self) -> bool:
        return all(site.gated for site in self.layers)

    def width(self, site: str) -> int:
        """Number of units captured per layer at ``site``."""
        check_site(site)
        return self.hidden_size if site == "resid" else self.intermediate_size

    def module_for(self, site: str, layer: int) -> nn.Module:
        """The module whose hook reads (or edits) ``site`` at ``layer``."""
        check_site(site)
        sites = self.layers[layer]
        if site == "mlp":
            return sites.output_projection
        if site == "resid":
            return sites.layer
        if sites.activation is None or not sites.gated:
            raise UnsupportedModelError(
                f"{self.model_class} has no gated MLP, so there is no 'gate' site (NPTI's); "
                f"use --site mlp or resid."
            )
        return sites.activation

    def output_weight(self, layer: int) -> torch.Tensor:
        """W_down as a [hidden, intermediate] matrix, whatever the module's convention."""
        proj = self.layers[layer].output_projection
        weight = proj.weight
        # GPT-2's Conv1D stores [in_features, out_features].
        if type(proj).__name__ == "Conv1D":
            return weight.t()
        return weight


def check_site(site: Site) -> None:
    check_choice("site", site, SITES, error=ValueError)


def register_site_hook(
    arch: Architecture, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> RemovableHandle:
    """Hook ``site`` of ``layer``: every forward pass through it calls ``fn`` with the site's value
    [batch, seq, width], and a tensor ``fn`` returns replaces that value (None leaves it as it is).

    ``mlp`` is the input of the output projection, read by a forward pre-hook; ``gate`` (the
    activation's output) and ``resid`` (the decoder layer's output; a layer that returns a tuple
    has the hidden states first) by a forward hook. Exceptions ``fn`` raises propagate out of the
    forward pass. Remove the hook with ``handle.remove()``.
    """
    module = arch.module_for(site, layer)  # raises for a missing site
    if site == "mlp":

        def pre_hook(_module: nn.Module, args: tuple) -> tuple | None:
            if not args or not torch.is_tensor(args[0]):
                raise RuntimeError(f"Layer {layer}'s output projection was called without a positional input tensor.")
            value = fn(args[0])
            return None if value is None else (value, *args[1:])

        return module.register_forward_pre_hook(pre_hook)

    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        whole = torch.is_tensor(output)
        value = fn(output if whole else output[0])
        if value is None:
            return None
        return value if whole else (value, *output[1:])

    return module.register_forward_hook(hook)


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _module_names(model: nn.Module, limit: int = 40) -> str:
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 4]
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_LIST_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise UnsupportedModelError(
        f"Cannot find the decoder layers of {type(model).__name__}: tried "
        f"{', '.join(_LAYER_LIST_PATHS)}. Modules found: {_module_names(model)}. "
        "Add the path to dpnle.arch._LAYER_LIST_PATHS."
    )


def _layer_sites(index: int, layer: nn.Module, model_class: str) -> LayerSites:
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        children = ", ".join(n for n, _ in layer.named_children())
        raise UnsupportedModelError(
            f"{model_class}: decoder layer {index} ({type(layer).__name__}) has no 'mlp' module; "
            f"its children are: {children}."
        )
    for name in _OUTPUT_PROJECTIONS:
        proj = getattr(mlp, name, None)
        if isinstance(proj, nn.Module):
            break
    else:
        children = ", ".join(n for n, _ in mlp.named_children())
        raise UnsupportedModelError(
            f"{model_class}: the MLP of layer {index} ({type(mlp).__name__}) has none of the known "
            f"output projections ({', '.join(_OUTPUT_PROJECTIONS)}); its modules are: {children}."
        )
    activation = next(
        (getattr(mlp, a) for a in _ACTIVATIONS if isinstance(getattr(mlp, a, None), nn.Module)), None
    )
    gated = any(isinstance(getattr(mlp, g, None), nn.Module) for g in _GATE_PROJECTIONS)
    return LayerSites(index, layer, mlp, proj, name, activation, gated)


def architecture(model: nn.Module) -> Architecture:
    """Locate every site of ``model``; raises :class:`UnsupportedModelError` naming what was found."""
    model_class = type(model).__name__
    layers = find_decoder_layers(model)
    sites = [_layer_sites(i, layer, model_class) for i, layer in enumerate(layers)]
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    hidden = getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None)
    weight = sites[0].output_projection.weight
    if type(sites[0].output_projection).__name__ == "Conv1D":
        intermediate, hidden_from_weight = weight.shape
    else:
        hidden_from_weight, intermediate = weight.shape
    activations = [s.activation for s in sites if s.activation is not None]
    if len({id(a) for a in activations}) < len(activations):
        # A shared activation module would fire once per layer with no way to tell them apart.
        raise UnsupportedModelError(f"{model_class} shares one activation module across layers.")
    return Architecture(model_class, sites, int(hidden or hidden_from_weight), int(intermediate))


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """Parse a layer selection: ``None``/``all``, ``12-31``, ``0,4,8``, ``-4--1`` style negatives."""
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(range(num_layers))
    layers: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        bounds = _split_range(part)
        if bounds is None:
            idx = _layer_index(part, num_layers)
            layers.append(idx)
        else:
            lo, hi = (_layer_index(b, num_layers) for b in bounds)
            if hi < lo:
                raise ValueError(f"Empty layer range {part!r}: the end comes before the start.")
            layers.extend(range(lo, hi + 1))
    if not layers:
        raise ValueError(f"Layer selection {spec!r} selects no layer (the model has {num_layers}).")
    return sorted(set(layers))


def _split_range(part: str) -> tuple[str, str] | None:
    # "12-31", "-4--1", "3--1": split on the first '-' that follows a digit.
    for i in range(1, len(part)):
        if part[i] == "-" and part[i - 1].isdigit():
            return part[:i], part[i + 1 :]
    return None


def _layer_index(text: str, num_layers: int) -> int:
    try:
        idx = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a layer number") from None
    if idx < 0:
        idx += num_layers
    if not 0 <= idx < num_layers:
        raise ValueError(f"Layer {text} is out of range: the model has layers 0-{num_layers - 1}.")
    return idx
