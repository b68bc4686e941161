"""Bad input through the command line: one readable ``error: ...`` line that names the fix,
exit code 2, no traceback, and nothing half-made left behind.

The README's "Bad input and failures" table lists what each case gets.
"""

from __future__ import annotations

import errno
import shutil
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
import torch
from helpers import save_model, tiny_gpt2, tiny_llama, tiny_pairs

from dpnle import localize as loc
from dpnle.cli import main
from dpnle.collect import collect_concept
from dpnle.models import LoadedModel, model_fingerprint
from dpnle.runs import InputError, Run

torch.set_num_threads(1)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def error_line(code, text):
    """The one error line; fails unless the command exited 2 with exactly one, untraced."""
    assert code == 2, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("DPNLE_RUNS", str(root))
    return root


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A model without a gated MLP, saved like a downloaded one."""
    return save_model(tmp_path_factory.mktemp("gpt2"), tiny_gpt2)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A run with a real (tiny) openness capture: copied into each test that needs one."""
    model, tokenizer = tiny_llama()
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "memory", model_fingerprint(model, tokenizer, "tiny-llama"))
    run = Run.create_or_open("r", "tiny-llama", root=tmp_path_factory.mktemp("template"))
    run.update_manifest(model={"id": "tiny-llama", "fingerprint": loaded.fingerprint})
    collect_concept(run, loaded, "openness", pairs=tiny_pairs(6), batch_size=6, progress=False)
    return run.path


def copy_run(template, runs) -> Run:
    shutil.copytree(template, runs / "r")
    return Run(runs / "r")


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("command", [
    ["collect-activations", "--trait", "openess", "--model", "nobody/nothing"],
    ["localize", "--trait", "openess"],
    ["edit-eval", "--trait", "openess"],
])
def test_unknown_concept(capsys, runs, command):
    line = error_line(*run_cli(command, capsys))
    assert "Unknown concept 'openess'" in line and "openness" in line and "--trait" in line


@pytest.mark.parametrize("command, expected", [
    (["localize", "--trait", "openness", "--method", "foo"], "choose one of dpnle, npti, caa"),
    (["localize", "--all", "--method", "foo"], "choose one of dpnle, npti, caa"),
    (["edit-eval", "--trait", "openness", "--methods", "dpnle,foo"], "choose from dpnle, dpnle-w"),
])
def test_unknown_method(capsys, runs, command, expected):
    # Refused before any run is looked up (there is none here) or any model loaded.
    line = error_line(*run_cli(command, capsys))
    assert "'foo'" in line and expected in line


def test_unknown_method_in_the_api_is_an_input_error(captured, runs):
    run = copy_run(captured, runs)
    with pytest.raises(InputError, match="Unknown localization method 'foo'"):
        loc.localize_concept(run, "openness", method="foo")
    with pytest.raises(InputError, match="Unknown localization method"):
        loc.localize_all(run, method="foo")


# ---------------------------------------------------------------------------------------------
# models


def test_gate_site_on_a_model_without_a_gated_mlp(capsys, runs, gpt2_dir):
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", gpt2_dir,
                                "--site", "gate", "--num-pairs", "2"], capsys))
    assert "GPT2LMHeadModel has no gated MLP" in line and "--site mlp or resid" in line
    assert not runs.exists() or not any(runs.iterdir()), "a refused capture must not create a run"


