"""Deterministic generated text-to-text tasks for building and evaluating a library.

Held-in tasks (``HELD_IN``) each get an adapter; held-out tasks (``HELD_OUT``) have none and
resemble held-in ones (``Task.related``), so routing to a related adapter can help.

>>> task = get_task("date_iso")
>>> ex = task.examples("test", 1)[0]          # Example(task, input, prompt, answer)
>>> task.score("2021-03-05\\nAnything after the first line is ignored.", "2021-03-05")
1.0

Splits are seeded by (task name, split) and disjoint by input (see :mod:`.base`); scoring
keeps the prediction's first line, collapses whitespace and drops one trailing period (see
:mod:`.metrics`).
"""

from .base import SPLITS, Example, Task, split_of
from .jsonl import export, iter_jsonl, read_jsonl, write_jsonl
from .metrics import exact_match, exact_match_ci, normalize
from .suite import HELD_IN, HELD_OUT, TASKS, get_task

__all__ = ["HELD_IN", "HELD_OUT", "SPLITS", "TASKS", "Example", "Task", "exact_match",
           "exact_match_ci", "export", "get_task", "iter_jsonl", "normalize", "read_jsonl", "split_of",
           "write_jsonl"]
