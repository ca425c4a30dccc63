"""`trainer.mode`: a research variant as its write-up published it, or with the project's corrections.

The research trainers (`hierarchical`, `temporal_ortho`, `adaptive_ortho`) each follow one experiment
write-up (see docs/research-variants.md). Each has

- ``trainer.mode=published``: the write-up's method as written (formula, coefficients, units,
  schedule, base SAE); where the write-up is silent or ambiguous, the module docstring says which
  reading was taken and cites the write-up's lines;
- ``trainer.mode=corrected`` (the default): the project's corrections.

Every correction is its own trainer key whose default is null. Null takes the mode's value; an
explicit value overrides it, so ``trainer.mode=published trainer.l1_end_frac=0.1`` is the
published method with one correction. Each key's `Correction` holds both values and the reason;
the module docstring and docs/research-variants.md say what was broken or infeasible, and how measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Optional, Sequence

from sae_sweep.config import choice, setting

MODES = ("corrected", "published")


@dataclass(frozen=True)
class Correction:
    """One departure from a write-up: its value in each mode, and why the project's differs."""

    published: Any
    corrected: Any
    reason: str


def mode_setting() -> Any:
    """The `mode` field every research trainer's params dataclass declares."""
    return choice("corrected", MODES)


def by_mode(
    table: Mapping[str, Correction],
    name: str,
    allowed: str,
    check: Optional[Callable[[Any], bool]] = None,
    options: Optional[Sequence[Any]] = None,
) -> Any:
    """A params field whose null default takes ``trainer.mode``'s value from ``table[name]``.

    ``options`` makes it an enumeration (``allowed`` then lists them); ``check`` a range."""
    c = table[name]
    if options is not None:
        options = tuple(options)
        allowed = "one of: " + ", ".join(map(str, options))
        check = options.__contains__
    return setting(
        None,
        allowed=f"null (trainer.mode decides: published {c.published!r}, corrected {c.corrected!r}) or {allowed}",
        check=check,
    )


def resolve(params: Any, table: Mapping[str, Correction]) -> SimpleNamespace:
    """The effective value of every correction key: the explicit one, else the mode's."""
    mode = params.mode
    out = {}
    for name, c in table.items():
        value = getattr(params, name)
        out[name] = getattr(c, mode) if value is None else value
    return SimpleNamespace(**out)
