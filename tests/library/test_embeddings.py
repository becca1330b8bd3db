"""Arrow prototypes, svd and text embeddings, search, similarity and MBC clustering."""

from __future__ import annotations

import pytest
import torch

from quiver.library import Library
from quiver.library import embeddings as emb
from quiver.library.synthetic import random_adapter


@pytest.mark.parametrize("r, d_in, d_out", [(1, 32, 64), (4, 577, 37), (8, 576, 1536), (16, 64, 64)])
def test_arrow_prototype_from_factors_equals_full_svd(r, d_in, d_out):
    g = torch.Generator().manual_seed(r)
    A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    v, sigma = emb.arrow_prototype(A, B, scaling=0.5)
    v_ref, sigma_ref = emb.arrow_prototype_dense(A, B, scaling=0.5)
    assert sigma == pytest.approx(sigma_ref, rel=1e-5)
    assert abs(float(v @ v_ref)) == pytest.approx(1.0, abs=1e-5)  # equal up to sign
    assert torch.linalg.vector_norm(0.5 * (B @ (A @ v))) == pytest.approx(sigma_ref, rel=1e-4)


def test_library_caches_arrow_prototypes_per_content(lib, tiny_spec):
    ad = random_adapter(tiny_spec, "a", rank=4, seed=1)
    rec = lib.add(ad)
    protos = lib.arrow_prototypes("a")
    assert set(protos) == set(ad.modules)
    path = "model.layers.1.self_attn.q_proj"
    v_ref, s_ref = emb.arrow_prototype_dense(ad.modules[path].A, ad.modules[path].B, ad.scaling(path))
    assert abs(float(protos[path][0] @ v_ref)) == pytest.approx(1.0, abs=1e-5)
    assert protos[path][1] == pytest.approx(s_ref, rel=1e-5)
    n_cached = lib._catalog.one("SELECT COUNT(*) AS n FROM derived WHERE blob=? AND kind='arrow'", (rec.blob,))["n"]
    assert n_cached == 1
    lib.remove("a")
    assert lib._catalog.one("SELECT COUNT(*) AS n FROM derived")["n"] == 0


def test_embed_adapters_stores_what_a_worker_computes_for_its_share(lib, tiny_spec):
    """The per-adapter part of embed (what each Ray task runs): only the named adapters, only
    what is missing, and the values the library would compute itself."""
    for i, n in enumerate("abc"):
        lib.add(random_adapter(tiny_spec, n, rank=2, seed=i), description=f"adapter {n} about topic {i}")
    assert lib.embed_adapters(["a", "b", "gone"], kinds=("arrow", "text")) == 4  # "gone": removed meanwhile
    kinds = lib._catalog.all("SELECT kind, COUNT(*) AS n FROM derived GROUP BY kind ORDER BY kind")
    assert [(r["kind"], r["n"]) for r in kinds] == [("arrow", 2), ("text", 2)]
    assert lib.embed_adapters(["a", "b", "c"], kinds=("arrow",)) == 1  # only c's was missing
    stored, ad = lib.arrow_prototypes("c"), lib.get("c")
    path = next(iter(stored))
    assert torch.equal(stored[path][0], emb.arrow_prototype(ad.modules[path].A, ad.modules[path].B, ad.scaling(path))[0])
    names, vectors = lib.text_embeddings(progress=False)  # a, b cached; c computed here
    assert names == ["a", "b", "c"] and torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="not per-adapter embedding kind"):
        lib.embed_adapters(["a"], kinds=("svd",))


def test_svd_embeddings_match_dense_truncated_svd(tmp_path, tiny_spec):
    lib = Library.open(tmp_path / "l", base_model=tiny_spec)
    lib.embed_config.svd_keep = 0.3
    lib.embed_config.svd_dims = 4
    ads = [random_adapter(tiny_spec, f"a{i}", rank=2 + (i % 2), seed=i) for i in range(6)]
    for ad in ads:
        lib.add(ad)
    names, got = lib.svd_embeddings(progress=False)
    assert names == [f"a{i}" for i in range(6)] and got.shape == (6, 4)
    # Independent reference: dense padded layout, top-30% mask, numpy-free SVD of the matrix.
    paths = sorted(tiny_spec.linears)
    rows = []
    for ad in ads:
        parts = []
        for p in paths:
            if p not in ads[0].modules:
                continue
            R = 3
            d_out, d_in = tiny_spec.linears[p]
            a = torch.zeros(R, d_in); bt = torch.zeros(R, d_out)
            m = ad.modules[p]
            a[: m.rank] = m.A; bt[: m.rank] = m.B.T
            parts += [a.flatten(), bt.flatten()]
        x = torch.cat(parts)
        nnz = int(round(0.3 * sum(m.A.numel() + m.B.numel() for m in ad.modules.values())))
        keep = x.abs().topk(nnz).indices
        rows.append(torch.zeros_like(x).index_copy_(0, keep, x[keep]))
    X = torch.stack(rows).double()
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    ref = torch.nn.functional.normalize(U[:, :4] * S[:4], dim=1)
    # Component signs are arbitrary: compare |cosine| per component, then the Gram matrices.
    assert torch.allclose((got.double() @ got.double().T), (ref @ ref.T), atol=1e-4)
    lib.close()


