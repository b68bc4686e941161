"""dpnle's one base exception class (no heavy imports: the CLI catches it before torch loads).

Every error that describes bad input or state, with a message that names the fix, derives from
:class:`DpnleError` as well as from its builtin base (``ValueError`` for a bad argument,
``RuntimeError`` for a missing or damaged artifact), so ``except DpnleError`` catches all of
them and ``except ValueError`` callers keep working:

- :class:`InputError` (ValueError; also importable from :mod:`dpnle.runs`): a parameter value
  that cannot work;
- :class:`dpnle.runs.ArtifactError` (RuntimeError): an artifact is missing, corrupt or foreign;
- :class:`dpnle.pairs.PairsError`, :class:`dpnle.concepts.UnknownConceptError`,
  :class:`dpnle.arch.UnsupportedModelError`, :class:`dpnle.capability.CapabilityError` (ValueError);
- :class:`dpnle.models.ModelLoadError`, :class:`dpnle.datasets.DatasetError`,
  :class:`dpnle.judges.JudgeError` (RuntimeError); :class:`dpnle.evaluate.EvalError` (an InputError).

The command line shows any of them as one ``error: ...`` line and exits with status 2.
"""

from __future__ import annotations


class DpnleError(Exception):
    """Base of dpnle's user-facing errors: bad input or state, with a message that names the fix."""


class InputError(ValueError, DpnleError):
    """A parameter value that cannot work (out of range, unknown name); the message names the fix."""
