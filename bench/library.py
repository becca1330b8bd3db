"""Library benchmarks: Arrow prototypes from factors vs full-ΔW SVD, add throughput, search latency.

    python -m quiver.bench.library            # all three, prints a table
    python -m quiver.bench.library --adapters 3 --adds 1000 --vectors 100000

Everything is measured in one run on this machine, so the ratios are comparable even where
the absolute times are noisy. Targets: factor path >= 10x faster; search p50 < 5 ms; cached model load well under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from quiver.library import BaseModelSpec, IndexConfig, Library, VectorIndex
from quiver.library import embeddings as emb
from quiver.library.synthetic import random_adapter, smollm2_spec


def bench_arrow(n_adapters: int) -> dict:
    spec = smollm2_spec()
    fast, slow = [], []
    warm = random_adapter(spec, "warm", rank=8, seed=99).modules  # first LAPACK calls are slow
    for fn in (emb.arrow_prototype, emb.arrow_prototype_dense):
        fn(*next((m.A, m.B) for m in warm.values()))
    for i in range(n_adapters):
        ad = random_adapter(spec, f"a{i}", rank=8, seed=i)
        for fn, sink in ((emb.arrow_prototype, fast), (emb.arrow_prototype_dense, slow)):
            t = time.perf_counter()
            for path, m in ad.modules.items():
                fn(m.A, m.B, ad.scaling(path))
            sink.append(time.perf_counter() - t)
    f, s = statistics.median(fast), statistics.median(slow)
    return {"factor path s/adapter": f, "full-ΔW SVD s/adapter": s, "speed-up": s / f}


def bench_adds(n: int) -> dict:
    # Small adapters: rank 4 on q/v of a 4-layer, 256-wide model (about 16 KB each).
    linears = {f"model.layers.{i}.self_attn.{p}": (256, 256) for i in range(4) for p in ("q_proj", "v_proj")}
    spec = BaseModelSpec(id="small", fingerprint="bench", dtype="float32", linears=linears)
    adapters = [random_adapter(spec, f"a{i}", rank=4, seed=i, targets=("q_proj", "v_proj")) for i in range(n)]
    with tempfile.TemporaryDirectory() as d, Library.open(Path(d) / "lib", base_model=spec) as lib:
        t = time.perf_counter()
        for ad in adapters:
            lib.add(ad, description=f"adapter {ad.name}")
        elapsed = time.perf_counter() - t
        assert len(lib) == n
    return {"adds": n, "seconds": elapsed, "adds/s": n / elapsed}


def bench_search(n: int, queries: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, emb.TEXT_DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    keys = [f"k{i}" for i in range(n)]
    out = {}
    for label, cfg in (("exact", IndexConfig(exact_max=n)), ("default", IndexConfig())):
        t = time.perf_counter()
        index = VectorIndex.build(vecs, keys, cfg)
        build = time.perf_counter() - t
        qs = vecs[rng.integers(0, n, queries)] + 0.05 * rng.standard_normal((queries, emb.TEXT_DIM)).astype(np.float32)
        lat, agree = [], 0
        for q in qs:
            t = time.perf_counter()
            hit = index.search(q, 3)
            lat.append(time.perf_counter() - t)
            agree += hit[0][0] == keys[int(np.argmax(vecs @ q))]
        out[label] = {"kind": index.kind, "build s": build, "p50 ms": 1e3 * np.percentile(lat, 50),
                      "p99 ms": 1e3 * np.percentile(lat, 99), "top-1 recall": agree / queries}
    return out


def bench_load(reps: int = 5) -> dict:
    """Loading SmolLM2-135M from the converted cache (the GGUF is converted once, before timing)."""
    from quiver.library import load_base_model

    load_base_model("smollm2-135m", tokenizer=False)  # converts on first use
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        load_base_model("smollm2-135m")
        times.append(time.perf_counter() - t)
    return {"median s": statistics.median(times), "max s": max(times)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=2, help="adapters for the Arrow comparison")
    ap.add_argument("--adds", type=int, default=1000, help="adapters added for the throughput figure")
    ap.add_argument("--vectors", type=int, default=100_000, help="vectors in the search index")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    a = bench_arrow(args.adapters)
    print("Arrow prototypes, SmolLM2-135M shapes, r=8, 7 projections x 30 layers (210 modules)")
    print(f"| factor path (QR + r×r SVD) | full ΔW SVD | speed-up (target >= 10x) |\n|---|---|---|")
    print(f"| {a['factor path s/adapter'] * 1e3:.1f} ms/adapter | {a['full-ΔW SVD s/adapter'] * 1e3:.0f} ms/adapter "
          f"| {a['speed-up']:.0f}x |\n")
    b = bench_adds(args.adds)
    print(f"Adding {b['adds']} small adapters (rank 4, 8 modules of 256x256; fsync per add)")
    print(f"| seconds | adds/s |\n|---|---|\n| {b['seconds']:.1f} | {b['adds/s']:.0f} |\n")
    ld = bench_load()
    print("Loading SmolLM2-135M (model + tokenizer) from the safetensors cache, 5 loads")
    print(f"| median s | max s |\n|---|---|\n| {ld['median s']:.2f} | {ld['max s']:.2f} |\n")
    s = bench_search(args.vectors)
    print(f"Search over {args.vectors:,} random {emb.TEXT_DIM}-d unit vectors, k=3, 1000 queries")
    print("| index | kind | build s | p50 ms (target < 5) | p99 ms | top-1 recall vs exact |\n|---|---|---|---|---|---|")
    for label, r in s.items():
        print(f"| {label} | {r['kind']} | {r['build s']:.1f} | {r['p50 ms']:.3f} | {r['p99 ms']:.3f} | {r['top-1 recall']:.3f} |")


if __name__ == "__main__":
    main()
