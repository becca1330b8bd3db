"""Embeddings, search, similarity and clustering on top of the catalog (mixed into Library).

Every derived item is cached in the catalog's ``derived`` table keyed by (blob hash, kind,
config hash); the config hash covers everything the value depends on besides the blob: for
``text`` the embedded text, for ``svd`` the set of adapters the SVD was fitted on.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm import tqdm

from . import embeddings as emb
from .index import VectorIndex

ARROW_CONFIG = emb.config_hash({"kind": "arrow", "method": "qr+rxr-svd", "v": 1})


class DerivedMixin:
    """Methods of :class:`quiver.library.Library` that compute or use derived data."""

    # -- the cache ---------------------------------------------------------------------------
    def _derived(self, blob: str, kind: str, config: str) -> bytes | None:
        row = self._catalog.one("SELECT data FROM derived WHERE blob=? AND kind=? AND config=?", (blob, kind, config))
        return bytes(row["data"]) if row else None

    def _put_derived(self, items: Iterable[tuple[str, str, str, bytes]]) -> None:
        if self.read_only:
            return  # computed for this process only; a read-only library caches nothing
        now = time.time()
        with self._write():
            self._catalog.many("INSERT INTO derived (blob, kind, config, data, created_at) VALUES (?,?,?,?,?) "
                               "ON CONFLICT (blob, kind, config) DO UPDATE SET data=excluded.data, "
                               "created_at=excluded.created_at", [(*item, now) for item in items])

    # -- arrow ---------------------------------------------------------------------------------
    def arrow_prototypes(self, name: str) -> dict[str, tuple[torch.Tensor, float]]:
        """Per module path: (top right singular vector ``[d_in]``, top singular value) of ΔW."""
        rec = self.info(name)
        data = self._derived(rec.blob, "arrow", ARROW_CONFIG)
        if data is None:
            data = _arrow_bytes(self.get(name))
            self._put_derived([(rec.blob, "arrow", ARROW_CONFIG, data)])
        tensors = st_load(data)
        return {path: (tensors[path], float(tensors[f"{path}#sigma"])) for path in tensors
                if not path.endswith("#sigma")}

    # -- text ----------------------------------------------------------------------------------
    def _text_key(self, rec) -> str:
        text = emb.adapter_text(rec.description, rec.examples)
        return emb.config_hash({"kind": "text", "model": emb.TEXT_MODEL,
                                "text": hashlib.sha256(text.encode()).hexdigest()})

    def text_embeddings(self, progress: bool = True) -> tuple[list[str], torch.Tensor]:
        """Names and ``[N, 384]`` unit text embeddings; missing ones are computed in batches."""
        records = self.list()
        have, _ = self._text_vectors(records, progress)
        vectors = torch.stack([_vec_from(d) for d in have]) if records else torch.zeros(0, emb.TEXT_DIM)
        return [r.name for r in records], vectors

    def _text_vectors(self, records, progress: bool = False) -> tuple[list[bytes], int]:
        """Each record's stored text vector, and how many were missing (those are embedded in
        batches and stored here)."""
        keys = [self._text_key(r) for r in records]
        have = [self._derived(r.blob, "text", k) for r, k in zip(records, keys)]
        todo = [i for i, d in enumerate(have) if d is None]
        if todo:
            texts = [emb.adapter_text(records[i].description, records[i].examples) for i in todo]
            vecs = emb.embed_texts(texts, self.embed_config.text_batch_size,
                                   progress=progress and len(todo) > self.embed_config.text_batch_size)
            items = [(records[i].blob, "text", keys[i], _vec_bytes(v)) for i, v in zip(todo, vecs)]
            self._put_derived(items)
            for i, item in zip(todo, items):
                have[i] = item[3]
        return have, len(todo)

    def search(self, query: str, k: int = 3) -> list[tuple[str, float]]:
        """Adapters whose description/examples best match ``query``: ``[(name, cosine)]``."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int = 3,
                    among: list[str] | None = None) -> list[list[tuple[str, float]]]:
        """:meth:`search` for many queries, embedded in one batch: one ``[(name, cosine)]`` list
        per query. ``among``: only these adapters are returned; the index is searched
        ``k + (adapters outside among)`` deep, so that the k best of them are found."""
        if k < 1:
            raise ValueError("k must be at least 1")
        if any(not isinstance(q, str) or not q.strip() for q in queries):
            raise ValueError("empty search query: give words to match against the adapters' descriptions")
        index = self._text_index()
        vectors = emb.embed_texts(list(queries), self.embed_config.text_batch_size).numpy()  # [Q, 384]
        if among is None:
            return [index.search(v, k) for v in vectors]
        keep = set(among)
        depth = k + sum(n not in keep for n in index.keys)
        return [[(n, s) for n, s in index.search(v, depth) if n in keep][:k] for v in vectors]

    def _text_index(self) -> VectorIndex:
        cfg = self.index_config
        stamp = f"{self.generation}:{emb.TEXT_MODEL}:{cfg.exact_max}:{cfg.hnsw_m}"
        cached = self._loaded_text_index
        if cached is not None and cached.stamp == stamp:
            return cached  # the catalog has not changed since it was read: no disk read per query
        path = self._index_dir / "text.faiss"
        index = VectorIndex.load(path)
        if index is None or index.stamp != stamp:
            names, vectors = self.text_embeddings()
            index = VectorIndex.build(vectors.numpy(), names, cfg, stamp)
            if not self.read_only:  # a read-only library keeps the index in memory only
                index.save(path)
        self._loaded_text_index = index
        return index

    # -- svd -----------------------------------------------------------------------------------
    def svd_embeddings(self, progress: bool = True) -> tuple[list[str], torch.Tensor]:
        """Names and ``[N, svd_dims]`` weight-space embeddings fitted on the whole library."""
        records = self.list()
        cfg = self.embed_config
        key = emb.config_hash({"kind": "svd", "keep": cfg.svd_keep, "dims": cfg.svd_dims,
                               "fit_on": sorted(r.blob for r in records)})
        cached = [self._derived(r.blob, "svd", key) for r in records]
        if records and any(c is None for c in cached):
            vectors = self._fit_svd(records, progress)
            self._put_derived([(r.blob, "svd", key, _vec_bytes(v)) for r, v in zip(records, vectors)])
        else:
            vectors = torch.stack([_vec_from(c) for c in cached]) if records else torch.zeros(0, cfg.svd_dims)
        return [r.name for r in records], vectors

    def _fit_svd(self, records, progress: bool) -> torch.Tensor:
        # One layout for the whole library: per module path, A ([R, d_in]) then B^T
        # ([R, d_out]) with R the largest rank any adapter has there. Row-major flattening puts
        # a lower-rank factor's entries at the same positions as in the padded block.
        adapters = {}
        shapes: dict[str, tuple[int, int, int]] = {}
        for rec in tqdm(records, desc="svd: loading adapters", disable=not progress):
            ad = adapters[rec.name] = self.get(rec.name)
            for path, m in ad.modules.items():
                r, d_in = m.A.shape
                d_out = m.B.shape[0]
                R = max(r, shapes.get(path, (0, 0, 0))[0])
                shapes[path] = (R, d_in, d_out)
        offsets, total = {}, 0
        for path in sorted(shapes):
            R, d_in, d_out = shapes[path]
            offsets[path] = (total, total + R * d_in)
            total += R * (d_in + d_out)
        rows = []
        for rec in records:
            pieces = []
            for path, m in adapters[rec.name].modules.items():
                off_a, off_b = offsets[path]
                pieces += [(off_a, m.A), (off_b, m.B.T)]
            rows.append(emb.sparse_flat(pieces, self.embed_config.svd_keep))
        return emb.svd_embeddings(rows, total, self.embed_config.svd_dims)

    def similar(self, name: str, k: int = 3) -> list[tuple[str, float]]:
        """Adapters closest to ``name`` in weight space: ``[(name, cosine)]``, itself excluded."""
        self.info(name)  # clear error for an unknown name
        names, vectors = self.svd_embeddings()
        index = VectorIndex.build(vectors.numpy(), names, self.index_config)
        hits = index.search(vectors[names.index(name)].numpy(), k + 1)
        return [(n, s) for n, s in hits if n != name][:k]

    def cluster(self, k: int, seed: int = 0, niter: int = 50) -> dict:
        """MBC: k-means over the rows of the svd cosine-similarity matrix.

        Returns ``{"k": k, "clusters": {"0": [names], ...}}``, clusters ordered by their
        first member's name so that the output is stable.
        """
        names, vectors = self.svd_embeddings()
        if not 1 <= k <= len(names):
            raise ValueError(f"k must be between 1 and the number of adapters ({len(names)}), got {k}")
        import faiss

        sim = (vectors @ vectors.T).numpy().astype(np.float32)  # [N, N] cosine similarities
        km = faiss.Kmeans(sim.shape[1], k, niter=niter, seed=seed, nredo=5, verbose=False,
                          min_points_per_centroid=1)
        km.train(sim)
        _, assign = km.index.search(sim, 1)
        groups: dict[int, list[str]] = {}
        for n, c in zip(names, assign[:, 0]):
            groups.setdefault(int(c), []).append(n)
        ordered = sorted(groups.values(), key=lambda g: g[0])
        return {"k": k, "clusters": {str(i): g for i, g in enumerate(ordered)}}

    # -- all at once ---------------------------------------------------------------------------
    def embed_adapters(self, names, kinds=("arrow", "text")) -> int:
        """Compute and store the *per-adapter* embeddings (``arrow``, ``text``) of ``names``
        that are missing; returns how many items were written. What a worker of a distributed
        :meth:`embed` runs on its share of the library (the svd fit and the search index need
        the whole library and stay with :meth:`embed`). Names no longer in the library (removed
        meanwhile) are skipped."""
        unknown = set(kinds) - {"arrow", "text"}
        if unknown:
            raise ValueError(f"not per-adapter embedding kind(s) {sorted(unknown)}; valid: arrow, text")
        records = [self.info(n) for n in names if n in self]
        written = 0
        if "arrow" in kinds:
            items = [(r.blob, "arrow", ARROW_CONFIG, _arrow_bytes(self.get(r.name))) for r in records
                     if self._derived(r.blob, "arrow", ARROW_CONFIG) is None]
            if items:
                self._put_derived(items)
            written += len(items)
        if "text" in kinds:
            written += self._text_vectors(records)[1]
        return written

    def embed(self, kinds=("arrow", "svd", "text"), progress: bool = True) -> dict[str, int]:
        """Compute every missing embedding of the given kinds; returns how many exist per kind."""
        unknown = set(kinds) - {"arrow", "svd", "text"}
        if unknown:
            raise ValueError(f"unknown embedding kind(s) {sorted(unknown)}; valid: arrow, svd, text")
        counts = {}
        if "arrow" in kinds:
            names = self.names()
            for n in tqdm(names, desc="arrow prototypes", disable=not progress):
                self.arrow_prototypes(n)
            counts["arrow"] = len(names)
        if "svd" in kinds:
            counts["svd"] = len(self.svd_embeddings(progress)[0])
        if "text" in kinds:
            counts["text"] = len(self.text_embeddings(progress)[0])
            self._text_index()
        return counts


def _arrow_bytes(adapter) -> bytes:
    tensors = {}
    for path, m in adapter.modules.items():
        v, sigma = emb.arrow_prototype(m.A, m.B, adapter.scaling(path))
        tensors[path] = v.contiguous()
        tensors[f"{path}#sigma"] = torch.tensor([sigma])
    return st_save(tensors)


def _vec_bytes(v: torch.Tensor) -> bytes:
    return v.detach().float().contiguous().numpy().tobytes()


def _vec_from(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())
