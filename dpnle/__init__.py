"""dpnle: find the MLP neurons that carry a personality trait or a human value, edit them,
and measure what the edit does to the target and to everything else."""

__version__ = "0.1.0"
