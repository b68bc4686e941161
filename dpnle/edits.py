"""Edits: sparse additive changes to a model's neurons at inference time, and their export.

An :class:`Edit` holds, per decoder layer, the units it changes and by how much, plus gamma,
a sign and a position policy. ``with edit.apply(model): ...`` registers one hook per edited
layer and removes them all on the way out, whatever happens inside; the edited model is an
ordinary model in between, so any evaluator can run on it.

Sites (see :mod:`dpnle.arch`):

- ``mlp``: the input of the MLP's output projection (DPN-LE's neurons). A forward pre-hook on
  ``down_proj`` replaces its input ``h`` by ``h + gamma * sign * delta``.
- ``gate``: the output of the MLP's activation module (NPTI's site). A forward hook changes
  the activation before it is multiplied by ``up_proj(x)``; NPTI also clamps the opposite
  pole's neurons to ``min(a, 0)``. The clamp obeys the position policy like the addition
  (NPTI clamps in decode steps only, i.e. ``generated``).

Stochastic edits: ``Edit.keep < 1`` keeps each edited unit with probability ``keep``, drawn
afresh on every forward call of every layer that the position policy lets the edit change
(one Bernoulli draw per unit per call, shared by all rows and positions of the call), as
NPTI's published code does (``torch.rand(k) <= 0.9``). Each layer draws from its own
``torch.Generator`` seeded by :func:`keep_mask_seed` from ``(meta["keep_seed"],
meta["concept"], layer)`` and created at ``apply()``, so each ``apply()`` replays the same
stream. Such an edit has no fixed dense vector: :meth:`Edit.dense_vectors`, :func:`bake_edit`
and :func:`export_checkpoint` refuse it.
- ``resid``: the decoder layer's output (CAA's site). A forward hook adds a full hidden-size
  vector to the residual stream.

Orientation: every stored vector points toward *more* of the concept, and ``sign`` (+1 up,
-1 down) picks the direction. So a DPN-LE "both" edit stores ``delta = mean_high - mean_low``
on the HIGH and LOW neurons alike; with sign +1 it pushes HIGH neurons up and LOW neurons
further down, with sign -1 the reverse.

Position policy (the DPN-LE reference edits generated tokens only; dpnle makes it explicit,
because an edit restricted to generated tokens never touches a log-likelihood evaluation):

- ``all``: every position of every forward pass;
- ``prompt``: absolute positions ``< prompt_length`` (the prefill, pads included);
- ``generated``: absolute positions ``>= prompt_length``.

The absolute positions of a forward pass are read by a forward pre-hook on the module that
holds the decoder layers (``model.model`` for Llama), from inputs every supported transformers
version gives it, never from a keyword that upstream renames: the 2-D attention mask (it covers
the cached positions and the new ones), else each row's first position id, else the length of
whatever cache object the pass got, else 0; the sites add ``arange(seq_len)``. With the KV cache
on, a generation step sees one new position; with it off, it sees the whole sequence again and
only the new position counts as generated. Both give the same edited states. ``prompt_length``
is the padded prompt length (left padding); when not given, the first forward pass after
``apply()`` sets it to its sequence length (``generate()``'s prefill), so one handle serves one
prompt batch: use :func:`generate_with_edit`, or pass ``prompt_length``, or set
``handle.prompt_length``. The handle counts the prompt and generated positions it saw and
edited; :meth:`EditHandle.assert_fired` turns an edit that should have fired during a
``generate`` call and did not into an error.

Export: a linear edit at the down_proj input is a per-layer bias at its output,
``down(h + delta) = down(h) + W_down @ delta``, so an ``mlp`` edit at position policy ``all``
folds into the output projection's bias (:func:`bake_edit`) and can be saved as a standalone
checkpoint that plain ``transformers`` (or any server) loads (:func:`export_checkpoint`).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dpnle import __version__, vocab
from dpnle.arch import UnsupportedModelError, architecture, find_decoder_layers, register_site_hook
from dpnle.batching import add_special_tokens_for, input_device, left_pad, pad_token_id
from dpnle.concepts import cli_flag
from dpnle.models import LoadedModel
from dpnle.runs import (
    ArtifactError,
    InputError,
    Run,
    atomic_path,
    now,
    parquet_metadata,
    read_parquet,
    write_json,
)
from dpnle.vocab import (
    Direction,
    DpnleMethod,
    EditMethod,
    Mode,
    NptiMask,
    Position,
    Site,
    check_choice,
    check_gamma,
)

# The edit vocabulary (defined in dpnle.vocab).
EDIT_METHODS = vocab.EDIT_METHODS
# The random nulls of the DPN-LE edit: one condition per seed (edit-eval draws them N times).
RANDOM_METHODS = vocab.RANDOM_METHODS
# Methods the evaluator runs without hooks: build_edit returns None for them.
HOOKLESS_METHODS = vocab.HOOKLESS_METHODS
POSITIONS = vocab.POSITIONS
MODES = vocab.MODES
DIRECTIONS = vocab.DIRECTION_SIGNS  # {"up": 1, "down": -1}

# NPTI (Deng et al. 2025): a_i += gamma * v95_i * sigmoid(SLOPE * (dp_i - CENTRE)) (dp_i the
# pole-oriented delta_p) on a KEEP share of the target neurons.
NPTI_SLOPE = 10.0
NPTI_CENTRE = 0.15
NPTI_KEEP = 0.9
# How the KEEP share is drawn: "per-call" (NPTI's published code: a fresh Bernoulli(KEEP) mask on
# every forward call of every layer), "none" (DPN-LE's re-implementation: every target), "fixed"
# (one seeded subset of round(KEEP * k) targets per layer, drawn once).
NPTI_MASKS = vocab.NPTI_MASKS
NPTI_MASK_DEFAULT = vocab.NPTI_MASK_DEFAULT

EDIT_INFO_FILE = "dpnle_edit.json"
# Edit.save / Edit.load: a safetensors file whose header metadata says what it holds.
EDIT_FILE_FORMAT = "dpnle-edit"
EDIT_FILE_VERSION = 1
# The fingerprint fields an edit keeps of the model it was made for (apply() checks them).
MODEL_RECORD_KEYS = ("id", "digest", "num_layers", "intermediate_size", "hidden_size")

LayerVector = tuple[torch.Tensor | None, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# the edit


@dataclass
class Edit:
    """A sparse additive edit of one site of a model.

    ``vectors[layer] = (neuron_idx int64 [k], delta float32 [k])``; for the ``resid`` site
    ``neuron_idx`` may be None, meaning ``delta`` is the full ``[hidden]`` vector. The change
    at a layer is ``gamma * sign * delta`` at those units; ``clamp[layer]`` lists units whose
    value is clamped to ``<= 0`` first (NPTI's opposite-pole neurons). ``keep < 1`` makes the
    edit stochastic: on each forward call each layer keeps each of its edited units with
    probability ``keep`` (see the module docstring; the seed is ``meta["keep_seed"]``).
    """

    method: str
    site: Site
    vectors: dict[int, LayerVector]
    gamma: float = 1.0
    sign: int = 1
    positions: Position = "all"
    clamp: dict[int, torch.Tensor] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    keep: float = 1.0

    def __post_init__(self) -> None:
        check_choice("edit site", self.site, vocab.SITES)
        self.gamma = check_gamma(self.gamma)
        if self.sign not in (1, -1):
            raise InputError(f"sign must be +1 (raise the concept) or -1 (lower it), not {self.sign!r}.")
        check_choice("position policy", self.positions, POSITIONS)
        try:
            keep = float(self.keep)
        except (TypeError, ValueError):
            keep = math.nan
        if not 0.0 < keep <= 1.0:
            raise InputError(f"keep (the share of edited units kept per forward call) must be in (0, 1], not {self.keep!r}.")
        self.keep = keep
        self.vectors = {int(layer): _as_layer_vector(layer, idx, delta) for layer, (idx, delta) in self.vectors.items()}
        if self.stochastic and any(idx is None for idx, _ in self.vectors.values()):
            raise InputError("A per-call random keep (keep < 1) needs neuron indices; a full-width vector has none.")
        if self.clamp is not None:
            self.clamp = {int(layer): torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
                          for layer, idx in self.clamp.items()}  # fmt: skip

    @property
    def stochastic(self) -> bool:
        """True when a fresh random subset of the units is edited on each forward call."""
        return self.keep < 1.0

    @property
    def num_neurons(self) -> int:
        """Units that get an additive change (clamped-only units are in ``meta``)."""
        return sum(int(delta.numel()) for _, delta in self.vectors.values())

    @property
    def layers(self) -> list[int]:
        """Every layer the edit hooks: added-to or clamped."""
        return sorted(set(self.vectors) | set(self.clamp or {}))

    def neurons_per_layer(self) -> dict[int, int]:
        return {layer: int(delta.numel()) for layer, (_, delta) in sorted(self.vectors.items())}

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (no tensors) for manifests and evaluation rows."""
        return {
            "method": self.method,
            "site": self.site,
            "gamma": self.gamma,
            "sign": self.sign,
            "positions": self.positions,
            "keep": self.keep,
            "keep_draw": "fresh Bernoulli mask per forward call per layer" if self.stochastic else "none",
            "num_neurons": self.num_neurons,
            "num_clamped": sum(int(v.numel()) for v in (self.clamp or {}).values()),
            "layers": self.layers,
            **self.meta,
        }

    def dense_vectors(self, width: int) -> dict[int, torch.Tensor]:
        """``{layer: float32 [width]}`` of ``gamma * sign * delta``, zeros elsewhere.

        Refuses a stochastic edit (``keep < 1``): its change differs on every forward call, and
        baking the expected value would silently be another edit."""
        if self.stochastic:
            raise InputError(
                f"This {self.method} edit is stochastic (each forward call keeps a fresh random {self.keep:g} share "
                "of its neurons, as NPTI's code does), so it has no fixed vector to bake or export. Build it with "
                "npti_mask='fixed' (one seeded subset) or 'none' (every target) for a deterministic edit."
            )
        return self._dense(width)

    def _dense(self, width: int) -> dict[int, torch.Tensor]:
        dense: dict[int, torch.Tensor] = {}
        scale = self.gamma * self.sign
        for layer, (idx, delta) in self.vectors.items():
            if idx is None:
                if delta.numel() != width:
                    raise InputError(
                        f"The {self.method} vector of layer {layer} has {delta.numel()} units, the model's "
                        f"{self.site} site has {width}: the edit was made for another model."
                    )
                dense[layer] = delta.float() * scale
                continue
            if idx.numel() and (int(idx.max()) >= width or int(idx.min()) < 0):
                raise InputError(
                    f"The {self.method} edit of layer {layer} touches unit {int(idx.max())}, but the model's "
                    f"{self.site} site has {width} units: the edit was made for another model."
                )
            # index_add (not assignment) so a repeated index adds up instead of one value winning.
            dense[layer] = torch.zeros(width, dtype=torch.float32).index_add_(0, idx, delta.float()) * scale
        return dense

    # -- building and storing ------------------------------------------------------------------
    @classmethod
    def from_selection(
        cls,
        selection: pd.DataFrame,
        method: DpnleMethod = "dpnle",
        direction: Direction = "up",
        gamma: float = 1.0,
        mode: Mode = "both",
        positions: Position = "all",
        model: LoadedModel | nn.Module | Mapping[str, Any] | None = None,
        *,
        concept: str | None = None,
        layers: Sequence[int] | None = None,
    ) -> Edit:
        """The DPN-LE edit (``method`` "dpnle", or "dpnle-w" for the weighted variant) of a
        selection: the frame :func:`dpnle.localize.select_dpnle` returns (or its selected rows).

        ``direction`` "up" raises the concept, "down" lowers it; ``mode`` "both" edits HIGH and
        LOW neurons together, "directional" edits HIGH alone to raise and LOW alone to lower.
        ``model``: the model the edit is made for (a :class:`LoadedModel` or its fingerprint
        dict: id, digest and shape; a bare ``nn.Module``: its shape only), recorded in
        ``meta["model"]`` so that :meth:`apply` refuses another model; None records nothing.
        ``layers`` keeps only those layers. :func:`build_edit` makes its DPN-LE edits the same way.
        """
        method = method.strip().lower()
        if method not in vocab.DPNLE_METHODS:
            raise InputError(f"Edit.from_selection builds DPN-LE edits: method 'dpnle' or 'dpnle-w', not {method!r}.")
        sign = direction_sign(direction)
        _check_edit_args(mode, positions, gamma)
        vectors = selection_vectors(selection, direction, mode=mode, weighted=method == "dpnle-w")
        meta: dict[str, Any] = {} if concept is None else {"concept": concept}
        meta.update(direction=direction, mode=mode)
        what = "selection" if concept is None else f"selection of {concept!r}"
        return _edit_from_vectors(
            method, "mlp", vectors, gamma=gamma, sign=sign, positions=positions, meta=meta,
            made_for=_model_record(model), layers=layers, error=InputError,
            nothing=f"The {method} {what}",
            loosen="Loosen the selection (select_dpnle's quantile / d_threshold) or pick other layers.",
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the edit to ``path`` (safetensors; written atomically): per layer the unit
        indices and deltas, the clamp lists, and in the header's metadata the method, site,
        gamma, sign, positions, keep and ``meta`` (the model it was made for included) as JSON.
        :meth:`load` reads it back exactly."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for layer, (idx, delta) in sorted(self.vectors.items()):
            if idx is not None:
                tensors[f"vectors.{layer}.indices"] = idx.to(torch.int64).contiguous()
            tensors[f"vectors.{layer}.delta"] = delta.to(torch.float32).contiguous()
        for layer, idx in sorted((self.clamp or {}).items()):
            tensors[f"clamp.{layer}"] = idx.to(torch.int64).contiguous()
        header = {
            "method": self.method, "site": self.site, "gamma": self.gamma, "sign": self.sign,
            "positions": self.positions, "keep": self.keep, "layers": sorted(self.vectors),
            "full_width": sorted(layer for layer, (idx, _) in self.vectors.items() if idx is None),
            "clamp": None if self.clamp is None else sorted(self.clamp), "meta": self.meta,
        }
        metadata = {
            "format": EDIT_FILE_FORMAT, "format_version": str(EDIT_FILE_VERSION), "dpnle": __version__,
            "edit": json.dumps(header, default=_json_value),
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Edit:
        """An edit :meth:`save` wrote. A missing, corrupt or foreign file (another safetensors
        file, a newer format) is an :class:`ArtifactError` that says which."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"No saved edit at {path}: the file does not exist. Save one with Edit.save(path).")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types (and OSError, ValueError)
            raise ArtifactError(
                f"{path} is not a saved dpnle edit: it is not a readable safetensors file "
                f"({type(exc).__name__}: {exc}). Save the edit again with Edit.save(path)."
            ) from None
        if metadata.get("format") != EDIT_FILE_FORMAT:
            raise ArtifactError(
                f"{path} is a safetensors file but not a saved dpnle edit (its metadata says format "
                f"{metadata.get('format')!r}, not {EDIT_FILE_FORMAT!r})."
            )
        version = metadata.get("format_version", "")
        if not version.isdigit() or int(version) > EDIT_FILE_VERSION:
            raise ArtifactError(
                f"{path} is a dpnle edit of format version {version!r}, written by dpnle {metadata.get('dpnle')}; "
                f"this dpnle ({__version__}) reads version {EDIT_FILE_VERSION}. Upgrade dpnle to load it."
            )
        try:
            header = json.loads(metadata["edit"])
            full_width = {int(x) for x in header["full_width"]}
            vectors = {
                int(layer): (None if int(layer) in full_width else tensors.pop(f"vectors.{int(layer)}.indices"),
                             tensors.pop(f"vectors.{int(layer)}.delta"))
                for layer in header["layers"]
            }
            clamp = None
            if header["clamp"] is not None:
                clamp = {int(layer): tensors.pop(f"clamp.{int(layer)}") for layer in header["clamp"]}
            if tensors:
                raise ValueError(f"tensors no layer of the header names: {sorted(tensors)}")
            meta = dict(header["meta"])
            if isinstance(meta.get("neurons_per_layer"), dict):  # JSON keys are strings; layers are ints
                meta["neurons_per_layer"] = {int(k): v for k, v in meta["neurons_per_layer"].items()}
            return cls(method=header["method"], site=header["site"], vectors=vectors, gamma=header["gamma"],
                       sign=header["sign"], positions=header["positions"], clamp=clamp, meta=meta,
                       keep=header["keep"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # InputError is a ValueError
            raise ArtifactError(
                f"{path} is a damaged dpnle edit ({type(exc).__name__}: {exc}). Save the edit again with Edit.save(path)."
            ) from None

    def apply(self, model: nn.Module | LoadedModel, prompt_length: int | None = None) -> EditHandle:
        """Register the edit's hooks on ``model``; use as ``with edit.apply(model): ...``.

        An edit that records the model it was made for (``meta["model"]``, as :func:`build_edit`
        writes it) refuses a model of another shape, and, given a :class:`LoadedModel`, one whose
        fingerprint digest differs: indices that happen to fit another model are not an edit of it.
        """
        made_for = self.meta.get("model") or {}
        if isinstance(model, LoadedModel):
            digest = (model.fingerprint or {}).get("digest")
            if made_for.get("digest") and digest and digest != made_for["digest"]:
                raise InputError(
                    f"This {self.method} edit was made for model {made_for.get('id')!r} (digest {made_for['digest']}), "
                    f"not {model.model_id!r} (digest {digest}): build it from a run of this model."
                )
            model = model.model
        _check_shape(self, model, made_for)
        return _register(self, model, prompt_length)


def _check_shape(edit: Edit, model: nn.Module, made_for: Mapping[str, Any]) -> None:
    """Refuse a model whose layer count or site width differs from the one the edit names."""
    if not made_for:
        return
    arch = architecture(model)
    width_key = "hidden_size" if edit.site == "resid" else "intermediate_size"
    theirs = {"num_layers": arch.num_layers, width_key: arch.width(edit.site)}
    differs = {k: (made_for[k], v) for k, v in theirs.items() if k in made_for and int(made_for[k]) != int(v)}
    if differs:
        detail = ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in differs.items())
        raise InputError(
            f"This {edit.method} edit was made for model {made_for.get('id')!r}, whose shape differs from "
            f"{type(model).__name__}'s ({detail}): build it from a run of this model."
        )


def _as_layer_vector(layer: int, idx: Any, delta: Any) -> LayerVector:
    delta_t = torch.as_tensor(np.asarray(delta) if not torch.is_tensor(delta) else delta, dtype=torch.float32)
    delta_t = delta_t.reshape(-1)
    if not bool(torch.isfinite(delta_t).all()):
        raise InputError(f"The edit vector of layer {layer} holds NaN or inf values; re-run localize.")
    if idx is None:
        return None, delta_t
    idx_t = torch.as_tensor(np.asarray(idx) if not torch.is_tensor(idx) else idx, dtype=torch.int64).reshape(-1)
    if idx_t.shape != delta_t.shape:
        raise InputError(f"Layer {layer}: {idx_t.numel()} neuron indices but {delta_t.numel()} deltas.")
    return idx_t, delta_t


# ---------------------------------------------------------------------------------------------
# hooks


class _PositionTracker:
    """Absolute positions of the current forward pass, read on the decoder stack's parent.

    A forward pre-hook on the module that holds the decoder layers reads, for each row, the
    absolute (padded) position of the pass's first token from inputs every transformers version
    gives its decoder stack, whatever it calls its cache (see :func:`_first_positions`); the
    hooked sites add ``arange(seq_len)``. The tracker also counts the prompt and generated
    token positions it saw, and those the edit changed, for :meth:`EditHandle.assert_fired`.
    """

    def __init__(self, prompt_length: int | None, policy: str, stack: nn.Module):
        self.prompt_length = prompt_length
        self.policy = policy
        self.start: torch.Tensor | None = None  # long [rows] (or [1]): absolute position of token 0
        self.seen = {"prompt": 0, "generated": 0}
        self.edited = {"prompt": 0, "generated": 0}
        self._pass = {"prompt": 0, "generated": 0}
        self._fired = False
        self._masks: dict[tuple[int, torch.device], torch.Tensor | bool] = {}
        try:
            self._signature: inspect.Signature | None = inspect.signature(stack.forward)
        except (TypeError, ValueError):
            self._signature = None

    def _inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The stack's inputs by parameter name, however the caller passed them."""
        if self._signature is not None:
            try:
                bound = self._signature.bind_partial(*args, **kwargs)
            except TypeError:
                pass
            else:
                named = dict(bound.arguments)
                for name, param in self._signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        named.update(named.pop(name, {}))
                return named
        return {**({"input_ids": args[0]} if args else {}), **kwargs}

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._masks.clear()
        self._fired = False
        inputs = self._inputs(args, kwargs)
        shape = _input_shape(inputs)
        if shape is None:
            self.start = None
            self._pass = {"prompt": 0, "generated": 0}
            return
        rows, seq_len = shape
        self.start = _first_positions(inputs, seq_len)
        if self.prompt_length is None:
            # The first forward pass after apply() is the prefill of generate().
            self.prompt_length = int(self.start.max()) + seq_len
        positions = self.start[:, None] + torch.arange(seq_len)  # [rows or 1, seq]
        prompt = int((positions < self.prompt_length).sum()) * (rows // positions.shape[0])
        self._pass = {"prompt": prompt, "generated": rows * seq_len - prompt}
        for kind, n in self._pass.items():
            self.seen[kind] += n

    def post_hook(self, *_: Any) -> None:
        if self._fired:
            for kind, n in self._pass.items():
                if self.policy in ("all", kind):
                    self.edited[kind] += n
        self.start = None
        self._fired = False
        self._masks.clear()

    def note_fired(self) -> None:
        self._fired = True

    def mask(self, seq_len: int, device: torch.device) -> torch.Tensor | bool:
        """Which positions to edit: True (all), False (none), or bool [seq, 1] / [rows, seq, 1]
        that broadcasts against ``[rows, seq, width]``."""
        if self.start is None:
            raise RuntimeError(
                f"The edit's position policy {self.policy!r} needs the positions of the forward pass, but the "
                "decoder stack's forward pre-hook did not run: call the whole model (or its base model), "
                "not a single layer, or use positions='all'."
            )
        key = (seq_len, device)
        cached = self._masks.get(key)
        if cached is not None:
            return cached
        assert self.prompt_length is not None
        positions = self.start[:, None] + torch.arange(seq_len)
        keep = positions < self.prompt_length if self.policy == "prompt" else positions >= self.prompt_length
        # Decide "every position" / "none" on the CPU, so those common cases (a prefill or a
        # decoding step) cost no device transfer and no masked add.
        result: torch.Tensor | bool
        if bool(keep.all()):
            result = True
        elif not bool(keep.any()):
            result = False
        else:
            result = (keep[0] if keep.shape[0] == 1 else keep).unsqueeze(-1).to(device)
        self._masks[key] = result
        return result


def _first_positions(inputs: Mapping[str, Any], seq_len: int) -> torch.Tensor:
    """Absolute position of the first token of a forward pass, long [rows] or [1] on the CPU.

    In order of trust, from what every supported transformers version hands its decoder stack:

    1. a 2-D ``attention_mask`` covers the cached positions and the new ones, so the pass starts
       at ``mask.shape[1] - seq_len`` in every row (left padding keeps rows aligned);
    2. ``position_ids`` (no mask: no padding), the first one of each row;
    3. the length of whatever cache object the pass was given (``cache``, ``past_key_values``:
       the keyword was renamed in transformers 5.24), or ``cache_position``;
    4. else 0: a pass without a cache starts at the beginning.
    """
    mask = inputs.get("attention_mask")
    if torch.is_tensor(mask) and mask.ndim == 2 and mask.shape[1] >= seq_len:
        return torch.tensor([mask.shape[1] - seq_len])
    position_ids = inputs.get("position_ids")
    if torch.is_tensor(position_ids) and position_ids.numel():
        if position_ids.ndim == 3:  # multimodal rotary: [sections, rows, seq]
            position_ids = position_ids[0]
        return position_ids.reshape(-1, position_ids.shape[-1])[:, 0].detach().to("cpu", torch.long)
    for value in inputs.values():
        if value is not None and callable(getattr(value, "get_seq_length", None)):
            return torch.tensor([int(value.get_seq_length())])
    cache_position = inputs.get("cache_position")
    if torch.is_tensor(cache_position) and cache_position.numel():
        return torch.tensor([int(cache_position.reshape(-1)[0])])
    return torch.tensor([0])


def _input_shape(inputs: Mapping[str, Any]) -> tuple[int, int] | None:
    """(rows, seq_len) of a forward pass, from its token ids or embeddings."""
    for name in ("input_ids", "inputs_embeds", "hidden_states"):
        candidate = inputs.get(name)
        if torch.is_tensor(candidate):
            # input_ids [rows, seq]; inputs_embeds [rows, seq, hidden]
            return (int(candidate.shape[0]), int(candidate.shape[1])) if candidate.ndim >= 2 else (1, int(candidate.shape[0]))
    return None


def _decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (``model.model``, ``model.transformer``, ...)."""
    layers = find_decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    name = names.get(id(layers), "")
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return model.get_submodule(parent) if parent else model


def _module_device_dtype(*modules: nn.Module) -> tuple[torch.device, torch.dtype]:
    for module in modules:
        param = next(module.parameters(), None)
        if param is not None and param.device.type != "meta":
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


class _KeepMask:
    """A stochastic edit's per-call draw for one layer: which of its ``k`` units to add to.

    ``units`` (long [k]) and ``values`` (float32 [k], gamma and sign included) live on the
    module's device; each call draws ``torch.rand(k, generator=self.generator) <= keep`` on the
    CPU (NPTI's ``torch.rand(len(values)) <= 0.9``) and scatters the kept values into a
    ``[width]`` vector. ``draws`` counts the calls that drew.
    """

    def __init__(self, units: torch.Tensor, values: torch.Tensor, width: int, keep: float, seed: int):
        self.units = units
        self.values = values
        self.width = width
        self.keep = keep
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def __call__(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        mask = torch.rand(self.units.numel(), generator=self.generator) <= self.keep
        self.draws += 1
        mask = mask.to(self.units.device)
        add = torch.zeros(self.width, dtype=torch.float32, device=self.units.device)
        add.index_add_(0, self.units[mask], self.values[mask])
        return add.to(device=device, dtype=dtype)


class _LayerEditor:
    """Applies one layer's change to a ``[..., seq, width]`` tensor, vectorized over units."""

    def __init__(self, add: torch.Tensor | None, clamp: torch.Tensor | None, policy: str, tracker: _PositionTracker,
                 keep_mask: _KeepMask | None = None):
        self.add = add  # [width] in the module's dtype, gamma and sign included
        self.clamp = clamp  # bool [width]
        self.policy = policy
        self.tracker = tracker
        self.keep_mask = keep_mask  # stochastic edits: a fresh add vector per call instead of ``add``
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def _on(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        key = (hidden.device, hidden.dtype)
        found = self._cast.get(key)
        if found is None:
            # Precomputed on the module's weight device; recast once if the activations live
            # elsewhere (offloading, autocast).
            add = None if self.add is None else self.add.to(device=hidden.device, dtype=hidden.dtype)
            clamp = None if self.clamp is None else self.clamp.to(device=hidden.device)
            found = self._cast[key] = (add, clamp)
        return found

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        add, clamp = self._on(hidden)
        keep: torch.Tensor | bool = True
        if self.policy != "all":
            keep = self.tracker.mask(int(hidden.shape[-2]), hidden.device)
            if keep is False:
                return hidden
        self.tracker.note_fired()
        if self.keep_mask is not None:
            # One draw per forward call, after the position policy let the call through (NPTI
            # draws in decode steps only), shared by every row and position of the call.
            add = self.keep_mask(hidden.device, hidden.dtype)
        out = hidden
        if clamp is not None:
            clamped = torch.where(clamp, hidden.clamp_max(0), hidden)
            out = clamped if keep is True else torch.where(keep, clamped, hidden)
        if add is not None:
            # keep [seq, 1] or [rows, seq, 1] broadcasts over rows and units.
            out = out + (add if keep is True else add * keep.to(add.dtype))
        return out


class EditHandle:
    """The hooks of one applied edit. A context manager: hooks go away in ``__exit__``.

    ``calls`` counts each hooked layer's calls; ``positions_seen`` and ``positions_edited``
    count the prompt and generated token positions (rows x positions) that went through the
    model and that the edit changed, since ``apply()``.
    """

    def __init__(self, edit: Edit, tracker: _PositionTracker):
        self.edit = edit
        self._tracker = tracker
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.calls: dict[int, int] = {layer: 0 for layer in edit.layers}
        self.keep_masks: dict[int, _KeepMask | None] = {}  # stochastic edits: each layer's draws

    @property
    def mask_draws(self) -> dict[int, int]:
        """Per layer of a stochastic edit, the forward calls that drew a fresh keep-mask."""
        return {layer: m.draws for layer, m in self.keep_masks.items() if m is not None}

    @property
    def prompt_length(self) -> int | None:
        return self._tracker.prompt_length

    @prompt_length.setter
    def prompt_length(self, value: int | None) -> None:
        self._tracker.prompt_length = value

    @property
    def positions_seen(self) -> dict[str, int]:
        return dict(self._tracker.seen)

    @property
    def positions_edited(self) -> dict[str, int]:
        return dict(self._tracker.edited)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        while self._hooks:
            self._hooks.pop().remove()

    def assert_fired(self, new_tokens: int | None = None, rows: int = 1) -> None:
        """Raise unless the edit did what its position policy asks of the passes made so far.

        Always: every hooked layer ran. After a ``generate`` call that returned ``new_tokens``
        new tokens for each of ``rows`` rows, also: the model was fed at least
        ``(new_tokens - 1) * rows`` generated positions (the last token is never fed back), and
        the edit changed prompt positions (policies ``all``, ``prompt``) and generated ones
        (``all``, ``generated``) wherever there were some. An edit that should have fired and
        did not is an error, never a silent no-op.
        """
        silent = [layer for layer, n in self.calls.items() if n == 0]
        if silent:
            raise RuntimeError(
                f"The {self.edit.method} edit's hooks on layer(s) {silent} never ran: the model did not "
                "execute those modules (was the forward pass made on another model object?)."
            )
        if new_tokens is None:
            return
        seen, edited = self._tracker.seen, self._tracker.edited
        policy = self.edit.positions
        fed = max(int(new_tokens) - 1, 0) * int(rows)
        missing = []
        if seen["generated"] < fed:
            missing.append(f"generate fed {fed} generated positions, the edit saw {seen['generated']}")
        for kind in ("prompt", "generated"):
            if policy in ("all", kind) and seen[kind] > 0 and edited[kind] == 0:
                missing.append(f"no {kind} position was edited")
        if missing:
            raise RuntimeError(
                f"The {self.edit.method} edit (positions={policy!r}, gamma {self.edit.gamma:g}) did not fire as its "
                f"policy requires during generate ({'; '.join(missing)}): it saw {seen['prompt']} prompt and "
                f"{seen['generated']} generated token positions and edited {edited['prompt']} and "
                f"{edited['generated']}, for {new_tokens} new tokens x {rows} rows. The decoder stack's inputs "
                "did not reveal the positions (attention_mask, position_ids or cache): this transformers "
                "version is not supported; see the README's tested range."
            )

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"EditHandle({self.edit.method}, {len(self.calls)} layers, {state}, calls={self.calls}, "
                f"seen={self.positions_seen}, edited={self.positions_edited})")


def _register(edit: Edit, model: nn.Module, prompt_length: int | None) -> EditHandle:
    arch = architecture(model)
    width = arch.width(edit.site)
    bad = [layer for layer in edit.layers if not 0 <= layer < arch.num_layers]
    if bad:
        raise InputError(
            f"The {edit.method} edit touches layer(s) {bad}, but {arch.model_class} has layers "
            f"0-{arch.num_layers - 1}: the edit was made for another model."
        )
    dense = edit._dense(width)
    stack = _decoder_stack(model)
    tracker = _PositionTracker(prompt_length, edit.positions, stack)
    handle = EditHandle(edit, tracker)
    try:
        handle._hooks.append(stack.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        # always_call: a forward that raises must not leave stale positions behind.
        handle._hooks.append(stack.register_forward_hook(tracker.post_hook, always_call=True))
        for layer in edit.layers:
            sites = arch.layers[layer]
            module = arch.module_for(edit.site, layer)
            device, dtype = _module_device_dtype(module, sites.mlp, sites.layer)
            add = dense[layer].to(device=device, dtype=dtype) if layer in dense else None
            keep_mask = None
            if edit.stochastic and layer in edit.vectors:
                units, values = edit.vectors[layer]
                seed = keep_mask_seed(int(edit.meta.get("keep_seed", 0)), str(edit.meta.get("concept", "")), layer)
                keep_mask = _KeepMask(units.to(device), (values.float() * edit.gamma * edit.sign).to(device),
                                      width, edit.keep, seed)
                add = None
            clamp = None
            if edit.clamp and layer in edit.clamp and edit.clamp[layer].numel():
                idx = edit.clamp[layer]
                if int(idx.max()) >= width:
                    raise InputError(f"Clamped unit {int(idx.max())} of layer {layer} is beyond the site's {width} units.")
                clamp = torch.zeros(width, dtype=torch.bool).index_fill_(0, idx, True).to(device)
            editor = _LayerEditor(add, clamp, edit.positions, tracker, keep_mask)
            handle.keep_masks[layer] = keep_mask
            handle._hooks.append(register_site_hook(arch, edit.site, layer, _counted(editor, handle.calls, layer)))
    except BaseException:
        handle.remove()
        raise
    return handle


def _counted(editor: _LayerEditor, calls: dict[int, int], layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``editor`` as the function of :func:`dpnle.arch.register_site_hook`, counting its calls in
    ``calls[layer]`` (:meth:`EditHandle.assert_fired` reads them)."""

    def edit_site(hidden: torch.Tensor) -> torch.Tensor:
        calls[layer] += 1
        return editor(hidden)

    return edit_site


def generate_with_edit(
    model: nn.Module | LoadedModel,
    inputs: Mapping[str, torch.Tensor] | torch.Tensor | str | Sequence[str],
    edit: Edit | None,
    tokenizer: Any = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` under ``edit`` (None: no edit), prompt length = the padded input length.

    ``inputs``: a tokenizer output (``input_ids`` [batch, seq], ``attention_mask``), a tensor of
    ids, or prompt text(s) with ``tokenizer`` given (encoded as dpnle encodes rendered prompts:
    no second BOS after a chat template's; left padding). Returns the generated ids
    ``[batch, seq + new]``.
    """
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    if isinstance(inputs, (str, list, tuple)):
        if tokenizer is None:
            raise ValueError("generate_with_edit needs a tokenizer to encode prompt text.")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        rows = tokenizer(texts, add_special_tokens=add_special_tokens_for(tokenizer))["input_ids"]
        input_ids, attention_mask = left_pad(rows, pad_token_id(tokenizer))
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if torch.is_tensor(inputs):
        inputs = {"input_ids": inputs}
    device = input_device(model)  # the embeddings' device: right under a device map too
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None and input_ids.shape[0] > 1 and not bool(mask[:, -1].all()):
        raise ValueError(
            "The batch is right-padded: generated positions would start at different places per row. "
            "Encode with tokenizer.padding_side = 'left'."
        )
    if tokenizer is not None and "pad_token_id" not in generate_kwargs and tokenizer.pad_token_id is not None:
        generate_kwargs["pad_token_id"] = tokenizer.pad_token_id
    with torch.no_grad():
        if edit is None:
            return model.generate(**inputs, **generate_kwargs)
        with edit.apply(model, prompt_length=int(input_ids.shape[1])) as handle:
            out = model.generate(**inputs, **generate_kwargs)
            handle.assert_fired(new_tokens=int(out.shape[1] - input_ids.shape[1]), rows=int(out.shape[0]))
        return out


# ---------------------------------------------------------------------------------------------
# building edits from a run


def build_edit(
    run: Run | str | os.PathLike,
    concept: str,
    method: EditMethod,
    direction: Direction = "up",
    gamma: float = 1.0,
    mode: Mode = "both",
    positions: Position = "all",
    seed: int = 0,
    layers: Sequence[int] | None = None,
    npti_mask: NptiMask = NPTI_MASK_DEFAULT,
) -> Edit | None:
    """The edit of ``method`` for ``concept`` from a run's localization; None for prompt / none.

    - ``dpnle``: delta = mean_high - mean_low on the selected neurons. ``mode="both"`` edits
      HIGH and LOW together (sign +1 up, -1 down); ``mode="directional"`` edits HIGH alone to
      raise (sign +1) and LOW alone to lower (sign -1), as the reference's directional mode
      (its IPIP protocol) does.
    - ``dpnle-w``: the same, delta times the DPN-LE_w weight (ranked over the edited set).
    - ``random``: the size-matched control (see :func:`random_control_vectors`).
    - ``random-mag``: the magnitude-only null: as many neurons per layer, drawn from those that
      pass DPN-LE's |delta| quantile cut alone, edited with their own deltas by the DPN-LE rule
      (see :func:`magnitude_null_vectors`).
    - ``npti``: gate site; see :func:`npti_vectors`. ``npti_mask`` (``per-call``, the default:
      NPTI's fresh Bernoulli(0.9) keep-mask per forward call, seeded by ``seed``; ``none``;
      ``fixed``) picks how the kept share of the targets is drawn.
    - ``caa``: the residual mean difference at the chosen layer.
    """
    method = check_choice("edit method", method.strip().lower(), EDIT_METHODS)
    if method in HOOKLESS_METHODS:
        return None
    sign = direction_sign(direction)
    _check_edit_args(mode, positions, gamma)
    run = run if isinstance(run, Run) else Run.open(run)
    meta: dict[str, Any] = {"concept": concept, "direction": direction, "mode": mode, "seed": seed, "run": run.name}
    clamp = None
    keep = 1.0
    if method in vocab.DPNLE_METHODS:
        vectors = dpnle_vectors(run, concept, direction, mode=mode, weighted=method == "dpnle-w")
        site = "mlp"
    elif method == "random":
        vectors = random_control_vectors(run, concept, direction, mode=mode, seed=seed)
        site = "mlp"
    elif method == "random-mag":
        frame, quantile = magnitude_frame(run, concept)
        drawn = magnitude_null_selection(frame, quantile, direction, mode=mode, seed=seed, concept=concept)
        vectors = selection_vectors(drawn, direction, mode=mode)
        meta.update(null="magnitude-only", quantile=quantile)
        site = "mlp"
    elif method == "npti":
        vectors, clamp, npti_meta = npti_vectors(run, concept, direction, seed=seed, npti_mask=npti_mask)
        keep = float(npti_meta.pop("keep"))
        meta.update(npti_meta)
        if keep < 1.0:
            meta["keep_seed"] = int(seed)  # the per-call masks' generators: keep_mask_seed(seed, concept, layer)
        site = "gate"
    else:
        vectors, caa_layer = caa_vectors(run, concept)
        meta["caa_layer"] = caa_layer
        site = "resid"
    # The model the edit was made for: apply() refuses a model of another shape or digest.
    fingerprint = (run.manifest().get("model") or {}).get("fingerprint") or {}
    return _edit_from_vectors(
        method, site, vectors, gamma=gamma, sign=sign, positions=positions, meta=meta,
        made_for=_model_record(fingerprint), clamp=clamp, keep=keep, layers=layers, error=ArtifactError,
        nothing=f"The {method} localization of {concept!r} in run {run.name}",
        loosen="Loosen the selection (dpnle localize --quantile / --d-threshold) or pick other layers.",
    )


def _json_value(obj: Any) -> Any:
    """JSON for the numpy scalars, sets and paths an edit's meta may hold (Edit.save)."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"An edit's meta holds a {type(obj).__name__}, which cannot be saved as JSON.")


def _check_edit_args(mode: Mode, positions: Position, gamma: float) -> None:
    check_choice("edit mode", mode, MODES)
    check_choice("position policy", positions, POSITIONS)
    check_gamma(gamma)


def _model_record(model: LoadedModel | nn.Module | Mapping[str, Any] | None) -> dict[str, Any]:
    """What an edit keeps of the model it is made for (:data:`MODEL_RECORD_KEYS`): from a
    LoadedModel's fingerprint or a fingerprint dict; a bare module gives its shape only."""
    if model is None:
        return {}
    if isinstance(model, LoadedModel):
        model = model.fingerprint or {}
    if isinstance(model, nn.Module):
        arch = architecture(model)
        return {"num_layers": arch.num_layers, "intermediate_size": arch.intermediate_size,
                "hidden_size": arch.hidden_size}
    return {k: model[k] for k in MODEL_RECORD_KEYS if k in model}


def _edit_from_vectors(
    method: str, site: str, vectors: Mapping[int, tuple[Any, Any]], *, gamma: float, sign: int, positions: str,
    meta: dict[str, Any], made_for: dict[str, Any], clamp: Mapping[int, Any] | None = None, keep: float = 1.0,
    layers: Sequence[int] | None = None, error: type[Exception], nothing: str, loosen: str,
) -> Edit:
    """The one place an :class:`Edit` is assembled from per-layer vectors (:func:`build_edit`,
    :meth:`Edit.from_selection`): keep ``layers``, refuse an edit of no neuron (``error``,
    ``nothing`` naming the source), record the neurons per layer and the model made for."""
    vectors = dict(vectors)
    if layers is not None:
        wanted = {int(x) for x in layers}
        vectors = {k: v for k, v in vectors.items() if k in wanted}
        clamp = None if clamp is None else {k: v for k, v in clamp.items() if k in wanted}
    if not vectors or not any(delta.size for _, delta in vectors.values()):
        scope = f" in layers {sorted(int(x) for x in layers)}" if layers is not None else ""
        raise error(
            f"{nothing} gives no neuron to edit{scope} (direction {meta['direction']}, mode {meta['mode']}). {loosen}"
        )
    meta["neurons_per_layer"] = {int(k): int(v[1].size) for k, v in sorted(vectors.items())}
    meta["model"] = made_for
    return Edit(method=method, site=site, vectors=vectors, gamma=float(gamma), sign=sign,
                positions=positions, clamp=None if clamp is None else dict(clamp), meta=meta, keep=keep)  # fmt: skip


def direction_sign(direction: Direction) -> int:
    """+1 for "up" (raise the concept), -1 for "down"."""
    return DIRECTIONS[check_choice("direction", direction, DIRECTIONS)]


def _selection(run: Run, concept: str, method: str) -> pd.DataFrame:
    from dpnle.localize import load_selection

    return load_selection(run, concept, method)


NumpyVectors = dict[int, tuple[np.ndarray, np.ndarray]]


def dpnle_vectors(
    run: Run, concept: str, direction: Direction, mode: Mode = "both", weighted: bool = False
) -> NumpyVectors:
    """The DPN-LE neurons and deltas the edit of ``direction`` in ``mode`` touches, per layer."""
    return selection_vectors(_selection(run, concept, "dpnle"), direction, mode=mode, weighted=weighted)


def selection_vectors(
    selection: pd.DataFrame, direction: Direction, mode: Mode = "both", weighted: bool = False
) -> NumpyVectors:
    """Per layer, the neurons (int64, ascending) and deltas (float32) a DPN-LE edit of
    ``direction`` in ``mode`` touches, from a selection (:func:`dpnle.localize.select_dpnle`'s
    frame or its selected rows); ``weighted`` for DPN-LE_w."""
    from dpnle.localize import edit_vectors

    poles = edit_vectors(selection, weighted=weighted, mode=mode)
    if mode == "directional":
        return dict(poles["high" if direction_sign(direction) > 0 else "low"])
    merged: NumpyVectors = {}
    for layer in sorted(set(poles["high"]) | set(poles["low"])):
        parts = [poles[p][layer] for p in ("high", "low") if layer in poles[p]]
        idx = np.concatenate([p[0] for p in parts]).astype(np.int64)
        delta = np.concatenate([p[1] for p in parts]).astype(np.float32)
        order = np.argsort(idx, kind="stable")
        merged[layer] = (idx[order], delta[order])
    return merged


def keep_mask_seed(seed: int, concept: str, layer: int) -> int:
    """The seed of layer ``layer``'s ``torch.Generator`` for a stochastic edit's per-call masks,
    from ``(seed, concept, layer)`` (crc32 of the concept: stable across processes)."""
    state = np.random.SeedSequence([int(seed), zlib.crc32(concept.encode()), int(layer), zlib.crc32(b"npti-mask")])
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _seeded_rng(seed: int, concept: str, layer: int, stream: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, and draws must repeat across runs.
    return np.random.default_rng([int(seed), zlib.crc32(concept.encode()), int(layer), zlib.crc32(stream.encode())])


def _layer_widths(run: Run, concept: str) -> dict[int, int]:
    """Units per layer of the DPN-LE site, from the run's model record or the neurons file."""
    frame = read_parquet(run.neurons_path(concept, "dpnle"), columns=["layer", "neuron"])
    model = run.manifest().get("model") or {}
    recorded = model.get("intermediate_size") or (model.get("fingerprint") or {}).get("intermediate_size")
    grouped = frame.groupby("layer")["neuron"].agg(["count", "max"])
    # localize writes one row per neuron of each chosen layer, so the row count is the width.
    return {int(layer): int(max(recorded or 0, row["count"], row["max"] + 1)) for layer, row in grouped.iterrows()}


def random_control_vectors(
    run: Run, concept: str, direction: Direction, mode: Mode = "both", seed: int = 0
) -> NumpyVectors:
    """The size-matched random control of the DPN-LE edit (``direction``, ``mode``).

    Per layer: as many neurons as the DPN-LE edit touches there, drawn uniformly without
    replacement from the layer's neurons outside the DPN-LE selection (HIGH and LOW, so the
    control never touches a selected neuron); deltas with the DPN-LE edit's |delta| values of
    that layer in a random order, each with a random sign. The draw depends on (seed, concept,
    layer) only, so the "up" and "down" controls of mode "both" are the same neurons with
    opposite sign, like the DPN-LE edits they control.
    """
    target = dpnle_vectors(run, concept, direction, mode=mode, weighted=False)
    selection = _selection(run, concept, "dpnle")
    widths = _layer_widths(run, concept)
    selected_by_layer = {int(k): g["neuron"].to_numpy(np.int64) for k, g in selection.groupby("layer")}
    vectors: NumpyVectors = {}
    for layer, (idx, delta) in sorted(target.items()):
        k = int(idx.size)
        pool = np.setdiff1d(np.arange(widths[layer], dtype=np.int64), selected_by_layer.get(layer, idx))
        if pool.size < k:
            raise ArtifactError(
                f"Layer {layer} has only {pool.size} unselected neurons, fewer than the {k} the random "
                "control needs."
            )
        rng = _seeded_rng(seed, concept, layer, "random")
        chosen = np.sort(rng.choice(pool, size=k, replace=False))
        magnitudes = rng.permutation(np.abs(delta.astype(np.float32)))
        signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=k)
        vectors[layer] = (chosen, (magnitudes * signs).astype(np.float32))
    return vectors


def magnitude_frame(run: Run, concept: str) -> tuple[pd.DataFrame, float]:
    """The DPN-LE neurons file of ``concept`` (every neuron of the chosen layers: layer, neuron,
    delta, selected, pole) and the quantile its magnitude criterion used (the localize stage's
    ``parameters.quantile`` in the file's metadata). Checked like every DPN-LE edit's source
    (:func:`dpnle.localize.load_selection`: the run's model, the capture's pairs)."""
    _selection(run, concept, "dpnle")  # refuses a missing, unreadable or foreign neurons file
    path = run.neurons_path(concept, "dpnle")
    command = f"dpnle localize --run {run.name} {cli_flag(concept)}"
    quantile = (parquet_metadata(path).get("parameters") or {}).get("quantile")
    try:
        q = float(quantile)
    except (TypeError, ValueError):
        q = math.nan
    if not 0.0 < q < 1.0:
        raise ArtifactError(
            f"{path} does not record the |delta| quantile its selection used (metadata parameters.quantile is "
            f"{quantile!r}), so the magnitude-only null (random-mag) cannot rebuild the magnitude criterion. "
            f"Run `{command}` again."
        )
    frame = read_parquet(path)
    missing = {"layer", "neuron", "delta", "selected", "pole"} - set(frame.columns)
    if missing:
        raise ArtifactError(f"{path} lacks columns {sorted(missing)}, which random-mag needs. Run `{command}` again.")
    return frame, q


def magnitude_passers(frame: pd.DataFrame, quantile: float) -> np.ndarray:
    """bool per row of a DPN-LE neurons frame: ``|delta| > quantile(|delta| of its layer, q)``,
    DPN-LE's magnitude criterion alone, computed as :func:`dpnle.localize.select_dpnle` does
    (numpy's default linear interpolation over every neuron of the layer; strict)."""
    layer = frame["layer"].to_numpy(dtype=np.int64)
    abs_delta = np.abs(frame["delta"].to_numpy(dtype=np.float64))
    passes = np.zeros(len(frame), dtype=bool)
    for value in np.unique(layer):
        rows = layer == value
        passes[rows] = abs_delta[rows] > np.quantile(abs_delta[rows], quantile)
    return passes


def magnitude_null_selection(
    frame: pd.DataFrame, quantile: float, direction: Direction, mode: Mode = "both", seed: int = 0, concept: str = ""
) -> pd.DataFrame:
    """One draw of the magnitude-only null of the DPN-LE edit (``direction``, ``mode``), as a
    selection frame (layer, neuron, delta, cohens_d, selected, pole) of the drawn neurons alone.

    ``frame``: a DPN-LE neurons frame with every neuron of the chosen layers (what
    :func:`dpnle.localize.select_dpnle` returns) and ``quantile`` its |delta| quantile. Per layer
    the DPN-LE edit touches, as many neurons as it touches there are drawn uniformly without
    replacement from the layer's magnitude passers (:func:`magnitude_passers`), selected by DPN-LE
    or not; in mode "directional" only from those whose delta has the edited pole's sign (delta > 0
    to raise, HIGH; delta < 0 to lower, LOW). Each drawn neuron keeps its own delta and gets the
    pole of its sign, so :func:`selection_vectors` edits them by DPN-LE's rule: the edit DPN-LE
    would make had it chosen them by magnitude alone. The draw depends on (seed, concept, layer)
    only (stream ``random-mag``): the same seed gives the same neurons.
    """
    sign = direction_sign(direction)
    check_choice("edit mode", mode, MODES)
    selected = frame["selected"].to_numpy(dtype=bool)
    target = selection_vectors(frame[selected], direction, mode=mode)
    layer_col = frame["layer"].to_numpy(dtype=np.int64)
    neuron_col = frame["neuron"].to_numpy(dtype=np.int64)
    delta_col = frame["delta"].to_numpy(dtype=np.float64)
    eligible = magnitude_passers(frame, quantile)
    if mode == "directional":
        eligible &= delta_col > 0 if sign > 0 else delta_col < 0
    pole_name = "HIGH" if sign > 0 else "LOW"
    what = "magnitude passers" + (f" with the {pole_name} pole's sign" if mode == "directional" else "")
    picked: list[np.ndarray] = []
    for layer, (idx, _) in sorted(target.items()):
        k = int(idx.size)
        pool = np.unique(neuron_col[(layer_col == layer) & eligible])
        if pool.size < k or not np.isin(idx, pool).all():
            raise ArtifactError(
                f"Layer {layer} has {pool.size} {what} (|delta| above the layer's {quantile:g} quantile), but the "
                f"DPN-LE edit touches {k} neurons there{'' if pool.size < k else ', not all of them among these'}: "
                "the recorded quantile does not reproduce the selection. Run `dpnle localize` again."
            )
        rng = _seeded_rng(seed, concept, layer, "random-mag")
        chosen = np.sort(rng.choice(pool, size=k, replace=False))
        picked.append(np.flatnonzero(np.isin(neuron_col, chosen) & (layer_col == layer)))
    rows = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    drawn = delta_col[rows]
    return pd.DataFrame({
        "layer": layer_col[rows], "neuron": neuron_col[rows], "delta": drawn,
        "cohens_d": frame["cohens_d"].to_numpy(dtype=np.float64)[rows] if "cohens_d" in frame else np.nan,
        "selected": np.ones(rows.size, dtype=bool),
        "pole": pd.array(np.where(drawn > 0, "high", "low"), dtype="string"),
    })


def magnitude_null_vectors(
    run: Run, concept: str, direction: Direction, mode: Mode = "both", seed: int = 0
) -> NumpyVectors:
    """The ``random-mag`` edit of a run: the magnitude-only null of the DPN-LE edit (``direction``,
    ``mode``), drawn with ``seed`` (see :func:`magnitude_null_selection`)."""
    frame, quantile = magnitude_frame(run, concept)
    drawn = magnitude_null_selection(frame, quantile, direction, mode=mode, seed=seed, concept=concept)
    return selection_vectors(drawn, direction, mode=mode)


def npti_vectors(
    run: Run, concept: str, direction: Direction, seed: int = 0, npti_mask: NptiMask = NPTI_MASK_DEFAULT
) -> tuple[NumpyVectors, dict[int, np.ndarray], dict[str, Any]]:
    """NPTI's edit at the gate site: (add vectors, clamp indices, meta).

    Targets are the HIGH neurons to raise the concept, the LOW ones to lower it. A target's
    activation gets ``gamma * v95 * sigmoid(10 (dp - 0.15))`` with ``dp`` the pole-oriented
    delta_p (``delta_p`` for HIGH, ``-delta_p`` for LOW: the signed difference column of NPTI's
    lists; equal to ``|delta_p|`` whenever the pole agrees with the sign). Every neuron of the
    opposite pole is clamped to ``min(a, 0)`` first, in the layers that have targets (as both
    NPTI's code and DPN-LE's re-implementation do). Stored oriented toward the concept (negated
    for LOW targets), so sign -1 adds it.

    ``npti_mask`` says which targets get the addition:

    - ``per-call`` (default; NPTI's published code): all targets are returned, and
      ``meta["keep"] = 0.9`` tells :func:`build_edit` to make the edit stochastic: a fresh
      Bernoulli(0.9) mask per forward call per layer, seeded from (seed, concept, layer);
    - ``none`` (DPN-LE's re-implementation for its capability table): every target;
    - ``fixed``: one seeded subset of exactly ``round(0.9 k)`` targets per layer, drawn once
      per (seed, concept, layer, direction).
    """
    check_choice("NPTI mask", npti_mask, NPTI_MASKS)
    sign = direction_sign(direction)
    selection = _selection(run, concept, "npti")
    missing = {"layer", "neuron", "delta_p", "pole", "v95"} - set(selection.columns)
    if missing:
        raise ArtifactError(f"The NPTI selection of {concept!r} lacks columns {sorted(missing)}; re-run localize.")
    target_pole, opposite_pole = ("high", "low") if sign > 0 else ("low", "high")
    pole = selection["pole"].astype(str).to_numpy()
    targets = selection[pole == target_pole]
    if targets["v95"].isna().any():
        raise ArtifactError(
            f"The NPTI selection of {concept!r} has no v95 values (the capture kept no per-sample "
            "activations). Re-run `dpnle collect-activations` for the gate site keeping per-sample "
            f"activations, then `dpnle localize --run {run.name} {cli_flag(concept)} --method npti`."
        )
    vectors: NumpyVectors = {}
    for layer, group in targets.groupby("layer"):
        idx = group["neuron"].to_numpy(np.int64)
        oriented = sign * group["delta_p"].to_numpy(np.float64)  # the pole's own signed difference
        amount = group["v95"].to_numpy(np.float64) / (1.0 + np.exp(-NPTI_SLOPE * (oriented - NPTI_CENTRE)))
        if npti_mask == "fixed":
            rng = _seeded_rng(seed, concept, int(layer), f"npti-{target_pole}")
            keep = np.sort(rng.choice(idx.size, size=int(round(NPTI_KEEP * idx.size)), replace=False))
        else:
            keep = np.arange(idx.size)
        order = np.argsort(idx[keep], kind="stable")
        vectors[int(layer)] = (idx[keep][order], (sign * amount[keep][order]).astype(np.float32))
    clamp = {int(layer): np.sort(g["neuron"].to_numpy(np.int64))
             for layer, g in selection[pole == opposite_pole].groupby("layer") if int(layer) in vectors}  # fmt: skip
    meta = {
        "npti_mask": npti_mask,
        "npti_keep": 1.0 if npti_mask == "none" else NPTI_KEEP,
        "npti_targets": int(len(targets)),
        "npti_clamped": int(sum(v.size for v in clamp.values())),
        "keep": NPTI_KEEP if npti_mask == "per-call" else 1.0,
    }
    return vectors, clamp, meta


def caa_vectors(run: Run, concept: str) -> tuple[dict[int, tuple[None, np.ndarray]], int]:
    """CAA's residual vector: ``{layer: (None, delta [hidden])}`` at the chosen layer."""
    selection = _selection(run, concept, "caa")
    layers = selection["layer"].unique()
    if len(layers) != 1:
        raise ArtifactError(f"The CAA selection of {concept!r} should hold one chosen layer, not {list(layers)}.")
    layer = int(layers[0])
    ordered = selection.sort_values("unit")
    units = ordered["unit"].to_numpy(np.int64)
    if not np.array_equal(units, np.arange(units.size)):
        raise ArtifactError(f"The CAA selection of {concept!r} does not hold every unit of layer {layer}.")
    return {layer: (None, ordered["delta"].to_numpy(np.float32))}, layer


# ---------------------------------------------------------------------------------------------
# export


def _check_bakeable(edit: Edit) -> None:
    if edit.site != "mlp":
        raise InputError(
            f"Only mlp-site edits (dpnle, dpnle-w, random, random-mag) fold into a bias; this {edit.method} edit is at "
            f"the {edit.site} site ({'non-linear: it clamps activations' if edit.clamp else 'not the MLP output'})."
        )
    if edit.stochastic:
        edit.dense_vectors(0)  # raises: a stochastic edit has no fixed vector to bake
    if edit.clamp:
        raise InputError("An edit that clamps activations is not linear and cannot be baked into a bias.")
    if edit.positions != "all":
        raise InputError(
            f"A baked bias applies at every position, but this edit's position policy is "
            f"{edit.positions!r}. Build it with positions='all' to export it."
        )


@torch.no_grad()
def bake_edit(model: nn.Module, edit: Edit) -> nn.Module:
    """Fold an mlp-site, positions='all' edit into the output projections' biases (in place).

    ``down(h + d) = down(h) + W_down @ d``: each edited layer's bias grows by
    ``W_down @ (gamma * sign * delta)`` ([hidden]); a projection without a bias gets one.
    Returns ``model``.
    """
    _check_bakeable(edit)
    arch = architecture(model)
    dense = edit.dense_vectors(arch.intermediate_size)
    for layer, vector in dense.items():
        proj = arch.layers[layer].output_projection
        weight = arch.output_weight(layer)  # [hidden, intermediate]
        # In float32: a bf16 matmul would round the shift before it reaches the bias.
        shift = weight.float() @ vector.to(weight.device)
        if getattr(proj, "bias", None) is None:
            proj.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
        proj.bias.add_(shift.to(proj.bias.dtype))
    return model


def _bias_plan(model: nn.Module) -> tuple[str, list[str]]:
    """How a saved checkpoint of ``model`` can hold MLP output biases.

    Returns ("native", []) when every output projection already has a bias, or
    ("mlp_bias", missing parameter names) when the config's ``mlp_bias`` switch adds them.
    """
    arch = architecture(model)
    if all(getattr(s.output_projection, "bias", None) is not None for s in arch.layers):
        return "native", []
    config = model.config
    if hasattr(config, "mlp_bias"):
        probe_config = copy.deepcopy(config)
        probe_config.mlp_bias = True
        # On the meta device: the class's own constructor tells which parameters the switch adds,
        # at no memory cost.
        with torch.device("meta"):
            probe = type(model)(probe_config)
        probe_arch = architecture(probe)
        if all(getattr(s.output_projection, "bias", None) is not None for s in probe_arch.layers):
            have = set(dict(model.named_parameters(remove_duplicate=False)))
            missing = [n for n, _ in probe.named_parameters(remove_duplicate=False) if n not in have]
            return "mlp_bias", missing
    raise UnsupportedModelError(
        f"Cannot export a baked edit for {type(model).__name__}: its MLP output projection has no bias and "
        "its config has no mlp_bias switch, so plain transformers would drop the baked bias. Supported: "
        "configs with mlp_bias (Llama, SmolLM2/SmolLM3, Granite, Helium, ...) and models whose MLP output "
        "already has a bias (GPT-2, GPT-NeoX/Pythia, OPT). Use the hooked edit (dpnle edit-eval) instead."
    )


def _add_zero_parameters(model: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr != "bias" or not isinstance(owner, nn.Linear):
            raise UnsupportedModelError(
                f"Setting mlp_bias on {type(model).__name__} adds {name}, which is not a Linear bias; "
                "dpnle does not know how to fill it."
            )
        owner.bias = nn.Parameter(torch.zeros(owner.out_features, device=owner.weight.device, dtype=owner.weight.dtype))


def export_checkpoint(
    loaded_or_model: LoadedModel | nn.Module,
    tokenizer: Any,
    edit: Edit,
    out_dir: str | os.PathLike,
    *,
    in_place: bool = False,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` with ``edit`` baked in as a standalone Hugging Face checkpoint in ``out_dir``.

    Loadable with plain ``AutoModelForCausalLM.from_pretrained(out_dir)``. For Llama-family
    configs ``config.mlp_bias`` is set (every MLP Linear of every layer gets a bias, zero
    except the edited down_proj ones); models whose MLP output already has a bias keep their
    config. ``in_place=False`` bakes into a deep copy (twice the memory); ``in_place=True``
    bakes into the given model. ``dpnle_edit.json`` next to the weights says what was baked.
    """
    if edit is None:
        raise InputError("Nothing to export: methods prompt and none make no edit.")
    _check_bakeable(edit)
    if isinstance(loaded_or_model, LoadedModel):
        model = loaded_or_model.model
        tokenizer = tokenizer or loaded_or_model.tokenizer
        source_info: dict[str, Any] = {"id": loaded_or_model.model_id, "fingerprint": loaded_or_model.fingerprint}
    else:
        model = loaded_or_model
        source_info = {"id": getattr(model.config, "_name_or_path", None) or type(model).__name__}
    if source is not None:
        source_info.update(source)
    if "fingerprint" not in source_info or not source_info["fingerprint"]:
        from dpnle.models import config_digest, weights_digest

        source_info["fingerprint"] = {"class": type(model).__name__, "config_sha256": config_digest(model),
                                      "weights_sha256": weights_digest(model)}  # fmt: skip
    plan, missing = _bias_plan(model)

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pick another folder or pass overwrite=True.")
    target = model if in_place else copy.deepcopy(model)
    if plan == "mlp_bias":
        _add_zero_parameters(target, missing)
        target.config.mlp_bias = True
    bake_edit(target, edit)

    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        target.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_json(
            staging / EDIT_INFO_FILE,
            {
                "dpnle_version": __version__,
                "created": now(),
                "concept": edit.meta.get("concept"),
                "method": edit.method,
                "direction": edit.meta.get("direction", "up" if edit.sign > 0 else "down"),
                "mode": edit.meta.get("mode"),
                "gamma": edit.gamma,
                "sign": edit.sign,
                "positions": edit.positions,
                "site": edit.site,
                "neurons": edit.num_neurons,
                "neurons_per_layer": {str(k): v for k, v in edit.neurons_per_layer().items()},
                "bias": "config.mlp_bias = true (zero biases except the edited down_proj)"
                if plan == "mlp_bias" else "the model's own MLP output bias",
                "source_model": source_info,
                "meta": {k: v for k, v in edit.meta.items() if k not in ("neurons_per_layer",)},
            },
        )  # fmt: skip
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
