"""The progress display: counts, rates that ignore reused work, and inner-pass lines."""

from __future__ import annotations

import re

from dpnle.progress import Progress, subtask


def test_counts_every_unit_and_rates_only_timed_ones():
    bar = Progress("openness: conditions", 3, enabled=True, unit="condition")
    with bar:
        bar.advance(timed=False)  # reused: counted, no rate yet
        task = bar._progress.tasks[0]
        assert task.completed == 1 and task.fields["rate"] == ""
        bar.advance()
        bar.advance()
        assert task.completed == 3 and task.fields["rate"].endswith("s/condition, ~0 min left")
    assert bar._progress is None
    with Progress("off", 2, enabled=False) as off:  # disabled: a no-op that still counts
        off.advance()
    assert off.completed == 1 and off._progress is None


def test_throughput_rate_and_resumed_units():
    with Progress("capture", 10, done=4) as bar:
        task = bar._progress.tasks[0]
        assert task.completed == 4 and task.fields["rate"] == ""  # resumed: on the bar, not in the rate
        bar.advance(3, tokens=300)
        assert task.completed == 7
        rate = task.fields["rate"]
        match = re.fullmatch(r"([\d,.]+) samples/s  ([\d,]+) tok/s", rate)
        assert match, rate
        samples_per_s = float(match.group(1).replace(",", ""))
        tokens_per_s = float(match.group(2).replace(",", ""))
        # 100 tokens per sample: the two rates agree up to rounding.
        assert abs(tokens_per_s - 100 * samples_per_s) <= 0.5 + 100 * 0.05 + 1e-9 * tokens_per_s


def test_remaining_time_counts_units_left():
    bar = Progress("x", 5, unit="condition")
    bar._start -= 120.0  # two minutes in
    bar.advance(2)  # 60 s each, 3 left: ~3 min
    assert bar.rate().startswith("60.0 s/condition") and bar.rate().endswith("~3 min left")


def test_subtask_adds_a_line_under_the_open_bar_and_removes_it():
    with Progress("openness: conditions", 2, unit="condition") as bar:
        with subtask("GSM8K answers", 8) as advance:
            tasks = bar._progress.tasks
            assert [t.description.strip() for t in tasks] == ["openness: conditions", "GSM8K answers"]
            advance(3)
            advance(5)
            inner = tasks[1]
            assert inner.completed == 8 and inner.total == 8 and inner.fields["rate"].endswith("items/s")
        assert len(bar._progress.tasks) == 1
    # Outside a bar, or under a disabled one, the inner pass reports to nothing.
    with subtask("judge", 4) as advance:
        advance(4)
    with Progress("off", 1, enabled=False), subtask("judge", 4) as advance:
        advance(2)

