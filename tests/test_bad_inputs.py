"""Bad input through the command line: one readable ``error: ...`` line that names the fix,
exit code 2, no traceback, and nothing half-made left behind.

The README's "Bad input and failures" table lists what each case gets.
"""

from __future__ import annotations

import errno
import os
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
    run.record_model(loaded)
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


@pytest.mark.parametrize("layers, expected", [
    ("3-1", "Empty layer range '3-1': the end comes before the start"),
    ("-1--3", "Empty layer range '-1--3'"),
    ("a-b", "'a-b' is not a layer number"),
    (",", "names no layer"),
])
def test_layer_syntax_in_collect_is_checked_before_the_model_loads(capsys, runs, layers, expected):
    # "nobody/nothing" cannot load: reaching the model would be a different error.
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", "nobody/nothing",
                                f"--layers={layers}"], capsys))
    assert f"--layers {layers!r}" in line and expected in line and "--layers 12-31" in line
    assert not runs.exists() or not any(runs.iterdir())


def test_layer_range_in_collect_is_checked_against_the_model(capsys, runs, gpt2_dir):
    # The layer count comes with the model: 4-5 on a 4-layer model fails after the load, before any pair.
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", gpt2_dir,
                                "--layers", "4-5", "--num-pairs", "2"], capsys))
    assert "Layer 4 is out of range: the model has layers 0-3" in line and "--layers 0-3" in line
    assert not runs.exists() or not any(runs.iterdir())
    # A range from a negative to a non-negative index depends on the layer count: left to that check.
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", "nobody/nothing",
                                "--layers", "-1-3"], capsys))
    assert "'nobody/nothing' is not available locally" in line


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


def test_permission_denied_mid_stage_is_one_line(capsys, runs, captured, monkeypatch):
    # A folder made read-only under a running stage (the early check passed): one line naming the file.
    run = copy_run(captured, runs)

    def denied(table, where, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(where))

    monkeypatch.setattr(pq, "write_table", denied)
    line = error_line(*run_cli(["localize", "--run", "r", "--trait", "openness", "--layers", "all"], capsys))
    assert "Permission denied: " in line and str(run.path / "neurons") in line and "chmod u+rw" in line


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


# ---------------------------------------------------------------------------------------------
# config files: a key no command reads is an error, not a default silently kept


def write_config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [
    ("localize:\n  quantlie: 0.5\n", "dpnle localize has no option 'quantlie' (did you mean quantile?)"),
    ("collect_activations:\n  num_pairs: 5\n",
     "dpnle has no command 'collect_activations' to name a section after (did you mean collect-activations?)"),
    ("quantlie: 0.5\n", "no dpnle command has an option 'quantlie' (did you mean quantile?)"),
    ("data:\n  pairz:\n    seed: 3\n",
     "dpnle data has no command 'pairz' to name a section after (did you mean pairs?)"),
    ("localize:\n  quantile:\n    value: 0.5\n",
     "option 'quantile' of dpnle localize takes a value, not a mapping: write quantile: VALUE."),
])
def test_unknown_config_key(capsys, runs, tmp_path, text, expected):
    # No run exists: reaching the stage would be a different error.
    config = write_config(tmp_path, text)
    line = error_line(*run_cli(["localize", "--run", "R", "--trait", "openness", "--config", config], capsys))
    assert f"Config file {config}: {expected}" in line


def test_unknown_config_key_names_the_valid_ones(capsys, runs, tmp_path):
    config = write_config(tmp_path, "localize:\n  quantlie: 0.5\n")
    line = error_line(*run_cli(["localize", "--trait", "openness", "-c", config], capsys))
    assert "Valid options: all_captured, all_traits, all_values, d_threshold, layer, layers, method, model, " \
           "npti_selection, quantile, run, trait, value." in line
    config = write_config(tmp_path, "collect_activations:\n  num_pairs: 5\n")
    line = error_line(*run_cli(["localize", "--trait", "openness", "-c", config], capsys))
    assert "Sections: collect-activations, data, edit-eval, export, import-npti, leakage-report, localize," in line


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.yaml", "does not exist"),
    (lambda d: d, "is a folder: pass a YAML file"),
    (lambda d: write_config(d, "localize: [\n"), "is not valid YAML (expected the node content"),
    (lambda d: write_config(d, "- quantile\n"), "must hold a mapping of option names to values"),
])
def test_unusable_config_file(capsys, runs, tmp_path, make, expected):
    config = make(tmp_path)
    line = error_line(*run_cli(["localize", "--run", "R", "--trait", "openness", "--config", config], capsys))
    assert f"Config file {config} " in line and expected in line


@pytest.mark.parametrize("name", ["demo.yaml", "llama3-8b.yaml", "qwen2.5-7b.yaml"])
def test_shipped_configs_are_valid(name):
    import typer

    from dpnle.cli import app, check_config, load_config
    from dpnle.paths import project_configs_dir

    path = project_configs_dir() / name
    check_config(typer.main.get_command(app), load_config(path), path)


