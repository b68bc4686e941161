"""dpnle's edits inside vLLM's workers, installed through vLLM's public worker-RPC API.

:class:`DpnleWorkerExtension` is passed to ``vllm.LLM(worker_extension_cls=...)`` by its
qualified name; vLLM mixes its methods into every worker (one per tensor-parallel rank), and
:class:`dpnle.engines.VLLMEngine` calls them with ``llm.collective_rpc(name, args=(...))``,
giving plain data only (lists, ints, floats, strings), never Python functions. This module
imports vLLM lazily and is imported only inside vLLM's worker processes.

An installed edit is the same edit as on the Hugging Face path (:mod:`dpnle.edits`):

- ``mlp``: a forward pre-hook on ``mlp.down_proj`` replaces its input ``h`` by ``h + delta``
  (``delta`` already holds ``gamma * sign``); the hook sees ``[num_tokens, intermediate / tp]``.
- ``gate``: vLLM merges gate and up projections (``gate_up_proj``) and applies ``SiluAndMul``
  (``silu(x[:d]) * x[d:]``) in one module. A forward hook on ``mlp.act_fn`` recomputes
  ``a = silu(gate)`` from the module's input, clamps the clamp list to ``min(a, 0)``, adds
  ``delta``, and returns ``a' * up`` on the rows the position policy edits (the module's own
  output elsewhere): HF's ``act_fn`` output edited before the product, as in dpnle.edits.
- ``resid``: a forward hook on the decoder layer adds the vector to its output. vLLM's Llama-style
  layers return ``(hidden_states, residual)`` and the next fused add-norm sums them, so adding to
  ``hidden_states`` adds to the residual stream HF's layer outputs.

Positions. vLLM flattens every scheduled request's tokens into one batch. With chunked prefill,
prefix caching, CUDA graphs, speculative decoding and async scheduling off (the engine refuses
anything else before generating), each request in a step is either a whole-prompt prefill or
one decode token, so the rows of requests with exactly one scheduled token (from the forward
context's attention metadata, ``query_start_loc``) are the generated positions and every other
row is a prompt position. A one-token prompt would be ambiguous: the engine refuses it. Each
forward pass counts the prompt and generated rows it saw and those it edited, which the engine
checks after every ``generate`` against the prompt lengths and output lengths it knows: a
recomputed (preempted) request, a padded batch or a pass without metadata is an error, never a
silently different edit.

Stochastic edits (NPTI's per-call random keep mask). A layer whose plan entry carries ``keep``
draws, on every forward pass its position policy lets through, ``torch.rand(k, generator) <=
p`` over its ``k`` units in the edit's own order from a CPU generator seeded as the Hugging Face
path seeds it (:func:`dpnle.edits.keep_mask_seed`), builds the full-width vector exactly as
:class:`dpnle.edits._KeepMask` does, and keeps the rank's slice: every rank draws the same
stream. The generators start afresh at each install, so one install per Hugging Face batch, with
that batch's prompts prefilled together in one pass, replays HF ``generate``'s draws call for
call; each pass records how many requests it prefilled and decoded, which the engine checks.

Tensor parallelism: each rank holds ``intermediate / tp`` contiguous units of the MLP
(``[rank * w, (rank + 1) * w)``), so ``mlp`` and ``gate`` edits keep the units in the rank's
slice, shifted to local indices; ``resid`` vectors apply whole (the hidden states are
replicated after the all-reduce). Tested with 3 ranks on vLLM's CPU backend (tests/test_vllm_tp.py).
"""

from __future__ import annotations

from typing import Any

import torch

from dpnle.vocab import POSITIONS

POLICIES = POSITIONS  # an edit's position policies
KINDS = ("prompt", "generated")


def _parallel() -> tuple[int, int, int]:
    """(tp_rank, tp_size, pp_size) of this worker."""
    from vllm.distributed import parallel_state as ps

    return (int(ps.get_tensor_model_parallel_rank()), int(ps.get_tensor_model_parallel_world_size()),
            int(ps.get_pp_group().world_size))  # fmt: skip


