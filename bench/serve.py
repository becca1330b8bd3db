"""Serving throughput of `quiver serve` on the real SmolLM2-135M with the shipped task library.

    python -m quiver.bench.serve                                   # fp32 + bf16, concurrency 1, 8, 32
    python -m quiver.bench.serve --dtypes float32 --concurrency 8 --requests 64

Load: chat completions of the task suite's test prompts (held-in tasks, interleaved; the
server renders them with the chat template), ``max_tokens`` 32 with EOS ignored, greedy, sent
by ``--concurrency`` client threads over HTTP to a `quiver serve` process on 127.0.0.1 (started
here, ``--threads`` compute threads). Routings: ``base`` (no adapter), ``adapter`` (one adapter
per request, round-robin over 4 adapters) and ``arrow`` (Arrow top-2 over the whole library,
the server's default model id ``quiver``). Baseline: the same prompts answered one after the
other by ``RoutedModel.generate`` in this process (no server), same threads and dtype.

Per cell: output tokens/s (all completion tokens / wall time of the cell) and p50/p95 request
latency. Requests per cell: ``--requests`` (default: max(8, concurrency)); the baseline answers
``--baseline-requests`` prompts (default 4) per routing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quiver.serve.health import wait_healthy

ADAPTER_RR = ("date_iso", "km_to_m", "uppercase", "sentiment")  # round-robin for "one adapter per request"
MODES = {"base": lambda i: "base", "adapter": lambda i: f"adapter:{ADAPTER_RR[i % 4]}", "arrow": lambda i: "quiver"}


def task_prompts(n: int) -> list[str]:
    from quiver.tasks import HELD_IN, get_task

    per = -(-n // len(HELD_IN))
    columns = [get_task(t).examples("test", per) for t in HELD_IN]
    return [columns[i % len(HELD_IN)][i // len(HELD_IN)].prompt for i in range(n)]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(library: Path, dtype: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("QUIVER_API_KEYS", None)
    proc = subprocess.Popen([sys.executable, "-m", "quiver.cli", "serve", "-L", str(library), "--port", str(port),
                             f"model.dtype={dtype}", "serve.max_batch_size=32"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=300)
    except RuntimeError:
        proc.kill()
        raise
    return proc, url


def run_cell(url: str, mode: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = _post(url + "/v1/chat/completions", {
            "model": MODES[mode](i), "messages": [{"role": "user", "content": prompts[i]}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        return time.perf_counter() - t0, out["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - t0
    return _stats([lat for lat, _ in results], sum(n for _, n in results), wall)


def _stats(latencies: list[float], tokens: int, wall: float) -> dict:
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    return {"tok_s": tokens / wall, "p50_s": statistics.median(lat), "p95_s": p95, "requests": len(lat),
            "tokens": tokens, "wall_s": wall}


def sequential_baseline(library: Path, dtype: str, prompts: list[str], max_tokens: int) -> dict:
    """The same prompts one at a time through RoutedModel.generate, in this process."""
    import torch

    from quiver.library import Library, load_base_model
    from quiver.routing import Arrow, Single
    from quiver.runtime import RoutedModel
    from quiver.runtime.answer import encode_prompts

    model, tok = load_base_model("smollm2-135m", dtype=getattr(torch, dtype))
    lib = Library.open(library)
    rm = RoutedModel(model, lib, router=Arrow(top_k=2))
    out = {}
    for mode in MODES:
        lat = []
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            enc = encode_prompts(tok, [p])
            kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id)
            s = time.perf_counter()
            if mode == "base":
                with rm.bare() as m, torch.no_grad():
                    m.generate(**enc, **kw)
            else:
                rm.generate(**enc, routers=[Single(ADAPTER_RR[i % 4]) if mode == "adapter" else None], **kw)
            lat.append(time.perf_counter() - s)
        out[mode] = _stats(lat, max_tokens * len(prompts), time.perf_counter() - t0)
    rm.unwrap()
    lib.close()
    return out


def library_path(arg: str | None) -> Path:
    from quiver.demo import build_demo_library
    from quiver.library import BaseModelSpec, load_base_model
    from quiver.library.base_model import default_cache_dir

    path = Path(arg) if arg else default_cache_dir() / "serve-bench-library"
    if not (path / "catalog.sqlite").is_file():
        model, _ = load_base_model("smollm2-135m", tokenizer=False)
        build_demo_library(path, BaseModelSpec.from_model(model)).close()
    return path


def table(results: dict, concurrency: list[int]) -> str:
    head = "| dtype | routing | " + " | ".join(f"c={c} tok/s | c={c} p50 / p95 (s)" for c in concurrency) + \
           " | sequential generate tok/s |"
    lines = [head, "|" + "---|" * (3 + 2 * len(concurrency))]
    for dtype, r in results.items():
        for mode in MODES:
            cells = []
            for c in concurrency:
                x = r["server"][mode][str(c)]
                cells += [f"{x['tok_s']:.1f}", f"{x['p50_s']:.2f} / {x['p95_s']:.2f}"]
            lines.append(f"| {dtype} | {mode} | " + " | ".join(cells) + f" | {r['sequential'][mode]['tok_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=None, help="requests per cell (default max(8, c))")
    ap.add_argument("--baseline-requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="compute threads (server and baseline)")
    ap.add_argument("--library", default=None, help="task library (default: built in $QUIVER_CACHE)")
    ap.add_argument("--out", default="bench-results/serve.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    lib = library_path(args.library)
    results: dict = {}
    for dtype in args.dtypes:
        proc, url = start_server(lib, dtype, args.threads)
        try:
            run_cell(url, "arrow", task_prompts(4), 4, 4)  # warm-up
            server: dict = {m: {} for m in MODES}
            for mode in MODES:
                for c in args.concurrency:
                    prompts = task_prompts(args.requests or max(8, c))
                    server[mode][str(c)] = cell = run_cell(url, mode, prompts, c, args.max_tokens)
                    print(f"{dtype} {mode} c={c}: {cell['tok_s']:.1f} tok/s, p50 {cell['p50_s']:.2f} s, "
                          f"p95 {cell['p95_s']:.2f} s", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
        seq = sequential_baseline(lib, dtype, task_prompts(args.baseline_requests), args.max_tokens)
        for mode, x in seq.items():
            print(f"{dtype} {mode} sequential generate: {x['tok_s']:.1f} tok/s", flush=True)
        results[dtype] = {"server": server, "sequential": seq}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(table(results, args.concurrency))


if __name__ == "__main__":
    main()
