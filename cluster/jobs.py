"""Library-wide jobs as Ray tasks: :func:`run_tasks` (any module-level function over plain
arguments; ``quiver bench quality --ray`` uses it too) and ``quiver library embed --ray``.

The driver splits the library's adapters into chunks and starts one Ray task per chunk. Each
task opens the library itself (from its location: a directory on one machine, the team
library's PostgreSQL URL across machines), reads its adapters, computes what is per adapter and
writes it back into the library's derived cache, exactly as the local run would:

- ``arrow``: each adapter's per-module prototype (top right singular vector and value of ΔW);
- ``text``: each adapter's all-MiniLM-L6-v2 vector of its description and examples.

``svd`` is a truncated SVD fitted on the whole library at once (its cache key is the set of
adapters it was fitted on), so the driver runs it after the tasks, as the local run does. The
driver then calls the local :meth:`Library.embed`, which finds every per-adapter item already
cached and only builds what is global (the svd fit, the search index): the counts and every
stored value are the local run's (tested: arrow and svd bytes equal, text vectors equal within
float32 rounding of the encoder's batching).

Tasks receive plain data (the config as a dict, the location, names); nothing is unpickled
from a user's files, and the library's own checks (names, hashes) apply in every worker.
"""

from __future__ import annotations

import math

EMBED_KINDS = ("arrow", "svd", "text")
_PER_ADAPTER = ("arrow", "text")  # what the tasks compute; the rest is global


def _embed_chunk(config: dict, location: str, names: list[str], kinds: list[str]) -> int:
    """One task: compute and store the ``kinds`` of the adapters ``names``; returns how many
    items it wrote (those already cached are skipped)."""
    import torch
    from omegaconf import OmegaConf

    from .serve import open_library

    torch.set_num_threads(1)
    lib = open_library(OmegaConf.create(config), location)
    try:
        return lib.embed_adapters(names, kinds)
    finally:
        lib.close()


def run_tasks(fn, calls: list[tuple], *, address: str | None = None, weights: list[int] | None = None,
              desc: str = "Ray tasks", unit: str = "task", progress: bool = True, max_retries: int = 2) -> list:
    """``[fn(*args) for args in calls]``, each call a Ray task of one CPU; results in call order.

    ``fn`` must be a module-level function of an installed module (Ray ships it by reference),
    and ``calls`` plain data: this is how Quiver's library-wide jobs reach the cluster (the
    embedding job above, the quality benchmark's methods, PCB's coefficient candidates). A task
    that fails is retried ``max_retries`` times (a node lost mid-job); a task's own error
    surfaces here with its traceback once the progress bar (``weights``: units per call) closes.
    """
    import ray
    from tqdm import tqdm

    from .connect import connect

    if not calls:
        return []
    connect(address)
    task = ray.remote(num_cpus=1, max_retries=max_retries)(fn)
    refs = [task.remote(*args) for args in calls]
    weight = dict(zip(refs, weights or [1] * len(refs)))
    pending = list(refs)
    with tqdm(total=sum(weight.values()), desc=desc, unit=unit, disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # fail fast: the first error stops the job
            bar.update(weight[done[0]])
    return ray.get(refs)


def embed(cfg, lib, kinds=EMBED_KINDS, *, location: str | None = None, address: str | None = None,
          chunk_size: int | None = None, progress: bool = True) -> dict[str, int]:
    """:meth:`Library.embed` with the per-adapter work as Ray tasks; returns the same counts.

    ``lib`` is the driver's open library; ``location`` the string the workers open (default:
    its directory or catalog URL). ``chunk_size``: adapters per task (default: about two tasks
    per CPU of the cluster, at most 64 adapters each)."""
    import ray
    from omegaconf import OmegaConf

    from .connect import connect

    unknown = set(kinds) - set(EMBED_KINDS)
    if unknown:
        raise ValueError(f"unknown embedding kind(s) {sorted(unknown)}; valid: {', '.join(EMBED_KINDS)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    names = lib.names()
    per_adapter = [k for k in kinds if k in _PER_ADAPTER]
    if names and per_adapter:
        connect(address)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = chunk_size or max(1, min(64, math.ceil(len(names) / (2 * cpus))))
        config = OmegaConf.to_container(cfg, resolve=True)
        where = location or str(lib.path)
        chunks = [names[i:i + size] for i in range(0, len(names), size)]
        run_tasks(_embed_chunk, [(config, where, chunk, per_adapter) for chunk in chunks],
                  weights=[len(c) for c in chunks], desc=f"{'+'.join(per_adapter)} on Ray", unit="adapter",
                  address=address, progress=progress)
    return lib.embed(kinds=tuple(kinds), progress=progress)
