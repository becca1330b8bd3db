"""Library-wide jobs as Ray tasks: ``quiver library embed --ray``.

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

    from quiver.library import embeddings as emb
    from quiver.library.derived import ARROW_CONFIG, _arrow_bytes, _vec_bytes

    from .serve import open_library

    torch.set_num_threads(1)
    lib = open_library(OmegaConf.create(config), location)
    written = 0
    try:
        records = [lib.info(n) for n in names if n in lib]  # one removed meanwhile is skipped
        items = []
        if "arrow" in kinds:
            items += [(r.blob, "arrow", ARROW_CONFIG, _arrow_bytes(lib.get(r.name))) for r in records
                      if lib._derived(r.blob, "arrow", ARROW_CONFIG) is None]
        if "text" in kinds:
            keys = [lib._text_key(r) for r in records]
            todo = [(r, k) for r, k in zip(records, keys) if lib._derived(r.blob, "text", k) is None]
            if todo:
                texts = [emb.adapter_text(r.description, r.examples) for r, _ in todo]
                vecs = emb.embed_texts(texts, lib.embed_config.text_batch_size)
                items += [(r.blob, "text", k, _vec_bytes(v)) for (r, k), v in zip(todo, vecs)]
        if items:
            lib._put_derived(items)
        written = len(items)
    finally:
        lib.close()
    return written


def embed(cfg, lib, kinds=EMBED_KINDS, *, location: str | None = None, address: str | None = None,
          chunk_size: int | None = None, progress: bool = True) -> dict[str, int]:
    """:meth:`Library.embed` with the per-adapter work as Ray tasks; returns the same counts.

    ``lib`` is the driver's open library; ``location`` the string the workers open (default:
    its directory or catalog URL). ``chunk_size``: adapters per task (default: about two tasks
    per CPU of the cluster, at most 64 adapters each)."""
    import ray
    from omegaconf import OmegaConf
    from tqdm import tqdm

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
        task = ray.remote(num_cpus=1, max_retries=2)(_embed_chunk)
        pending = [task.remote(config, where, names[i:i + size], per_adapter) for i in range(0, len(names), size)]
        with tqdm(total=len(names), desc=f"{'+'.join(per_adapter)} on Ray", unit="adapter",
                  disable=not progress) as bar:
            sizes = {ref: min(size, len(names) - i * size) for i, ref in enumerate(pending)}
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # a task's error surfaces here, with its traceback
                bar.update(sizes[done[0]])
    return lib.embed(kinds=tuple(kinds), progress=progress)
