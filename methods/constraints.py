"""Constraints a method declares on its keyword arguments, checked before anything is built.

A method lists them in :attr:`methods.base.SSLMethod.constraints`; :meth:`methods.base.SSLMethod.check_kwargs`
applies them to the keyword arguments merged over the constructor's defaults, so a caller (the platform's spec
validation, a notebook) learns of a bad value before it spends anything on building or training. Each failure is
a :class:`ConstraintError` naming the key, the expected form and the value seen; ``prefix`` puts the keys into
the caller's namespace (``"method."`` for a spec).

Plain Python (no torch): the rules are data, the same for every caller.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ConstraintError(ValueError):
    """A keyword argument breaks a declared constraint: ``key``, what was ``expected`` and the value ``seen``."""

    def __init__(self, key: str, expected: str, seen: Any):
        self.key, self.expected, self.seen = key, expected, seen
        super().__init__(f"{key}: expected {expected}, got {seen!r}")


def is_set(value: Any) -> bool:
    """A value that asks for something: not None, False, 0 or an empty string."""
    return value is not None and value is not False and value != "" and not (isinstance(value, int) and value == 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(bound: float) -> str:
    return f"{bound:g}" if float(bound).is_integer() else f"{bound}"


class Constraint:
    """One rule on keyword arguments; ``params`` names those it reads (by default its one ``param``)."""

    param: str

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param,)

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        """Raise :class:`ConstraintError` if ``kwargs`` (complete: defaults filled in) break the rule."""
        raise NotImplementedError


@dataclass(frozen=True)
class InRange(Constraint):
    """``param`` is a number (an integer if ``integer``) between ``low`` and ``high``; open ends excluded.

    Expected forms: ``a number in (0, 1)``, ``a number in [0, 1]``, ``a number > 0``, ``an integer >= 1``.
    ``optional``: None is allowed (meaning "derive it", e.g. a width taken from another setting).
    """

    param: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def expected(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        return f"{kind} {'<' if self.high_open else '<='} {_fmt(self.high)}"

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        if value is None and self.optional:
            return
        ok = _is_number(value) and (not self.integer or isinstance(value, numbers.Integral))
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ConstraintError(prefix + self.param, self.expected(), value)


def open_unit_interval(param: str) -> InRange:
    """A fraction strictly between 0 and 1 (e.g. a mask ratio)."""
    return InRange(param, 0.0, 1.0, low_open=True, high_open=True)


def unit_interval(param: str) -> InRange:
    """A probability or momentum in [0, 1]."""
    return InRange(param, 0.0, 1.0)


def positive(param: str) -> InRange:
    """A number > 0 (e.g. a temperature)."""
    return InRange(param, 0.0, low_open=True)


def positive_int(param: str, *, optional: bool = False) -> InRange:
    """An integer >= 1 (a width, a depth, a count)."""
    return InRange(param, 1, integer=True, optional=optional)


@dataclass(frozen=True)
class RangePair(Constraint):
    """``param`` is ``[min, max]`` with ``low <= min <= max <= high`` (e.g. a scale or aspect-ratio range)."""

    param: str
    low: float
    high: float

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        pair = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
        ok = pair is not None and len(pair) == 2 and all(_is_number(v) for v in pair)
        if not (ok and self.low <= pair[0] <= pair[1] <= self.high):
            raise ConstraintError(prefix + self.param, f"[min, max] with {self.low} <= min <= max <= {self.high}", pair if ok else value)


@dataclass(frozen=True)
class OneOf(Constraint):
    """``param`` is one of ``choices``."""

    param: str
    choices: tuple[Any, ...]

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        if value not in self.choices:
            raise ConstraintError(prefix + self.param, f"one of {list(self.choices)}", value)


@dataclass(frozen=True)
class NotBelow(Constraint):
    """``param`` >= ``other`` (e.g. the final EMA momentum is not below the first); the error names ``param``."""

    param: str
    other: str

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param, self.other)

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value, other = kwargs.get(self.param), kwargs.get(self.other)
        if _is_number(value) and _is_number(other) and value < other:
            raise ConstraintError(prefix + self.param, f">= {prefix}{self.other} ({other})", value)


@dataclass(frozen=True)
class RequiresAny(Constraint):
    """At least one of ``any_of`` is set (:func:`is_set`); the error names the first, with ``expected`` as the text.

    ``expected`` may refer to the caller's namespace as ``{prefix}`` (e.g. ``"... or {prefix}pretrained=true"``).
    """

    any_of: tuple[str, ...]
    expected: str

    @property
    def params(self) -> tuple[str, ...]:
        return self.any_of

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        if not any(is_set(kwargs.get(p)) for p in self.any_of):
            first = self.any_of[0]
            raise ConstraintError(prefix + first, self.expected.format(prefix=prefix), kwargs.get(first))
