"""Quiver on Ray: serving throughput with 1 and 2 replicas, and the embedding job local vs Ray.

    quiver bench ray                                  # both parts, on a 2-node local cluster
    quiver bench ray --requests 64 --adapters 1000 --nodes 2 --cpus 2

Set-up (everything here, nothing downloaded): a tiny random Llama (hidden 64, 4 layers, a
128-token character tokenizer) saved as a Hugging Face directory, a local library of 4 random
adapters, and a throwaway Ray cluster of ``--nodes`` nodes on loopback (``--cpus`` logical CPUs
each; :class:`quiver.cluster.localcluster.LocalCluster`).

Serving: ``quiver serve --ray --replicas R`` (R = 1, 2) on that cluster, then ``--requests``
completions (``max_tokens`` 32, EOS ignored, greedy; model ids round-robin over ``base``, the
4 ``adapter:NAME`` and ``quiver``), sent by 16 client threads with the official openai client.
Per R: output tokens/s (all completion tokens / wall time) and p50/p95 request latency.

Embedding job: a local library of ``--adapters`` random adapters on the tiny model (rank 4, q/v
of every layer, a one-line description each), copied twice; ``Library.embed()`` (arrow, svd,
text) on one copy in this process, ``quiver.cluster.jobs.embed`` on the other. Wall time of each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from quiver.serve.health import wait_healthy

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
ADAPTERS = ("sql", "french", "math", "dates")
MODELS = ("base", *(f"adapter:{n}" for n in ADAPTERS), "quiver")
CONCURRENCY = 16


def tiny_model_dir(path: Path):
    """A tiny random Llama + a character-level BPE tokenizer trained here; returns its spec."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from quiver.library import BaseModelSpec

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=4096, tie_word_embeddings=False)).eval()
    model.save_pretrained(path)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!:+-="),
                                  show_progress=False)
    tk.train_from_iterator(["write a query that selects all users", "translate this into french please",
                            "what is two plus two", "convert the date to iso format"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return BaseModelSpec.from_model(model, "bench-tiny")


def make_library(path: Path, spec, n: int, names=None):
    from quiver.library import Library
    from quiver.library.synthetic import random_adapter

    with Library.open(path, base_model=spec) as lib:
        for i in range(n):
            name = names[i] if names else f"a{i:04d}"
            lib.add(random_adapter(spec, name, rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=i, std=0.2),
                    description=f"adapter {name}: task {i % 17} about topic {i % 29}")


def bench_serving(address: str, library: Path, model_dir: Path, replicas: int, requests: int, tmp: Path) -> dict:
    from openai import OpenAI

    from quiver.cluster.localcluster import _free_port

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"serve-{replicas}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quiver.cli", "serve", "--ray", "--replicas", str(replicas),
                                 "--ray-address", address, "-L", str(library), "--port", str(port),
                                 f"model.name={model_dir}", f"serve.ray.app_name=bench{replicas}"],
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, timeout=300, log=log, what="quiver serve --ray")
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

            def one(i: int) -> tuple[float, int]:
                t = time.perf_counter()
                r = client.completions.create(model=MODELS[i % len(MODELS)], prompt="write a query that selects",
                                              max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
                return time.perf_counter() - t, r.usage.completion_tokens

            for i in range(len(MODELS) * replicas):  # warm-up: every routing once per replica
                one(i)
            lat, tokens, lock = [], [0], threading.Lock()
            todo = iter(range(requests))

            def worker():
                for i in todo:
                    dt, n = one(i)
                    with lock:
                        lat.append(dt)
                        tokens[0] += n

            threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(120)
    lat.sort()
    return {"replicas": replicas, "tokens/s": tokens[0] / wall, "p50 s": statistics.median(lat),
            "p95 s": lat[int(0.95 * (len(lat) - 1))], "requests": len(lat)}


def bench_embed(address: str, spec, n: int, tmp: Path) -> dict:
    from quiver.cluster.jobs import embed
    from quiver.cluster.serve import open_library
    from quiver.config import compose

    make_library(tmp / "emb-a", spec, n)
    shutil.copytree(tmp / "emb-a", tmp / "emb-b")
    cfg = compose([])
    local, on_ray = open_library(cfg, str(tmp / "emb-a")), open_library(cfg, str(tmp / "emb-b"))
    try:
        t = time.perf_counter()
        local.embed(progress=False)
        t_local = time.perf_counter() - t
        t = time.perf_counter()
        embed(cfg, on_ray, address=address, progress=False)
        t_ray = time.perf_counter() - t
    finally:
        local.close()
        on_ray.close()
    return {"adapters": n, "local s": t_local, "ray s": t_ray}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64, help="completions per replica count")
    ap.add_argument("--adapters", type=int, default=1000, help="adapters in the embedding job")
    ap.add_argument("--nodes", type=int, default=2, help="nodes of the local Ray cluster")
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs per node")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-embed", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from quiver.cluster.localcluster import LocalCluster

    tmp = Path(tempfile.mkdtemp(prefix="quiver-bench-ray-"))
    try:
        spec = tiny_model_dir(tmp / "model")
        make_library(tmp / "lib", spec, len(ADAPTERS), names=ADAPTERS)
        print(f"{os.cpu_count()} cores; Ray cluster: {args.nodes} node(s) x {args.cpus} logical CPUs on loopback\n")
        with LocalCluster(nodes=args.nodes, cpus=args.cpus, env={"QUIVER_CACHE": str(tmp / "cache")}) as cluster:
            if not args.skip_serving:
                rows = [bench_serving(cluster.address, tmp / "lib", tmp / "model", r, args.requests, tmp) for r in (1, 2)]
                print(f"Serving: {args.requests} completions (32 tokens, EOS ignored) at concurrency {CONCURRENCY}, "
                      "tiny random Llama")
                print("| replicas | output tokens/s | p50 latency s | p95 latency s |\n|---|---|---|---|")
                for r in rows:
                    print(f"| {r['replicas']} | {r['tokens/s']:.0f} | {r['p50 s']:.2f} | {r['p95 s']:.2f} |")
                print()
            if not args.skip_embed:
                e = bench_embed(cluster.address, spec, args.adapters, tmp)
                print(f"Embedding job (arrow + svd + text) over {e['adapters']} random adapters")
                print(f"| local | Ray ({args.nodes} nodes) |\n|---|---|\n| {e['local s']:.1f} s | {e['ray s']:.1f} s |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
