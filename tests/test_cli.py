import pytest

from dpnle.cli import main
from dpnle.runs import read_parquet


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def test_help_lists_the_stages(capsys):
    code, text = run_cli(["--help"], capsys)
    assert code == 0
    for stage in ("collect-activations", "localize", "edit-eval", "leakage-report", "data", "models", "runs"):
        assert stage in text


def test_unknown_trait_is_a_readable_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DPNLE_RUNS", str(tmp_path))
    code, text = run_cli(["data", "pairs", "--trait", "openess"], capsys)
    assert code == 2
    assert "Unknown concept 'openess'" in text and "conscientiousness" in text
    assert "Traceback" not in text


def test_yaml_config_sets_defaults_and_flags_override(capsys, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("num_pairs: 7\ndata:\n  pairs:\n    seed: 3\n")
    code, _ = run_cli(["data", "pairs", "--concept", "power", "--config", str(config), "--out", str(tmp_path)], capsys)
    assert code == 0
    assert len(read_parquet(tmp_path / "power-values-n7-seed3.parquet")) == 7
    code, _ = run_cli(["data", "pairs", "--concept", "power", "-c", str(config), "--num-pairs", "5",
                       "--out", str(tmp_path)], capsys)
    assert code == 0
    assert len(read_parquet(tmp_path / "power-values-n5-seed3.parquet")) == 5


def test_localize_without_runs_names_the_first_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DPNLE_RUNS", str(tmp_path))
    code, text = run_cli(["localize", "--trait", "openness"], capsys)
    assert code == 2
    assert "collect-activations" in text