def test_config_keys_may_use_hyphens(capsys, runs, tmp_path):
    # num-pairs in a section is the option num_pairs (as before); 0 pairs is then refused by the command.
    config = write_config(tmp_path, "collect-activations:\n  num-pairs: 0\n")
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", "nobody/nothing",
                                "--config", config], capsys))
    assert "--num-pairs must be at least 1, not 0" in line


# ---------------------------------------------------------------------------------------------
# edit-eval options, checked before a run is looked up or its model loads


@pytest.mark.parametrize("option, value, expected", [
    ("--positions", "bogus", "--positions 'bogus': choose one of all, prompt, generated."),
    ("--mode", "sideways", "--mode 'sideways': choose one of both, directional."),
    ("--judge", "bogus", "Unknown judge spec 'bogus'"),
    ("--judge", "openai:gpt-4o", "expected openai:BASE_URL#MODEL"),
    ("--judge", "openai:localhost:8000#m", "BASE_URL must start with http:// or https://"),
    ("--judge", "hf:", "expected hf:MODEL"),
])
def test_edit_options_refused_before_the_model_loads(capsys, runs, option, value, expected):
    # No run exists: reaching the run lookup (let alone the model) would be a different error.
    line = error_line(*run_cli(["edit-eval", "--trait", "openness", option, value], capsys))
    assert expected in line


@pytest.mark.parametrize("args, expected", [
    (["--capability-limit", "-5"], "--capability-limit must be 0 (all items) or a positive count, not -5."),
    (["--open-ended-limit", "-1"], "--open-ended-limit must be 0 (all items) or a positive count, not -1."),
    (["--gammas", "1,,2"], "--gammas '1,,2' has an empty item; pass e.g. --gammas 0.5,1,1.5 or --gammas dpnle=0.8,npti=1.4."),
    (["--gammas", "1,"], "--gammas '1,' has an empty item"),
    (["--gammas", "=1"], "--gammas: '=1' names no method"),
    (["--directions", "up,"], "--directions 'up,' has an empty item; pass e.g. --directions up,down."),
    (["--methods", "dpnle,,none"], "--methods 'dpnle,,none' has an empty item"),
])
def test_values_that_cannot_mean_what_they_say(capsys, runs, args, expected):
    """A negative count is not "all items", an empty list item is not silently dropped."""
    line = error_line(*run_cli(["edit-eval", "--trait", "openness", *args], capsys))
    assert expected in line


def test_an_unpinned_fetch_is_not_called_verified(capsys, monkeypatch):
    import dataclasses

    from dpnle import datasets

    # The search files are pinned by git blob id now; an entry without any digest is simulated.
    entry = datasets.REGISTRY["pb-search-openness"]
    monkeypatch.setitem(datasets.REGISTRY, entry.name, dataclasses.replace(entry, git_blob=None))
    fetched = []
    monkeypatch.setattr(datasets, "fetch", lambda name, force=False: fetched.append(name) or "/tmp/x")
    code, out = run_cli(["data", "fetch", "pb-search-openness", "mpi120"], capsys)
    text = " ".join(out.split())
    assert code == 0 and fetched == ["pb-search-openness", "mpi120"]
    assert "pb-search-openness -> /tmp/x (not verified: no pinned digest)" in text
    assert "1 file(s) verified against a pinned SHA-256. 1 not verified (no pinned digest): pb-search-openness" in text


def test_a_valid_judge_spec_sends_nothing_early(capsys, runs, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the judge was asked before any answer was generated")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    line = error_line(*run_cli(["edit-eval", "--trait", "openness", "--judge", "openai:http://127.0.0.1:9#m"], capsys))
    assert "No run" in line  # past the judge check, stopped at the run lookup


# ---------------------------------------------------------------------------------------------
# folders: read-only, a file where a folder should be


@pytest.fixture
def read_only(monkeypatch):
    """make(path) makes a folder read-only; for root, whom chmod does not stop, os.access says so too."""
    made: list = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(os.path.samefile(path, p) for p in made if os.path.exists(path)):
            return False
        return real_access(path, mode, *args, **kwargs)

    if getattr(os, "geteuid", lambda: 1)() == 0:
        monkeypatch.setattr(os, "access", access)

    def make(path):
        path.chmod(0o555)
        made.append(path)

    yield make
    for path in made:
        path.chmod(0o755)


@pytest.mark.parametrize("command", [
    ["localize", "--run", "r", "--trait", "openness"],
    ["localize", "--trait", "openness", "--model", "tiny-llama"],
    ["edit-eval", "--run", "r", "--trait", "openness"],
    ["leakage-report", "--run", "r"],
])
def test_read_only_run_folder(capsys, runs, read_only, command):
    run = Run.create_or_open("r", "tiny-llama", root=runs)
    read_only(run.path)
    line = error_line(*run_cli(command, capsys))
    assert f"{run.path} is not writable" in line and f"chmod u+w {run.path}" in line
    assert sorted(p.name for p in run.path.iterdir()) == ["run.json"]


def test_read_only_runs_folder_in_collect(capsys, runs, read_only):
    runs.mkdir()
    read_only(runs)
    # "nobody/nothing" cannot load: the folder is refused before the model is reached.
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", "nobody/nothing",
                                "--run", "new"], capsys))
    assert f"{runs} is not writable" in line and f"the run folder {runs / 'new'} cannot be written" in line


