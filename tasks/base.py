"""The task data model: a task is a sampler of inputs, a solver, paraphrases and a metric.

Determinism and splits:

- Each split of a task draws from its own ``random.Random`` seeded with the sha256 of
  ``(task name, split)``, so the examples are the same in every process and run (Python's
  ``hash()`` is salted per process and is never used).
- Which split an input belongs to is a function of the **input string alone**
  (:func:`split_of`: sha256 of the input, 20% test, 10% validation, 70% train). A split's
  sampler rejects inputs of the other splits, so the splits are disjoint by input however
  many examples are asked for, and an input that two tasks share (e.g. the same written date
  for ``date_iso`` and ``date_us``) sits in the same split of both.
- Within a split the inputs are distinct. ``examples(split, n)[:m] == examples(split, m)``.
  When a task's input space for a split runs out (about 5,000 draws in a row produce nothing
  new), validation and test raise ``ValueError``; train goes on with repeated inputs.
- The answer is ``task.solve(input)``: a function of the input text, so one input never
  carries two answers.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .metrics import exact_match

SPLITS = ("train", "validation", "test")
_TEST_PERCENT, _VALIDATION_PERCENT = 20, 10
_MAX_MISSES = 5000  # consecutive draws with no new input before a split counts as exhausted
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def stable_int(*parts: str) -> int:
    """A 64-bit integer from sha256 of the parts: the same in every process."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def split_of(text: str) -> str:
    """The split an input string belongs to, for every task."""
    bucket = stable_int("split", text) % 100
    if bucket < _TEST_PERCENT:
        return "test"
    if bucket < _TEST_PERCENT + _VALIDATION_PERCENT:
        return "validation"
    return "train"


@dataclass(frozen=True)
class Example:
    task: str
    input: str
    prompt: str  # one of the task's paraphrases with the input filled in
    answer: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Task:
    """One generated text-to-text task.

    ``sample(rng)`` draws an input string; ``solve(input)`` gives its answer; each of
    ``templates`` holds ``{input}`` once and becomes a prompt; ``metric(prediction, answer)``
    scores in [0, 1]. ``related`` names the held-in tasks a held-out task resembles.
    """

    name: str
    description: str
    templates: tuple[str, ...]
    sample: Callable[[random.Random], str]
    solve: Callable[[str], str]
    held_out: bool = False
    metric: Callable[[str, str], float] = exact_match
    related: tuple[str, ...] = ()

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"task name {self.name!r} must be lowercase letters, digits, - or _")
        if not self.description.strip():
            raise ValueError(f"task {self.name!r} needs a description")
        if len(self.templates) < 3 or len(set(self.templates)) != len(self.templates):
            raise ValueError(f"task {self.name!r} needs at least 3 distinct templates")
        for template in self.templates:
            if template.count("{input}") != 1:
                raise ValueError(
                    f"task {self.name!r}: template {template!r} must hold {{input}} once")

    def prompt(self, text: str, paraphrase: int = 0) -> str:
        """The prompt for an input with the given paraphrase."""
        return self.templates[paraphrase].replace("{input}", text)

    def score(self, prediction: str, answer: str) -> float:
        return self.metric(prediction, answer)

    def examples(self, split: str, n: int) -> list[Example]:
        """The first ``n`` examples of ``split`` (deterministic; see the module docstring)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(stable_int("examples", self.name, split))
        out: list[Example] = []
        seen: set[str] = set()
        misses, exhausted = 0, False
        while len(out) < n:
            text = self.sample(rng)
            if split_of(text) != split or (text in seen and not exhausted):
                misses += 1
                if misses >= _MAX_MISSES:
                    if split != "train" or not seen:
                        raise ValueError(
                            f"task {self.name!r} has only about {len(seen)} distinct {split} "
                            f"inputs; asked for {n}")
                    exhausted, misses = True, 0
                continue
            misses = 0
            seen.add(text)
            paraphrase = rng.randrange(len(self.templates))
            out.append(Example(self.name, text, self.prompt(text, paraphrase), self.solve(text)))
        return out
