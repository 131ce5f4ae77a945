"""The machinery of the notebooks' exercise checks.

A learner fills in an answer and calls the check; it says whether the answer is right and, if
not, gives a hint. With ``strict=True`` (notebooks pass ``SHOW_SOLUTIONS``) a wrong answer raises,
so the instructors' solution edition doubles as a test of the exercise itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ExerciseFailed(AssertionError):
    """A solution that did not pass its own check (raised in strict mode only)."""


@dataclass
class ExerciseResult:
    passed: bool
    message: str

    def __str__(self) -> str:
        return ("✅ " if self.passed else "❌ ") + self.message

    def _repr_markdown_(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return str(self)


def _verdict(passed: bool, ok: str, hint: str, strict: bool) -> ExerciseResult:
    result = ExerciseResult(passed, ok if passed else hint)
    if strict and not passed:
        raise ExerciseFailed(result.message)
    return result


def _not_attempted(answer: Any, strict: bool) -> ExerciseResult | None:
    if answer is None:
        return _verdict(False, "", "Not attempted yet: replace `None` with your answer and run the cell again.", strict)
    return None


def check_value(
    answer: Any, expected: Any, ok: str, hint: str, strict: bool = False,
    equal: Callable[[Any, Any], bool] = lambda a, b: bool(a == b),
) -> ExerciseResult:
    """A generic check for exercises whose answer is one value; stages build their checks on it."""
    if (skip := _not_attempted(answer, strict)) is not None:
        return skip
    return _verdict(equal(answer, expected), ok, hint, strict)