@pytest.mark.parametrize("command", [
    ["runs", "list"],
    ["runs", "show", "r"],
    ["localize", "--trait", "openness"],
    ["localize", "--run", "r", "--trait", "openness"],
    ["collect-activations", "--trait", "openness", "--model", "nobody/nothing"],
])
def test_runs_folder_is_a_file(capsys, tmp_path, monkeypatch, command):
    (tmp_path / "runs").write_text("")
    monkeypatch.setenv("DPNLE_RUNS", str(tmp_path / "runs"))
    line = error_line(*run_cli(command, capsys))
    assert f"DPNLE_RUNS '{tmp_path / 'runs'}' is a file, not a folder: point DPNLE_RUNS at a folder" in line


@pytest.mark.parametrize("make, expected", [
    (lambda out: out.write_text(""), "is a file, not a folder: pass a new or empty folder"),
    (lambda out: (out.mkdir(), (out / "x").write_text("")), "exists and is not empty: pick another folder, "
                                                             "or pass --overwrite"),
])
def test_export_folder_refused_before_the_model_loads(capsys, runs, tmp_path, make, expected):
    # The run has no neurons: reaching the edit (let alone the model) would be a different error.
    Run.create_or_open("r", "tiny-llama", root=runs)
    out = tmp_path / "out"
    make(out)
    line = error_line(*run_cli(["export", out, "--trait", "openness", "--run", "r"], capsys))
    assert f"{out} {expected}" in line


def test_export_into_a_read_only_folder(capsys, runs, tmp_path, read_only):
    Run.create_or_open("r", "tiny-llama", root=runs)
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    line = error_line(*run_cli(["export", parent / "out", "--trait", "openness", "--run", "r"], capsys))
    assert f"{parent} is not writable" in line and f"the export folder {parent / 'out'}" in line


# ---------------------------------------------------------------------------------------------
# run.json that cannot be read; --run names and paths


def corrupt_newest(runs):
    """Runs a (model m1, older, readable) and b (newest, run.json truncated)."""
    a = Run.create_or_open("a", "m1", root=runs)
    b = Run.create_or_open("b", "m1", root=runs)
    os.utime(a.manifest_path, (1, 1))
    b.manifest_path.write_text('{"name": "b", "mod')
    return a, b


def test_runs_list_shows_a_corrupt_run_and_the_others(capsys, runs):
    a, b = corrupt_newest(runs)
    code, text = run_cli(["runs", "list"], capsys)
    assert code == 0, text
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    assert "m1" in rows["a"] and "unreadable run.json" in rows["b"]
    assert f"warning: {b.manifest_path} is not valid JSON" in text


@pytest.mark.parametrize("command", [
    ["localize", "--trait", "openness"],
    ["localize", "--trait", "openness", "--model", "m1"],
    ["leakage-report"],
])
def test_most_recent_run_lookup_refuses_a_corrupt_newer_run(capsys, runs, command):
    # The corrupt run may be the most recent one (of m1): picking run a instead would be silently wrong.
    a, b = corrupt_newest(runs)
    line = error_line(*run_cli(command, capsys))
    assert "Cannot tell which run is the most recent one" in line and f"{b.manifest_path} is not valid JSON" in line
    assert f"move {b.path} out of the way" in line and "pass --run NAME" in line


def test_a_corrupt_run_named_with_run(capsys, runs):
    a, b = corrupt_newest(runs)
    b.manifest_path.write_text("[]")
    line = error_line(*run_cli(["runs", "show", "b"], capsys))
    assert f"{b.manifest_path} holds a list, not a run record (a JSON object)" in line


@pytest.mark.parametrize("run", ["../x", "x/y", "..", "ABSOLUTE"])
def test_run_paths_do_not_create_runs_outside_the_runs_folder(capsys, runs, tmp_path, run):
    run = str(tmp_path / "elsewhere") if run == "ABSOLUTE" else run
    # "nobody/nothing" cannot load: the name is refused before the model is reached.
    line = error_line(*run_cli(["collect-activations", "--trait", "openness", "--model", "nobody/nothing",
                                "--run", run], capsys))
    assert f"--run {run!r} is a path, and no run exists there" in line
    assert "pass --run NAME (no '/'), or set DPNLE_RUNS" in line
    assert not (tmp_path / "elsewhere").exists()


def test_an_existing_run_can_be_named_by_its_path(capsys, runs, captured, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "r"
    shutil.copytree(captured, elsewhere)
    code, text = run_cli(["localize", "--run", elsewhere, "--trait", "openness", "--layers", "all"], capsys)
    assert code == 0, text
    assert Run(elsewhere).neurons_path("openness").exists()
    assert not runs.exists()
