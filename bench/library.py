"""Library benchmarks: Arrow prototypes from factors vs full-ΔW SVD, add throughput, search latency.

    python -m quiver.bench.library            # all three, prints a table
    python -m quiver.bench.library --adapters 3 --adds 1000 --vectors 100000
    python -m quiver.bench.library --team     # the team library (PostgreSQL + S3) vs the local one

``--team`` starts a throwaway PostgreSQL and SeaweedFS on 127.0.0.1 (quiver.library.localservers)
and measures, for both libraries in the same run: adds/s with 1 and with 4 writer processes,
``get`` latency cold (a fresh cache: from the store) and warm (from this machine's cache), and
``search`` p50 (text query embedded + index searched, index already built).

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


def _small_spec() -> BaseModelSpec:
    linears = {f"model.layers.{i}.self_attn.{p}": (256, 256) for i in range(4) for p in ("q_proj", "v_proj")}
    return BaseModelSpec(id="small", fingerprint="bench", dtype="float32", linears=linears)


_WRITER = """
import sys, time
from quiver.library import Library
from quiver.library.synthetic import random_adapter
loc, w, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
lib = Library.open(loc)
ads = [random_adapter(lib.base, f"{w}-{i}", rank=4, seed=i, targets=("q_proj", "v_proj")) for i in range(n)]
time.sleep(max(0.0, go - time.time()))  # every writer starts at the same moment
t0 = time.time()
for ad in ads:
    lib.add(ad, description=f"adapter {ad.name}")
print(t0, time.time())
"""


def _parallel_adds(location: str, writers: int, per_writer: int, cache: Path) -> float:
    """Adds/s of ``writers`` processes adding ``per_writer`` adapters each at once."""
    import os
    import subprocess
    import sys

    go = time.time() + 15  # after every interpreter has started and built its adapters
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, location, f"w{writers}x{k}", str(per_writer), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, QUIVER_CACHE=str(cache / f"w{k}")))
             for k in range(writers)]
    spans = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"writer failed: {err[-2000:]}")
        spans.append(tuple(map(float, out.split())))
    return writers * per_writer / (max(e for _, e in spans) - min(s for s, _ in spans))


def bench_team(n_adds: int, n_gets: int) -> dict:
    """Local vs team library on this machine; the servers are started and stopped here."""
    import os

    from quiver.library.localservers import start_postgres, start_seaweedfs

    spec = _small_spec()
    queries = ["adapter number 3", "which adapter handles item 17", "adapter for task 42"] * 10
    pg, s3 = start_postgres(), start_seaweedfs()
    out = {}
    try:
        s3.create_bucket("quiver-bench")
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        with tempfile.TemporaryDirectory() as d:
            cache = Path(d) / "cache"
            setups = {
                "local": (str(Path(d) / "lib"), lambda loc, c: Library.open(loc, cache_dir=c)),
                "team": (pg.create_database("bench"),
                         lambda loc, c: Library.open(loc, blobs="s3://quiver-bench/lib", cache_dir=c)),
            }
            for label, (loc, opener) in setups.items():
                with opener(loc, cache) as lib:
                    lib.set_base_model(spec)
                    ads = [random_adapter(spec, f"a{i}", rank=4, seed=i, targets=("q_proj", "v_proj")) for i in range(n_adds)]
                    t = time.perf_counter()
                    for ad in ads:
                        lib.add(ad, description=f"adapter {ad.name}")
                    one = n_adds / (time.perf_counter() - t)
                four = _parallel_adds(loc, 4, n_adds // 4, Path(d) / f"{label}-writers")
                names = [f"a{i}" for i in range(n_gets)]
                with opener(loc, Path(d) / f"{label}-cold") as lib:  # a machine that has cached nothing
                    cold = []
                    for n in names:
                        t = time.perf_counter()
                        lib.get(n)
                        cold.append(time.perf_counter() - t)
                    warm = []
                    for n in names:
                        t = time.perf_counter()
                        lib.get(n)
                        warm.append(time.perf_counter() - t)
                    lib.search(queries[0])  # embeds the library and builds the index once
                    lat, idx = [], []
                    qvecs = emb.embed_texts(queries).numpy()
                    for q, v in zip(queries, qvecs):
                        t = time.perf_counter()
                        lib.search(q, k=3)
                        lat.append(time.perf_counter() - t)
                        t = time.perf_counter()  # the part after the query embedding:
                        lib._text_index().search(v, 3)  # catalog generation check + faiss
                        idx.append(time.perf_counter() - t)
                    size = len(lib)
                out[label] = {"adds/s 1 writer": one, "adds/s 4 writers": four,
                              "cold get p50 ms": 1e3 * statistics.median(cold),
                              "warm get p50 ms": 1e3 * statistics.median(warm),
                              "search p50 ms": 1e3 * statistics.median(lat),
                              "index p50 ms": 1e3 * statistics.median(idx), "adapters": size}
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    finally:
        s3.stop()
        pg.stop()
    return out


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
    ap.add_argument("--team", action="store_true", help="only the local-vs-team library comparison")
    ap.add_argument("--team-adds", type=int, default=200, help="adapters per writer count in --team")
    ap.add_argument("--gets", type=int, default=100, help="adapters read cold then warm in --team")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.team:
        r = bench_team(args.team_adds, args.gets)
        print(f"Local vs team library: {args.team_adds} small adapters added by 1 writer, then "
              f"{args.team_adds} more by 4 writer processes; {args.gets} gets cold then warm; 30 searches")
        print("| library | adds/s, 1 writer | adds/s, 4 writers | cold get p50 ms | warm get p50 ms "
              "| search p50 ms | of which index p50 ms |")
        print("|---|---|---|---|---|---|---|")
        for label, x in r.items():
            print(f"| {label} | {x['adds/s 1 writer']:.0f} | {x['adds/s 4 writers']:.0f} | {x['cold get p50 ms']:.2f} "
                  f"| {x['warm get p50 ms']:.2f} | {x['search p50 ms']:.1f} | {x['index p50 ms']:.2f} |")
        return

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
