"""Held-out items: IPIP-300's 180 test items are never read by the choice a table depends on."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pandas as pd
import pytest

from dpnle import evaluate as ev
from dpnle import instruments
from dpnle.runs import Run

needs_mirror = pytest.mark.skipif(not os.environ.get("DPNLE_DATA_MIRROR"), reason="needs the dataset mirror")


@needs_mirror
def test_train_and_test_items_are_disjoint_halves_of_ipip300():
    train = {it.id for it in instruments.load_instrument("ipip300-train").items}
    test = {it.id for it in instruments.load_instrument("ipip300-test").items}
    every = {it.id for it in instruments.load_instrument("ipip300").items}
    assert len(train) == 120 and len(test) == 180
    assert not train & test and train | test == every


def test_validity_of_the_held_out_items_is_checked_on_the_train_items(tmp_path, monkeypatch):
    seen = []

    def fake_check(model, tokenizer, instrument, scorer, concepts, **kwargs):
        seen.append(instrument)
        return pd.DataFrame({"instrument": [instrument] * len(concepts), "scorer": scorer, "concept": concepts,
                             "passed": True})

    monkeypatch.setattr(instruments, "validity_check", fake_check)
    run = Run.create_or_open("held", "tiny", root=tmp_path)
    loaded = SimpleNamespace(model=None, tokenizer=None, fingerprint={"digest": "abc"})
    config = ev.EvalConfig(methods=["none"], benchmarks=["ipip300-test", "ipip120"], scorers=["statement"])
    held = ev.ensure_validity(run, loaded, "ipip300-test", "statement", config, log=lambda m: None)
    same = ev.ensure_validity(run, loaded, "ipip120", "statement", config, log=lambda m: None)
    assert seen == ["ipip300-train", "ipip120"]
    assert set(held["instrument"]) == {"ipip300-test"} and set(held["items"]) == {"ipip300-train"}
    assert set(same["items"]) == {"ipip120"}
    assert instruments.held_out("ipip300-test") and not instruments.held_out("ipip120")


def test_paper_table_marks_the_held_out_columns():
    rows = []
    for bench in ("ipip300-test", "ipip120"):
        for method, delta in (("none", float("nan")), ("dpnle", 0.2)):
            rows.append({"concept": "openness", "benchmark": bench, "scorer": "statement", "dimension": "openness",
                         "condition": method if method == "none" else "dpnle-up-g1", "method": method,
                         "direction": "-" if method == "none" else "up", "gamma": 0.0 if method == "none" else 1.0,
                         "seed": 0, "num_neurons": 0 if method == "none" else 10, "mean": 3.0, "n": 5,
                         "chance": float("nan"), "delta": delta, "ci_low": delta - 0.1, "ci_high": delta + 0.1,
                         "target": True, "valid": 1.0})
    table = ev.paper_table(pd.DataFrame(rows), kind="personality")
    assert "ipip300-test/statement held-out up" in table.columns
    assert "ipip120/statement up" in table.columns
