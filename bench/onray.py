"""The quality benchmark's work as Ray tasks (``--ray``): what the workers share.

A worker gets plain data — the base model's name or Hugging Face directory, the library's
location (a directory on one machine, the team library's URL across machines), adapter names
and settings — loads the base model once per worker process, opens the library itself and runs
the same function the local run calls. With the same thread count the results are the local
run's (tested); the workers run one thread each, so a local run with more threads may differ
where a greedy answer hinges on float rounding (a tie between two tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

_MODELS: dict[str, tuple] = {}  # model name or directory -> (model, tokenizer), per worker process


@dataclass(frozen=True)
class OnRay:
    """Where the evaluations run: the cluster (``None``: ``$RAY_ADDRESS``, else a local one),
    the base model the workers load, and the library location they open."""

    model: str
    location: str
    address: str | None = None

    def run(self, fn, calls: list[tuple], desc: str, unit: str = "task", progress: bool = True) -> list:
        """``[fn(self.model, self.location, *args) for args in calls]`` as Ray tasks."""
        from quiver.cluster.jobs import run_tasks

        return run_tasks(fn, [(self.model, self.location, *args) for args in calls], address=self.address,
                         desc=desc, unit=unit, progress=progress)


def worker_model(name: str):
    """The base model and tokenizer ``name`` (loaded on the first call in this process), and one
    thread: each task holds one CPU of the cluster."""
    import torch

    from quiver.library import load_base_model

    torch.set_num_threads(1)
    if name not in _MODELS:
        _MODELS[name] = load_base_model(name)
    return _MODELS[name]


def worker_library(location: str):
    from quiver.library import Library

    return Library.open(location)
