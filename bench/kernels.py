"""What a routed mixture of LoRAs costs next to the layer it adapts, per backend, in one table.

For T tokens (prefill 8 x 128, decode 16), two SmolLM2 projections (576 -> 576 attention,
576 -> 1536 MLP up), rank 8, top-2 routing over E in {4, 16, 64, 256, 1024} adapters, the
median time of:

- ``base``:    ``x @ W^T``, the projection being adapted (the yardstick of every ratio)
- ``dense``:   every token through all E adapters, stacked as one rank-E·r LoRA, then gated
               (zero outside the top k) — how PEFT's Arrow layer evaluates its experts
- ``grouped``: ``mixture_lora(backend="grouped")`` given a prebuilt meta
- ``meta``:    ``build_meta``, paid once per batch and shared by every module using the decision
- ``triton``:  ``mixture_lora(backend="triton")`` given a prebuilt meta (CUDA only)
- ``gather``:  ``mixture_lora(backend="gather")``: the PyTorch path for small calls (CPU)
- ``native``:  ``mixture_lora(backend="native")``: the C kernel, the CPU default for fp32 inference
               calls (CPU, when it builds; see ``quiver.kernels.native``)

At these sizes a GPU spends most of each eager call launching kernels, so on CUDA base, dense
and triton are also timed as CUDA-graph replays (``graph:`` columns; 10 calls per graph),
which leaves the kernels' own time; the ratios on CUDA are those of the graphed times.

Run: ``python -m quiver.bench.kernels [--device cuda] [--dtype bfloat16] [--min-time 0.2] [--threads N]``
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from quiver.kernels import LoraBank, build_meta, mixture_lora, native

MODES = {"prefill": 8 * 128, "decode": 16}
PROJECTIONS = [(576, 576), (576, 1536)]  # (d_in, d_out): q_proj, up_proj
NUM_ADAPTERS = [4, 16, 64, 256, 1024]
RANK, TOP_K = 8, 2


def dense_all_adapters(x, A_cat, B_cat, gates):
    """``Σ_e gates[t, e] · B_e A_e x[t]`` over all E adapters; gates are zero outside the top k."""
    # x: [T, d_in], A_cat: [E*r, d_in], B_cat: [d_out, E*r], gates: [T, E]
    T, E = gates.shape
    h = (x @ A_cat.t()).view(T, E, -1)  # [T, E, r]
    return (h * gates[:, :, None]).view(T, -1) @ B_cat.t()  # [T, d_out]


def median_ms(fn, min_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def graphed(fn, calls: int = 10):
    """``fn`` run ``calls`` times, captured in one CUDA graph; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton compilation) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def columns(device: str) -> tuple[list[str], list[str]]:
    """(timed columns, columns divided by base for the ratios) on this device."""
    if device == "cuda":
        return (["base", "dense", "meta", "grouped", "triton", "graph:base", "graph:dense", "graph:triton"],
                ["graph:dense", "graph:triton"])
    cpu_paths = ["gather"] + (["native"] if native.available() else [])
    return ["base", "dense", "meta", "grouped", *cpu_paths], ["dense", "grouped", *cpu_paths]


def run(device: str, dtype: torch.dtype, min_time: float) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    timed, ratios = columns(device)
    rows = []
    for mode, T in MODES.items():
        for d_in, d_out in PROJECTIONS:
            x = torch.randn(T, d_in, generator=gen).to(device, dtype)  # [T, d_in]
            W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(device, dtype)  # [d_out, d_in]
            for E in NUM_ADAPTERS:
                A = torch.randn(E, RANK, d_in, generator=gen) / d_in**0.5  # [E, r, d_in]
                B = torch.randn(E, d_out, RANK, generator=gen) / RANK  # [E, d_out, r]
                bank = LoraBank(A.to(device, dtype), B.to(device, dtype),
                                torch.full((E,), RANK, dtype=torch.int32, device=device))
                indices = torch.rand(T, E, generator=gen).topk(min(TOP_K, E)).indices.to(device)  # [T, k]
                weights = torch.rand(indices.shape, generator=gen).softmax(-1).to(device)  # [T, k]
                gates = torch.zeros(T, E, device=device).scatter_(1, indices, weights).to(dtype)  # [T, E]
                A_cat = bank.A.reshape(E * RANK, d_in)  # [E*r, d_in]
                B_cat = bank.B.permute(1, 0, 2).reshape(d_out, E * RANK)  # [d_out, E*r]
                meta = build_meta(indices, weights, E)
                fns = {"base": lambda: x @ W.t(),
                       "dense": lambda: dense_all_adapters(x, A_cat, B_cat, gates),
                       "meta": lambda: build_meta(indices, weights, E),
                       "grouped": lambda: mixture_lora(x, bank, indices, weights, meta, "grouped"),
                       "triton": lambda: mixture_lora(x, bank, indices, weights, meta, "triton"),
                       "gather": lambda: mixture_lora(x, bank, indices, weights, None, "gather"),
                       "native": lambda: mixture_lora(x, bank, indices, weights, None, "native")}
                row = dict(mode=mode, T=T, shape=f"{d_in}->{d_out}", E=E)
                for col in timed:
                    if col.startswith("graph:"):
                        row[col] = median_ms(graphed(fns[col[6:]]), min_time) / 10
                    else:
                        row[col] = median_ms(fns[col], min_time)
                rows.append(row)
                print(format_row(row, timed, ratios), flush=True)
    return rows


def format_row(row: dict, timed: list[str], ratios: list[str]) -> str:
    base = "graph:base" if "graph:base" in row else "base"
    return (f"{row['mode']:>8} {row['T']:>5} {row['shape']:>9} {row['E']:>5}"
            + "".join(f"{row[c]:>13.3f}" for c in timed)
            + "".join(f"{row[c] / row[base]:>13.2f}x" for c in ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on "
                                                      "CPU, bfloat16 on CUDA)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {args.device} ({where}), {dtype}, rank {RANK}, top-{TOP_K}; "
          f"times are medians in ms, ratios are over base")
    timed, ratios = columns(args.device)
    print(f"{'mode':>8} {'T':>5} {'shape':>9} {'E':>5}" + "".join(f"{c:>13}" for c in timed)
          + "".join(f"{c.removeprefix('graph:') + '/base':>14}" for c in ratios))
    run(args.device, dtype, args.min_time)


if __name__ == "__main__":
    main()
