"""A count that cannot mean what it says is refused, never read as "all items"."""

from __future__ import annotations

import pytest

from dpnle.capability import CapabilityError, select_subset


@pytest.mark.parametrize("limit", [0, -5])
def test_a_capability_limit_below_one_is_refused(limit):
    items = list(range(3))
    with pytest.raises(CapabilityError, match=rf"limit must be at least 1 \(None for all items\), not {limit}"):
        select_subset(items, "gsm8k", limit)
    with pytest.raises(CapabilityError):
        select_subset([], "gsm8k", limit)  # no items to fall back on: still refused
    assert select_subset(items, "gsm8k", None) == items and len(select_subset(items, "gsm8k", 2)) == 2
