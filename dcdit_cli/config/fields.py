"""Typed fields with their allowed values declared on the field: the machinery of the recipe schema.

``bounded("[1, inf)", 32)`` declares a numeric field and its range in interval notation (floats
must also be finite, integers fit 64 bits, as TOML's do); ``one_of("dcdit", "dit")`` a string
field and its choices. :func:`check_value` coerces a parsed value to a field's type and
:func:`field_problem` names the constraint it breaks; ``recipe.py`` declares the sections with
them and adds the constraints between fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin


@dataclass(frozen=True)
class Interval:
    """A range in interval notation: "[1, inf)", "(0, 1]", "[0, 2**63)" (for a list: each item)."""

    text: str

    def bounds(self) -> tuple[float, bool, float, bool]:
        lo, hi = (_number(v.strip()) for v in self.text[1:-1].split(","))
        return lo, self.text[0] == "[", hi, self.text[-1] == "]"

    def contains(self, value: float) -> bool:
        lo, lo_in, hi, hi_in = self.bounds()
        return (lo < value or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))


def _number(text: str) -> float:
    """'inf', '-1', '0.5' or a power such as '2**63'."""
    if text.lstrip("-") == "inf":
        return -math.inf if text.startswith("-") else math.inf
    if "**" in text:
        base, exp = text.split("**")
        return float(int(base) ** int(exp))
    return float(text)


def bounded(interval: str, default=dataclasses.MISSING, *, factory=dataclasses.MISSING):
    """A numeric field whose value (or every item of it) must lie in ``interval``."""
    return field(default=default, default_factory=factory, metadata={"range": Interval(interval)})


def one_of(*options: str):
    """A string field taking one of ``options``; the first is the default."""
    return field(default=options[0], metadata={"choices": options})


def any_of(*options: str):
    """A list-of-strings field whose items are each one of ``options``; empty by default."""
    return field(default_factory=list, metadata={"choices": options})


def field_problem(key: str, value: Any, meta) -> str | None:
    """The constraint a field's (type-checked) value breaks, or None."""
    if "choices" in meta:
        for v in value if isinstance(value, list) else [value]:
            if v not in meta["choices"]:
                return f"{key}: {v!r} is not one of {', '.join(meta['choices'])}{suggest(str(v), meta['choices'])}"
    if "range" in meta:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not -(2**63) <= v < 2**63:
                return f"{key}: {v} does not fit a 64-bit integer (TOML's integers): give a value in {meta['range'].text}"
            if isinstance(v, float) and not math.isfinite(v):
                return f"{key}: {v} is not a finite number: give a value in {meta['range'].text}"
            if not meta["range"].contains(v):
                return f"{key}: {v!r} is outside {meta['range'].text}: give a value in that range"
    return None


def suggest(word: str, options, aliases: dict[str, str] | None = None) -> str:
    """' (did you mean ...?)' for a misspelt ``word``: an alias from another codebase, else the
    closest option, else the list of options."""
    if aliases and aliases.get(word) in options:
        return f" (did you mean '{aliases[word]}'?)"
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def check_value(key: str, value: Any, tp) -> tuple[Any, str | None]:
    """(value coerced to the type ``tp``, the problem or None): ints stay exact, bools are not numbers."""
    if get_origin(tp) is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            return value, f"{key}: expected a list of {type_name(item_tp)}, got {value!r}"
        out = []
        for v in value:
            coerced, problem = check_value(key, v, item_tp)
            if problem:
                return value, f"{key}: expected a list of {type_name(item_tp)}, got {value!r}"
            out.append(coerced)
        return out, None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
    elif isinstance(value, tp):
        return value, None
    return value, f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}"