def test_hub_model_not_cached_offline(capsys, runs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = error_line(*run_cli(["collect-activations", "--model", "nobody/nothing", "--trait", "openness"], capsys))
    assert "'nobody/nothing' is not available locally" in line
    assert "huggingface-cli download nobody/nothing" in line and "local folder" in line


# ---------------------------------------------------------------------------------------------
# data


@pytest.fixture
def offline_without_mirror(tmp_path, monkeypatch):
    monkeypatch.delenv("DPNLE_DATA_MIRROR", raising=False)
    monkeypatch.setenv("DPNLE_CACHE", str(tmp_path / "empty-cache"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


@pytest.mark.parametrize("command, dataset", [
    (["data", "fetch", "ipip120"], "ipip120"),
    (["data", "pairs", "--trait", "openness", "--num-pairs", "2"], "pb-descriptions"),
])
def test_missing_dataset_without_a_mirror(capsys, runs, offline_without_mirror, tmp_path, command, dataset):
    line = error_line(*run_cli(command, capsys))
    assert f"Could not download {dataset} from https://raw.githubusercontent.com/" in line
    assert "DPNLE_DATA_MIRROR=/path/to/mirror" in line and f"dpnle data fetch {dataset}" in line
    assert not list((tmp_path / "empty-cache").rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# numbers and ranges


@pytest.mark.parametrize("gammas, expected", [
    ("nan", "gamma must be a finite number, not nan"),
    ("1,inf", "gamma must be a finite number, not inf"),
    ("abc", "--gammas: 'abc' is not a number"),
])
def test_gamma_not_a_finite_number(capsys, runs, gammas, expected):
    line = error_line(*run_cli(["edit-eval", "--trait", "openness", "--gammas", gammas], capsys))
    assert expected in line and "--gammas 0.5,1,1.5" in line


def test_export_gamma_nan(capsys, runs, captured):
    copy_run(captured, runs)
    line = error_line(*run_cli(["export", runs / "out", "--trait", "openness", "--run", "r", "--gamma", "nan"],
                               capsys))
    assert "gamma must be a finite number, not nan" in line
    assert not (runs / "out").exists()


def test_empty_layer_range_in_localize(capsys, runs, captured):
    copy_run(captured, runs)
    line = error_line(*run_cli(["localize", "--run", "r", "--trait", "openness", "--layers", "3-1"], capsys))
    assert "--layers '3-1'" in line and "Empty layer range '3-1'" in line and "--layers 0-3" in line
    # 5-2 on a 4-layer model: out of range before it is empty.
    line = error_line(*run_cli(["localize", "--run", "r", "--trait", "openness", "--layers", "5-2"], capsys))
    assert "--layers '5-2'" in line and "out of range" in line and "layers 0-3" in line
    assert not (runs / "r" / "neurons").exists()


def test_empty_layer_range_in_collect(capsys, runs, gpt2_dir):
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", gpt2_dir,
                                "--layers", "3-1", "--num-pairs", "2"], capsys))
    assert "Empty layer range '3-1'" in line and "--layers 0-3" in line
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("option, value, expected", [
    ("--quantile", "1.5", "quantile must be strictly between 0 and 1, not 1.5"),
    ("--quantile", "0", "quantile must be strictly between 0 and 1, not 0.0"),
    ("--quantile", "nan", "quantile must be strictly between 0 and 1, not nan"),
    ("--d-threshold", "-0.1", "d_threshold must be a finite number >= 0, not -0.1"),
])
def test_thresholds_out_of_range(capsys, runs, option, value, expected):
    line = error_line(*run_cli(["localize", "--trait", "openness", option, value], capsys))
    assert expected in line and ("--quantile 0.995" in line or "--d-threshold 0.8" in line)


def test_thresholds_out_of_range_in_the_api(captured, runs):
    run = copy_run(captured, runs)
    for kwargs in ({"quantile": 1.0}, {"quantile": 0.0}, {"d_threshold": -1.0}):
        with pytest.raises(InputError):
            loc.localize_concept(run, "openness", layers="all", **kwargs)
        with pytest.raises(InputError):
            loc.localize_all(run, layers="all", **kwargs)
    assert not (run.path / "neurons").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--num-pairs", "0", "--num-pairs must be at least 1, not 0"),
    ("--batch-size", "0", "batch_size must be a positive integer or 'auto', not '0'"),
    ("--batch-size", "many", "batch_size must be a positive integer or 'auto', not 'many'"),
    ("--shard-size", "0", "shard_size must be at least 1, not 0"),
    ("--site", "attn", "Unknown site 'attn'"),
    ("--policy", "first", "Unknown token policy 'first'"),
])
def test_capture_options_are_checked_before_the_model_loads(capsys, runs, option, value, expected):
    # "nobody/nothing" cannot load: reaching the model would be a different error.
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", "nobody/nothing",
                                option, value], capsys))
    assert expected in line


def test_edit_eval_counts_must_be_positive(capsys, runs):
    line = error_line(*run_cli(["edit-eval", "--trait", "openness", "--batch-size", "0"], capsys))
    assert "batch_size must be at least 1" in line
    line = error_line(*run_cli(["edit-eval", "--trait", "openness", "--limit", "0"], capsys))
    assert "limit must be at least 1" in line


# ---------------------------------------------------------------------------------------------
# a full disk


@pytest.mark.parametrize("where", ["write_table", "replace"])
def test_full_disk_during_localize(capsys, runs, captured, monkeypatch, where):
    run = copy_run(captured, runs)
    if where == "write_table":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pq, "write_table", full)
    else:
        import os

        real_replace = os.replace

        def full(src, dst, *args, **kwargs):
            if str(dst).endswith(".parquet"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", full)
    line = error_line(*run_cli(["localize", "--run", "r", "--trait", "openness", "--layers", "all",
                                "--quantile", "0.9", "--d-threshold", "0.2"], capsys))
    target = run.neurons_path("openness")
    assert "The disk is full" in line and f"writing {target}" in line and "No space left on device" in line
    assert "DPNLE_RUNS" in line
    leftovers = [p.name for p in target.parent.iterdir()] if target.parent.exists() else []
    assert leftovers == [], f"partial files left behind: {leftovers}"
    assert (run.stage_status("localize", "openness") or {}).get("status") != "done"


def test_other_os_errors_are_not_disguised(runs, captured, monkeypatch):
    copy_run(captured, runs)

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main(["localize", "--run", "r", "--trait", "openness", "--layers", "all"])


@pytest.mark.parametrize("extra, expected", [
    (["--num-processes", "0"], "--num-processes must be at least 1"),
    (["--num-processes", "2", "--device-map", "auto"], "drop --device-map"),
    (["--max-memory", "lots"], "DEVICE=AMOUNT"),
])
def test_scale_options_refused_before_loading(capsys, runs, extra, expected):
    # "nobody/nothing" cannot load: reaching the model would be a different error.
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", "nobody/nothing", *extra],
                               capsys))
    assert expected in line
