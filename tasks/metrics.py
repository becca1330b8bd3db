"""Scoring a model's prediction against a task's answer.

The scoring rule (the same for every task):

1. strip leading and trailing whitespace from the prediction;
2. keep only its **first line** (a model may go on chatting after the answer);
3. collapse runs of whitespace to one space and strip again;
4. drop **one** trailing period, if there is one (``"2:30 PM."`` scores like ``"2:30 PM"``).

The answer goes through the same normalisation, then the two strings are compared exactly,
case-sensitively (:func:`exact_match`) or, for classification labels, after casefolding
(:func:`exact_match_ci`). No other cleanup happens: quotes, a leading ``"Answer:"`` or a
different number format count as wrong.
"""

from __future__ import annotations


def normalize(text: str) -> str:
    """The first line of ``text``, whitespace-collapsed, without one trailing period."""
    lines = text.strip().splitlines()
    first = " ".join(lines[0].split()) if lines else ""
    if first.endswith("."):
        first = first[:-1].rstrip()
    return first


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer (case-sensitive)."""
    return float(normalize(prediction) == normalize(answer))


def exact_match_ci(prediction: str, answer: str) -> float:
    """Like :func:`exact_match`, ignoring case (used for classification labels)."""
    return float(normalize(prediction).casefold() == normalize(answer).casefold())
