"""The rule a config field's value must follow, written on the field itself: `one_of`, `in_range`, `at_least`,
`above`, `plain_name` return a dataclass field whose metadata holds the rule (OneOf, Range, PlainName). The stage
specs (harness.core.spec) carry them on their own fields; the table config's schema (harness.plan.schema) on the keys
it adds; harness.plan.config checks them all with one walk (check_fields), each message naming the key."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import inf
from typing import Any, Optional, Tuple

from omegaconf import MISSING

RULE = "rule"  # the metadata key that holds a field's rule (OneOf, Range or PlainName)
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class OneOf:
    """The value is one of `allowed`."""
    allowed: Tuple[str, ...]

    def problem(self, key: str, value) -> Optional[str]:
        return None if value in self.allowed else f"{key}={value!r}: must be one of {', '.join(self.allowed)}"


@dataclass(frozen=True)
class Range:
    """The value lies between lo and hi, each included or not as `brackets` say ('[)': lo <= value < hi); NaN lies
    outside unless allow_nan; None (an optional field left unset) is not checked. Said as an interval ('in [0, 1)',
    'in (0, inf)') or, with `bound`, as a bound on lo ('>= 1', '> 0')."""
    lo: float
    hi: float = inf
    brackets: str = "[]"
    bound: bool = False
    allow_nan: bool = False
    note: str = ""  # shown after the rule, in parentheses

    def holds(self, v) -> bool:
        if v != v:
            return self.allow_nan
        lo_open, hi_open = self.brackets[0] == "(", self.brackets[1] == ")"
        return (v > self.lo if lo_open else v >= self.lo) and (v < self.hi if hi_open else v <= self.hi)

    def problem(self, key: str, value) -> Optional[str]:
        if value is None or self.holds(value):
            return None
        said = f"{'>' if self.brackets[0] == '(' else '>='} {self.lo}" if self.bound else \
            f"in {self.brackets[0]}{self.lo}, {self.hi}{self.brackets[1]}"
        return f"{key}={value} must be {said}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class PlainName:
    """The value becomes a path component (results/<table>/<profile>/, report figures): a plain name, no '/' or '..'."""

    def problem(self, key: str, value) -> Optional[str]:
        if isinstance(value, str) and NAME.fullmatch(value) and ".." not in value:
            return None
        return f"{key}={value!r}: must be a plain name ([A-Za-z0-9_.-], not starting with '.' or '-', no '..', no '/')"


def one_of(*allowed: str, default: Any):
    """A field whose value must be one of `allowed`."""
    return field(default=default, metadata={RULE: OneOf(allowed)})


def in_range(lo: float, hi: float, brackets: str, *, default: Any):
    """A field whose value must lie in the interval lo..hi, `brackets` saying which ends it includes."""
    return field(default=default, metadata={RULE: Range(lo, hi, brackets)})


def at_least(lo: float, *, default: Any, allow_nan: bool = False):
    """A field whose value must be >= lo (allow_nan: NaN passes)."""
    return field(default=default, metadata={RULE: Range(lo, inf, "[)", bound=True, allow_nan=allow_nan)})


def above(lo: float, *, default: Any, note: str = ""):
    """A field whose value must be > lo; `note` follows the rule in its message."""
    return field(default=default, metadata={RULE: Range(lo, inf, "()", bound=True, note=note)})


def plain_name(*, default: Any = MISSING):
    """A field whose value becomes a path component: a plain name."""
    return field(default=default, metadata={RULE: PlainName()})
