import math

import pytest

from dpnle.concepts import (
    HIGHER_ORDER_GROUPS,
    TRAITS,
    VALUES,
    UnknownConceptError,
    circumplex_distance,
    get_concept,
    resolve_concepts,
)


def test_resolve_orders_and_deduplicates():
    got = resolve_concepts(["openness", "Openness"], ["power"], all_traits=True)
    assert [c.name for c in got] == ["openness", "power", "conscientiousness", "extraversion",
                                    "agreeableness", "neuroticism"]


def test_unknown_concept_lists_valid_names():
    with pytest.raises(UnknownConceptError) as err:
        get_concept("opennes")
    message = str(err.value)
    assert all(t in message for t in TRAITS) and "self_direction" in message


def test_trait_passed_as_value_is_refused():
    with pytest.raises(UnknownConceptError, match="--trait"):
        resolve_concepts(values=["openness"])


def test_circumplex_distance():
    # Ten evenly spaced values: neighbours are 36 degrees apart, opposite ones 180.
    assert circumplex_distance("power", "power") == 0
    assert circumplex_distance("conformity", "tradition") == pytest.approx(0.2)
    assert circumplex_distance("self_direction", "universalism") == pytest.approx(0.2)
    assert circumplex_distance("self_direction", "security") == pytest.approx(1.0)
    for a in VALUES:
        for b in VALUES:
            angle = abs(VALUES.index(a) - VALUES.index(b)) * 2 * math.pi / 10
            assert circumplex_distance(a, b) == pytest.approx(min(angle, 2 * math.pi - angle) / math.pi)


def test_higher_order_groups_partition_values():
    members = [v for group in HIGHER_ORDER_GROUPS.values() for v in group]
    assert sorted(members) == sorted(VALUES)