def _decoder(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """(the module holding the decoder layers, the layers) of a vLLM causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None:
        raise RuntimeError(f"dpnle cannot find the decoder layers of vLLM's {type(model).__name__} (model.model.layers).")
    return inner, layers


class _Pass:
    """The rows of the current forward pass: which are generated, and the counts."""

    def __init__(self, policy: str):
        self.policy = policy
        self.keep: torch.Tensor | bool | None = None  # per-row mask of the rows this policy edits
        self.rows = 0
        self.counts = {"prompt": 0, "generated": 0}
        self.fired = False
        self.seen = {"prompt": 0, "generated": 0}
        self.edited = {"prompt": 0, "generated": 0}
        self.problems: list[str] = []
        self.passes = 0
        self.schedule: list[tuple[int, int]] = []  # per pass: (requests prefilled, requests decoded)

    def begin(self, rows: int, device: torch.device) -> None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        self.fired = False
        self.rows = rows
        self.passes += 1
        metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
        if isinstance(metadata, dict):
            metadata = next(iter(metadata.values()), None)
        qsl = getattr(metadata, "query_start_loc", None)
        if not torch.is_tensor(qsl):
            self.problems.append(f"a forward pass of {rows} rows had no attention metadata (query_start_loc)")
            self.keep = self.policy == "all" or None
            self.counts = {"prompt": 0, "generated": 0}
            return
        starts = qsl.detach().to("cpu", torch.long)
        lengths = starts[1:] - starts[:-1]
        total = int(starts[-1])
        if total != rows:
            # A padded batch (CUDA graphs) or a split one: rows would be misattributed.
            self.problems.append(f"a forward pass had {rows} rows but its requests scheduled {total} tokens")
            self.keep = self.policy == "all" or None
            self.counts = {"prompt": 0, "generated": 0}
            return
        decode = lengths == 1
        generated = int(decode.sum())
        self.schedule.append((int(lengths.numel()) - int(decode.sum()), int(decode.sum())))
        self.counts = {"prompt": rows - generated, "generated": generated}
        for kind in KINDS:
            self.seen[kind] += self.counts[kind]
        if self.policy == "all":
            self.keep = True
            return
        want = decode if self.policy == "generated" else ~decode
        if bool(want.all()):
            self.keep = True
        elif not bool(want.any()):
            self.keep = False
        else:
            self.keep = torch.repeat_interleave(want, lengths).to(device).unsqueeze(-1)

    def end(self) -> None:
        if self.fired:
            for kind in KINDS:
                if self.policy in ("all", kind):
                    self.edited[kind] += self.counts[kind]
        self.keep = None


class _KeepDraw:
    """A stochastic layer's per-pass draw: :class:`dpnle.edits._KeepMask`'s computation (the
    same generator stream, mask and ``index_add_`` over the full width), then the rank's slice
    ``[lo, lo + local)``."""

    def __init__(self, spec: dict[str, Any], width: int, lo: int, local: int):
        self.units = torch.as_tensor(spec["units"], dtype=torch.long)
        self.values = torch.as_tensor(spec["values"], dtype=torch.float32)
        self.p = float(spec["p"])
        self.width, self.lo, self.local = int(width), int(lo), int(local)
        self.generator = torch.Generator().manual_seed(int(spec["seed"]))
        self.draws = 0

    def __call__(self) -> torch.Tensor:
        mask = torch.rand(self.units.numel(), generator=self.generator) <= self.p
        self.draws += 1
        add = torch.zeros(self.width, dtype=torch.float32)
        add.index_add_(0, self.units[mask], self.values[mask])
        return add[self.lo : self.lo + self.local]


class _Editor:
    """One layer's change on ``[rows, width]`` (the rank's slice), under the pass's row mask."""

    def __init__(self, add: torch.Tensor | None, clamp: torch.Tensor | None, state: _Pass,
                 keep_draw: _KeepDraw | None = None):
        self.add = add
        self.clamp = clamp
        self.state = state
        self.keep_draw = keep_draw  # stochastic: a fresh add vector per pass instead of ``add``
        self.calls = 0

    def keep(self) -> torch.Tensor | bool:
        keep = self.state.keep
        if keep is None:  # a pass whose rows could not be attributed: edit nothing, reported later
            return False
        return keep

    def __call__(self, hidden: torch.Tensor, keep: torch.Tensor | bool) -> torch.Tensor:
        self.state.fired = True
        add = self.keep_draw() if self.keep_draw is not None else self.add
        add = None if add is None else add.to(device=hidden.device, dtype=hidden.dtype)
        out = hidden
        if self.clamp is not None:
            clamp = self.clamp.to(hidden.device)
            clamped = torch.where(clamp, hidden.clamp_max(0), hidden)
            out = clamped if keep is True else torch.where(keep, clamped, hidden)
        if add is not None:
            out = out + (add if keep is True else add * keep.to(add.dtype))
        return out


