"""JSON-lines files of examples: one object per line with ``prompt``, ``answer`` and ``task``.

Extra keys (``input`` for generated examples) are kept. Blank lines are skipped on reading.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from .base import Example
from .suite import get_task

REQUIRED_KEYS = ("prompt", "answer")


def _record(item: Example | Mapping) -> dict:
    record = item.to_dict() if isinstance(item, Example) else dict(item)
    for key in REQUIRED_KEYS:
        if not isinstance(record.get(key), str):
            raise ValueError(f"example needs a string {key!r}: {record!r}")
    return record


def write_jsonl(path: str | Path, examples: Iterable[Example | Mapping]) -> int:
    """Write examples (``Example`` objects or dicts) as JSON lines; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for item in examples:
            f.write(json.dumps(_record(item), ensure_ascii=False) + "\n")
            count += 1
    return count


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for each non-blank line; a line that is not JSON raises
    ``ValueError`` naming it."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file of examples; a bad line raises ``ValueError`` naming it."""
    records = []
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object, got "
                             f"{type(record).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise ValueError(f"{path}, line {lineno}: missing key(s) {', '.join(missing)}")
        for key in REQUIRED_KEYS:
            if not isinstance(record[key], str):
                raise ValueError(f"{path}, line {lineno}: {key!r} must be a string")
        records.append(record)
    return records


def export(task_names: str | Iterable[str], split: str, n: int, path: str | Path) -> int:
    """Write ``n`` examples of ``split`` for each named task, task after task, to one file."""
    names = [task_names] if isinstance(task_names, str) else list(task_names)
    tasks = [get_task(name) for name in names]  # validate every name before writing
    return write_jsonl(path, (ex for task in tasks for ex in task.examples(split, n)))
