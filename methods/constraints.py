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


def _with_note(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


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
    ``kind`` replaces the leading "a number" / "an integer" (e.g. ``"a probability"``); ``note`` is appended in
    parentheses (e.g. ``"0: no cap"``).
    """

    param: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    kind: str = ""
    note: str = ""

    def expected(self) -> str:
        kind = self.kind or ("an integer" if self.integer else "a number")
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        else:
            text = f"{kind} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return _with_note(text, self.note)

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` satisfies the rule."""
        if value is None and self.optional:
            return True
        ok = _is_number(value) and (not self.integer or isinstance(value, numbers.Integral))
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        return ok

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        if not self.accepts(value):
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
    """``param`` is one of ``choices``; ``note`` is appended to the expected form in parentheses."""

    param: str
    choices: tuple[Any, ...]
    note: str = ""

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        if value not in self.choices:
            raise ConstraintError(prefix + self.param, _with_note(f"one of {list(self.choices)}", self.note), value)


@dataclass(frozen=True)
class NotBelow(Constraint):
    """``param`` >= ``other`` (e.g. the final EMA momentum is not below the first); the error names ``param``.

    ``exempt``: values of ``param`` always allowed (e.g. 0 for "auto"). ``expected`` may name ``{other}`` (its key
    in the caller's namespace) and ``{bound}`` (its value).
    """

    param: str
    other: str
    exempt: tuple[Any, ...] = ()
    expected: str = ">= {other} ({bound})"

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param, self.other)

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value, other = kwargs.get(self.param), kwargs.get(self.other)
        if _is_number(value) and _is_number(other) and value < other and value not in self.exempt:
            raise ConstraintError(prefix + self.param, self.expected.format(other=prefix + self.other, bound=other), value)


@dataclass(frozen=True)
class BoundedBy(Constraint):
    """``param`` is a number in [``low``, the value of ``bound``] (e.g. warm-up epochs within the epochs).

    ``optional``: None is allowed; ``note`` is appended to the expected form in parentheses.
    """

    param: str
    bound: str
    low: float = 0.0
    optional: bool = False
    note: str = ""

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param, self.bound)

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value, bound = kwargs.get(self.param), kwargs.get(self.bound)
        if (value is None and self.optional) or not _is_number(bound):
            return
        if not (_is_number(value) and self.low <= value <= bound):
            expected = f"a number in [{_fmt(self.low)}, {prefix}{self.bound}={bound}]"
            raise ConstraintError(prefix + self.param, _with_note(expected, self.note), value)


@dataclass(frozen=True)
class ListOf(Constraint):
    """``param`` is a list (or tuple) of ``length`` items that each satisfy ``item``; ``expected`` is the text."""

    param: str
    length: int
    item: InRange
    expected: str

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == self.length
        if not (ok and all(self.item.accepts(v) for v in value)):
            raise ConstraintError(prefix + self.param, self.expected, value)


@dataclass(frozen=True)
class StorageUri(Constraint):
    """``param`` is a local path or ``s3://bucket/prefix`` (any other ``scheme://`` is refused).

    ``required``: it must be a non-empty string; otherwise an unset value (None, "") passes.
    """

    param: str
    required: bool = False

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        ok = isinstance(value, str) and value != "" if self.required else True
        if ok and isinstance(value, str) and "://" in value:
            ok = value.startswith("s3://") and len(value) > 5
        if not ok:
            raise ConstraintError(prefix + self.param, "a local path or s3://bucket/prefix", value)


@dataclass(frozen=True)
class RequiredWhen(Constraint):
    """``param`` is set (:func:`is_set`) when ``other`` is one of ``values``.

    ``expected`` may name ``{other}`` (its key in the caller's namespace), ``{value}`` (its value) and ``{values}``.
    """

    param: str
    other: str
    values: tuple[Any, ...]
    expected: str = "set when {other} is one of {values}"

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param, self.other)

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        other = kwargs.get(self.other)
        if other in self.values and not is_set(kwargs.get(self.param)):
            expected = self.expected.format(other=prefix + self.other, value=other, values=list(self.values))
            raise ConstraintError(prefix + self.param, expected, kwargs.get(self.param))


@dataclass(frozen=True)
class UnsetUnless(Constraint):
    """``param`` is left unset (not :func:`is_set`) unless ``other`` is one of ``values``."""

    param: str
    other: str
    values: tuple[Any, ...]

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param, self.other)

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        if is_set(value) and kwargs.get(self.other) not in self.values:
            expected = f"unset unless {prefix}{self.other} is one of {list(self.values)}"
            raise ConstraintError(prefix + self.param, expected, value)


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