class _Installed:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.state = _Pass(spec["positions"])
        self.hooks: list[Any] = []
        self.editors: dict[int, _Editor] = {}

    def remove(self) -> None:
        while self.hooks:
            self.hooks.pop().remove()


class DpnleWorkerExtension:
    """Methods vLLM mixes into each worker; called through ``LLM.collective_rpc``."""

    def _dpnle_model(self) -> torch.nn.Module:
        runner = self.model_runner  # type: ignore[attr-defined]
        return runner.get_model() if callable(getattr(runner, "get_model", None)) else runner.model

    def dpnle_describe(self) -> dict[str, Any]:
        """What the engine checks before installing an edit: shapes, parallelism, modules."""
        model = self._dpnle_model()
        _, layers = _decoder(model)
        rank, size, pp = _parallel()
        first = layers[0]
        mlp = getattr(first, "mlp", None)
        down = getattr(mlp, "down_proj", None)
        act = getattr(mlp, "act_fn", None)
        local = getattr(down, "input_size_per_partition", None)
        config = self.model_runner.model_config.hf_config  # type: ignore[attr-defined]
        quant_key = None
        try:
            from vllm.model_executor.layers.fusion.fused_act_quant import get_input_quant_key

            quant_key = None if down is None else get_input_quant_key(down)
        except ImportError:
            pass
        return {
            "model_class": type(model).__name__,
            "num_layers": len(layers),
            "hidden_size": int(config.hidden_size),
            "intermediate_size": int(getattr(config, "intermediate_size", 0) or 0),
            "local_intermediate_size": None if local is None else int(local),
            "act_fn": type(act).__name__ if act is not None else None,
            "has_down_proj": down is not None,
            "fused_act_quant": quant_key is not None,
            "tp_rank": rank,
            "tp_size": size,
            "pp_size": pp,
        }

    def dpnle_install_edit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Install one edit (replacing any installed one). ``spec``: plain data from
        :func:`dpnle.engines.edit_plan`: site, positions, width, and per layer the full-width
        unit indices with their values (gamma and sign applied) and the clamp list."""
        self.dpnle_remove_edit()
        model = self._dpnle_model()
        _, layers = _decoder(model)
        rank, size, pp = _parallel()
        if pp != 1:
            raise RuntimeError("dpnle edits on vLLM need pipeline_parallel_size 1 (each rank must hold every layer).")
        site, width = spec["site"], int(spec["width"])
        installed = _Installed(spec)
        state = installed.state
        try:
            # The pass begins at the first decoder layer and ends after the last: vLLM's compile
            # decorator calls the decoder stack's forward directly, so hooks on the stack never run.
            installed.hooks.append(layers[0].register_forward_pre_hook(_first_layer_pre_hook(state), with_kwargs=True))
            for entry in spec["layers"]:
                layer = int(entry["layer"])
                if not 0 <= layer < len(layers):
                    raise RuntimeError(f"layer {layer} is outside the model's {len(layers)} layers")
                if site == "resid":
                    lo, local = 0, width
                else:
                    if width % size:
                        raise RuntimeError(f"intermediate size {width} does not split over {size} ranks")
                    local = width // size
                    lo = rank * local
                add = _local_dense(entry.get("idx"), entry.get("values"), lo, local)
                clamp = None
                if entry.get("clamp"):
                    c = torch.as_tensor(entry["clamp"], dtype=torch.long)
                    c = c[(c >= lo) & (c < lo + local)] - lo
                    if c.numel():
                        clamp = torch.zeros(local, dtype=torch.bool).index_fill_(0, c, True)
                keep_draw = None if not entry.get("keep") else _KeepDraw(entry["keep"], width, lo, local)
                editor = _Editor(add, clamp, state, keep_draw)
                installed.editors[layer] = editor
                installed.hooks.append(_register(site, layers[layer], editor, local))
            # Registered last, so it runs after an edit hook on the last layer itself.
            installed.hooks.append(layers[len(layers) - 1].register_forward_hook(lambda *_: state.end(), always_call=True))
        except BaseException:
            installed.remove()
            raise
        self._dpnle_installed = installed
        return {"rank": rank, "layers": sorted(installed.editors)}

    def dpnle_remove_edit(self) -> bool:
        installed = getattr(self, "_dpnle_installed", None)
        if installed is None:
            return False
        installed.remove()
        self._dpnle_installed = None
        return True

    def dpnle_reset_counts(self) -> None:
        installed = getattr(self, "_dpnle_installed", None)
        if installed is not None:
            policy = installed.state.policy
            fresh = _Pass(policy)
            installed.state.__dict__.update(fresh.__dict__)
            for editor in installed.editors.values():
                editor.calls = 0

    def dpnle_edit_counts(self) -> dict[str, Any] | None:
        installed = getattr(self, "_dpnle_installed", None)
        if installed is None:
            return None
        state = installed.state
        return {
            "rank": _parallel()[0],
            "seen": dict(state.seen),
            "edited": dict(state.edited),
            "passes": state.passes,
            "calls": {str(layer): e.calls for layer, e in installed.editors.items()},
            "draws": {str(layer): e.keep_draw.draws for layer, e in installed.editors.items() if e.keep_draw},
            "schedule": list(state.schedule),
            "problems": list(dict.fromkeys(state.problems)),
        }


def _local_dense(idx: list[int] | None, values: list[float] | None, lo: int, local: int) -> torch.Tensor | None:
    if values is None or len(values) == 0:
        return None
    vals = torch.tensor(values, dtype=torch.float32)
    if idx is None:  # a full-width vector (resid)
        if vals.numel() != local:
            raise RuntimeError(f"a full vector of {vals.numel()} units for a site of {local}")
        return vals
    index = torch.as_tensor(idx, dtype=torch.long)
    inside = (index >= lo) & (index < lo + local)
    dense = torch.zeros(local, dtype=torch.float32)
    dense[index[inside] - lo] = vals[inside]
    return dense


def _first_layer_pre_hook(state: _Pass):
    def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # Llama-style vLLM layers: forward(positions, hidden_states, residual)
        hidden = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
        if not torch.is_tensor(hidden):
            state.problems.append("a forward pass whose first layer got no hidden_states tensor")
            state.keep = None
            return
        state.begin(int(hidden.shape[0]), hidden.device)

    return pre_hook


def _register(site: str, layer: torch.nn.Module, editor: _Editor, local: int):
    if site == "mlp":
        module = layer.mlp.down_proj

        def pre_hook(_module: torch.nn.Module, args: tuple):
            editor.calls += 1
            keep = editor.keep()
            if keep is False:
                return None
            return (editor(args[0], keep), *args[1:])

        return module.register_forward_pre_hook(pre_hook)
    if site == "gate":
        module = layer.mlp.act_fn
        if type(module).__name__ != "SiluAndMul":
            raise RuntimeError(f"the gate site needs SiluAndMul, this model's MLP uses {type(module).__name__}")

        def hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor):
            editor.calls += 1
            keep = editor.keep()
            if keep is False:
                return None
            x = args[0]
            d = x.shape[-1] // 2
            if d != local:
                raise RuntimeError(f"the gate site has {d} units on this rank, the edit expects {local}")
            activation = torch.nn.functional.silu(x[..., :d])
            edited = editor(activation, True) * x[..., d:]
            return edited if keep is True else torch.where(keep, edited, output)

        return module.register_forward_hook(hook)
    if site == "resid":

        def hook(_module: torch.nn.Module, _args: tuple, output: Any):
            editor.calls += 1
            keep = editor.keep()
            if keep is False:
                return None
            if torch.is_tensor(output):
                return editor(output, keep)
            return (editor(output[0], keep), *output[1:])

        return layer.register_forward_hook(hook)
    raise RuntimeError(f"unknown site {site!r}")