def test_svd_embeddings_are_recomputed_when_the_library_changes(lib, tiny_spec):
    for i in range(3):
        lib.add(random_adapter(tiny_spec, f"a{i}", seed=i))
    _, first = lib.svd_embeddings(progress=False)
    lib.add(random_adapter(tiny_spec, "a3", seed=3))
    names, second = lib.svd_embeddings(progress=False)
    assert len(names) == 4 and second.shape == (4, 64)
    assert torch.allclose(second.norm(dim=1), torch.ones(4), atol=1e-5)


def test_similar_finds_the_near_copy(lib, tiny_spec):
    base = random_adapter(tiny_spec, "orig", seed=1)
    lib.add(base)
    twin = random_adapter(tiny_spec, "twin", seed=1)
    for m in twin.modules.values():
        m.A = m.A + 0.001 * torch.randn_like(m.A)
    lib.add(twin)
    for i in range(2, 6):
        lib.add(random_adapter(tiny_spec, f"other{i}", seed=i))
    hits = lib.similar("orig", k=2)
    assert hits[0][0] == "twin" and hits[0][1] > 0.95 and hits[1][1] < 0.3
    assert all(n != "orig" for n, _ in hits)


def test_cluster_groups_adapters_built_from_two_families(lib, tiny_spec):
    fams = [random_adapter(tiny_spec, "seed", seed=s) for s in (100, 200)]
    for f_i, fam in enumerate(fams):
        for j in range(3):
            ad = random_adapter(tiny_spec, f"f{f_i}-{j}", seed=1000 * f_i + j)
            for p, m in ad.modules.items():  # family member = shared core + 20% own noise
                m.A = fam.modules[p].A + 0.2 * m.A
                m.B = fam.modules[p].B + 0.2 * m.B
            lib.add(ad)
    out = lib.cluster(k=2, seed=0)
    groups = sorted(sorted(g) for g in out["clusters"].values())
    assert groups == [["f0-0", "f0-1", "f0-2"], ["f1-0", "f1-1", "f1-2"]]
    with pytest.raises(ValueError, match="k must be between 1 and the number of adapters"):
        lib.cluster(k=7)


def test_text_search_ranks_the_matching_description_first(lib, tiny_spec):
    docs = {
        "sql": ("Translate English questions into SQL queries over a database.", ["How many users signed up in May?"]),
        "french": ("Translate English sentences into French.", ["Good morning, how are you?"]),
        "math": ("Solve arithmetic word problems step by step.", ["If I have 3 apples and eat one..."]),
    }
    for i, (name, (desc, ex)) in enumerate(docs.items()):
        lib.add(random_adapter(tiny_spec, name, seed=i), description=desc, examples=ex)
    assert lib.search("write a SELECT statement for the orders table", k=1)[0][0] == "sql"
    assert lib.search("say this in French please", k=3)[0][0] == "french"
    first_index = (lib._index_dir / "text.faiss").stat().st_mtime_ns
    assert lib.search("add 12 and 30", k=1)[0][0] == "math"
    assert (lib._index_dir / "text.faiss").stat().st_mtime_ns == first_index  # reused, not rebuilt
    lib.describe("math", description="Translate English into German.", examples=["Guten Tag"])
    assert lib.search("say this in German", k=1)[0][0] == "math"  # stale index was rebuilt


def test_vector_index_switches_to_hnsw_and_keeps_recall():
    import numpy as np

    from quiver.library import IndexConfig, VectorIndex

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((3000, 32)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    keys = [f"k{i}" for i in range(3000)]
    exact = VectorIndex.build(vecs, keys, IndexConfig(exact_max=10_000))
    approx = VectorIndex.build(vecs, keys, IndexConfig(exact_max=1000))
    assert (exact.kind, approx.kind) == ("exact", "hnsw")
    queries = vecs[:50] + 0.05 * rng.standard_normal((50, 32)).astype("float32")
    hits = [approx.search(q, 1)[0][0] == exact.search(q, 1)[0][0] for q in queries]
    assert sum(hits) >= 48
