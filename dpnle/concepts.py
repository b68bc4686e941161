"""The concepts dpnle localizes: the Big Five traits and Schwartz's ten basic values."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpnle.errors import DpnleError

TRAITS: tuple[str, ...] = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")

# Circumplex order (Schwartz 1992): evenly spaced angles, conformity and tradition adjacent.
VALUES: tuple[str, ...] = (
    "self_direction",
    "stimulation",
    "hedonism",
    "achievement",
    "power",
    "security",
    "conformity",
    "tradition",
    "benevolence",
    "universalism",
)

VALUE_ABBREVIATIONS: dict[str, str] = {
    "self_direction": "SD",
    "stimulation": "ST",
    "hedonism": "HE",
    "achievement": "AC",
    "power": "PO",
    "security": "SE",
    "conformity": "CO",
    "tradition": "TR",
    "benevolence": "BE",
    "universalism": "UN",
}

HIGHER_ORDER_GROUPS: dict[str, tuple[str, ...]] = {
    "openness_to_change": ("self_direction", "stimulation", "hedonism"),
    "self_enhancement": ("achievement", "power"),
    "conservation": ("security", "conformity", "tradition"),
    "self_transcendence": ("benevolence", "universalism"),
}

ALL_CONCEPTS: tuple[str, ...] = TRAITS + VALUES


@dataclass(frozen=True)
class Concept:
    name: str
    kind: str  # "trait" | "value"

    @property
    def title(self) -> str:
        return self.name.replace("_", " ").title()


class UnknownConceptError(ValueError, DpnleError):
    pass


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def get_concept(name: str) -> Concept:
    key = _normalize(name)
    if key in TRAITS:
        return Concept(key, "trait")
    if key in VALUES:
        return Concept(key, "value")
    raise UnknownConceptError(
        f"Unknown concept {name!r}. Traits (--trait): {', '.join(TRAITS)}. "
        f"Values (--value): {', '.join(VALUES)}."
    )


def resolve_concepts(
    traits: list[str] | None = None,
    values: list[str] | None = None,
    all_traits: bool = False,
    all_values: bool = False,
) -> list[Concept]:
    """Turn the CLI's --trait/--value/--all-* options into an ordered, de-duplicated list."""
    out: list[Concept] = []
    for name in traits or []:
        c = get_concept(name)
        if c.kind != "trait":
            raise UnknownConceptError(f"{name!r} is a Schwartz value: pass it with --value, not --trait.")
        out.append(c)
    for name in values or []:
        c = get_concept(name)
        if c.kind != "value":
            raise UnknownConceptError(f"{name!r} is a Big Five trait: pass it with --trait, not --value.")
        out.append(c)
    if all_traits:
        out.extend(Concept(t, "trait") for t in TRAITS)
    if all_values:
        out.extend(Concept(v, "value") for v in VALUES)
    seen: set[str] = set()
    unique = []
    for c in out:
        if c.name not in seen:
            seen.add(c.name)
            unique.append(c)
    return unique


def circumplex_distance(a: str, b: str) -> float:
    """Angular distance between two values on the circumplex, divided by pi (0 = same, 1 = opposite)."""
    i, j = VALUES.index(a), VALUES.index(b)
    step = 2 * math.pi / len(VALUES)
    delta = abs(i - j) * step
    delta = min(delta, 2 * math.pi - delta)
    return delta / math.pi


def higher_order_group(value: str) -> str:
    for group, members in HIGHER_ORDER_GROUPS.items():
        if value in members:
            return group
    raise UnknownConceptError(f"{value!r} is not a Schwartz value")


def cli_flag(name: str) -> str:
    """How the command line names a concept: ``--trait openness`` or ``--value power``."""
    concept = get_concept(name)
    return f"--{concept.kind} {concept.name}"
