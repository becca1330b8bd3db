"""Routed inference cost on the real SmolLM2-135M (fp32), as ratios to the bare base model.

    python -m quiver.bench.runtime                      # E = 4, 16, 64, 256 and PEFT at 4, 16
    python -m quiver.bench.runtime --experts 4 16 --reps 3 --device cuda
    python -m quiver.bench.runtime --experts 16 --peft --mixed 16   # + batches mixing routings
    python -m quiver.bench.runtime --gate-screen                    # Arrow's gates alone, screened

Adapters: seeded random rank-8 LoRAs on all 7 projections of all 30 layers, in a library kept
at $QUIVER_CACHE/bench-library (built once). Router: Arrow, k=2, merge-after. Each cell is the
median over ``--reps`` runs; base and routed runs alternate inside one process (``rm.bare()``),
so the ratios compare like with like on a noisy machine.

- prefill: one forward over 8 × 128 tokens;
- decode: one step of batch 1 and of batch 16 with a KV cache after a 32-token prompt;
- PEFT: ``peft.create_arrow_model`` on the same adapters (exported as PEFT directories).
Targets (CPU): prefill <= 1.25x base at E=16 and <= 1.35x at E=256; decode batch 1 <= 1.3x and
batch 16 <= 1.4x at every E up to 256; at E=16 >= 3x faster than PEFT's Arrow for prefill and
>= 2x for decode.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quiver.kernels import native
from quiver.library import BaseModelSpec, Library, load_base_model
from quiver.library.base_model import default_cache_dir
from quiver.library.synthetic import SMOLLM2_135M, random_adapter
from quiver.routing import Arrow
from quiver.runtime import RoutedModel


def smollm2_shaped_random(dtype: torch.dtype, device) -> torch.nn.Module:
    """A randomly initialised Llama with SmolLM2-135M's exact shapes (same cost per token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2_135M, max_position_embeddings=8192, rope_theta=100000.0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model._quiver_model_id = "smollm2-135m-shapes-random"
    return model


def bench_library(spec: BaseModelSpec, n: int) -> Library:
    lib = Library.open(default_cache_dir() / f"bench-library-{spec.fingerprint[:8]}", base_model=spec)
    for i in range(len(lib), n):
        lib.add(random_adapter(spec, f"e{i:04d}", rank=8, seed=i))
    lib.embed(kinds=("arrow",), progress=True)
    return lib


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_prefill(model, ids) -> float:
    _sync(ids.device)
    t = time.perf_counter()
    model(ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - t


@torch.no_grad()
def time_decode(model, ids, steps: int, routers=None) -> float:
    """Seconds per decoding step after a prefill of ``ids`` (``routers``: one per row, for a
    routed model)."""
    kw = {} if routers is None else {"routers": routers}
    out = model(ids, use_cache=True, **kw)
    pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, past_key_values=pkv, use_cache=True, **kw)
        pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return (time.perf_counter() - t) / steps


def measure(run_base, run_other, reps: int, *more) -> tuple[float, ...]:
    """Median seconds of base, other (and each of ``more``), alternating, after one warm-up each."""
    runs = (run_base, run_other, *more)
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(reps):
        for run, ts in zip(runs, times):
            ts.append(run())
    return tuple(statistics.median(ts) for ts in times)


def mixed_routings(model, lib: Library, names: list[str], args) -> None:
    """Decoding steps of 8 rows, one request each, routed differently in one batch (what a
    server's step looks like): ratios to the bare model's step at batch 8."""
    from quiver.routing import Single

    shared = Arrow(top_k=2)
    rm = RoutedModel(model, lib, router=shared, adapters=names, backend=args.backend)
    ids = torch.randint(0, 49152, (8, 32), generator=torch.Generator().manual_seed(1)).to(torch.device(args.device))
    setups = {
        "one Arrow router for all 8 rows": [shared] * 8,
        "8 Arrow routers (8 temperatures)": [rm.bind(Arrow(top_k=2, temperature=1 + i / 10)) for i in range(8)],
        "8 single-adapter routers": [rm.bind(Single(names[i % len(names)])) for i in range(8)],
        "4 rows Arrow + 4 single-adapter routers": [shared] * 4 + [rm.bind(Single(names[i % len(names)]))
                                                                     for i in range(4)],
    }

    def base():
        with rm.bare() as m:
            return time_decode(m, ids, args.steps)

    print(f"\nDecoding steps of 8 rows with mixed routings (E={len(names)}, Arrow k=2; median of {args.reps})\n")
    print("| routers in the batch | decode b=8 (x base) |\n|---|---|")
    for label, routers in setups.items():
        b, o = measure(base, lambda routers=routers: time_decode(rm, ids, args.steps, routers), args.reps)
        print(f"| {label} | {o / b:.2f}x ({o * 1e3:.0f} ms; base {b * 1e3:.0f} ms) |")
    rm.unwrap()


def gate_screen_table(sizes: list[int], tokens: list[int], reps: int) -> None:
    """The gates alone, as one forward calls them (30 layers × the 4 groups of sibling modules of
    SmolLM2-135M: q/k/v, o, gate/up, down), random unit prototypes: the float32 GEMM against each
    screen forced on at every size (the int8 pass, and the bfloat16 GEMM where the CPU has AMX),
    each the native gate's whole decision."""
    from quiver.routing.base import GateScreen

    if not native.available():
        raise SystemExit(f"--gate-screen needs the native backend: {native.unavailable()}")
    groups = [(576, 3), (576, 1), (576, 2), (1536, 1)]  # (d_in, sibling modules)
    amx = native._bf16_gemm_fast()
    print(f"\nArrow's gates alone (k=2), 30 layers x 4 groups, {torch.get_num_threads()} threads, median of {reps}; "
          f"bfloat16 matrix units (AMX): {'yes' if amx else 'no: no bfloat16 column'}\n")
    print("| E | tokens | float32 GEMM | int8 pass | ratio | bfloat16 GEMM | ratio | "
          "columns in float32 (int8, bf16) |\n|---|---|---|---|---|---|---|---|")
    keep = (native.SCREEN, native.SCREEN_MIN_WORK, native.SCREEN_I8_MAX_TOKENS)
    g = torch.Generator().manual_seed(0)

    def force(pass_: str) -> None:  # the screen's thresholds so that every size takes one pass
        native.SCREEN = pass_ != "f32"
        native.SCREEN_MIN_WORK = 1 if pass_ == "bf16" else 1 << 62
        native.SCREEN_I8_MAX_TOKENS = 1 << 62

    try:
        for E in sizes:
            gates = []
            for _ in range(30):
                for d, M in groups:
                    rows = torch.nn.functional.normalize(torch.randn(M * E, d, generator=g), dim=1)
                    gates.append((rows.T.contiguous(), GateScreen.of(rows, bf16=amx), M))  # as Arrow stores them
            for T in tokens:
                xs = {d: torch.randn(T, d, generator=g) for d in (576, 1536)}

                def run(pass_: str) -> float:
                    force(pass_)
                    t = time.perf_counter()
                    for W, screen_, M in gates:
                        native.linear_gate_native(xs[W.shape[0]], W, None, M, True, 2, 1.0, screen_)
                    return time.perf_counter() - t
                passes = ["f32", "i8"] + (["bf16"] if amx else [])
                shares = {}
                for p in passes:  # the columns each screen keeps: one call over the gates
                    before = native.screen_stats()
                    run(p)
                    after = native.screen_stats()
                    if p != "f32":
                        shares[p] = (after["exact"] - before["exact"]) / (after["columns"] - before["columns"])
                fns = [lambda p=p: run(p) for p in passes]
                times = dict(zip(passes, measure(fns[0], fns[1], reps, *fns[2:])))
                f32 = times["f32"]
                low = (f"{times['bf16'] * 1e3:.1f} ms | {times['bf16'] / f32:.2f}x" if amx else "- | -")
                print(f"| {E} | {T} | {f32 * 1e3:.1f} ms | {times['i8'] * 1e3:.1f} ms | {times['i8'] / f32:.2f}x | "
                      f"{low} | {', '.join(f'{v:.2%}' for v in shares.values())} |")
    finally:
        native.SCREEN, native.SCREEN_MIN_WORK, native.SCREEN_I8_MAX_TOKENS = keep


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="*", default=[4, 16, 64, 256],
                    help="library sizes E to time Arrow over (none: only --peft / --mixed)")
    ap.add_argument("--peft", type=int, nargs="*", default=[4, 16], help="E values to run PEFT's Arrow at")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--mixed", type=int, default=None, metavar="E",
                    help="also time decoding steps of 8 rows whose requests have different routers (a served "
                         "batch mixing routings), over E adapters")
    ap.add_argument("--screen-ab", action="store_true",
                    help="for libraries whose Arrow gates have a screen (E >= 128: the int8 pass at decoding sizes, "
                         "the bfloat16 GEMM at prefill sizes on CPUs with AMX), also time the same model with the "
                         "float32 gate GEMM at every size, alternating with the other runs")
    ap.add_argument("--gate-screen", action="store_true",
                    help="only time Arrow's gates alone at SmolLM2's shapes, float32 GEMM against the int8 pass and "
                         "the bfloat16 GEMM (each forced on), over E = 64, 128, 256 and 1 to 1,024 tokens (no model; "
                         "a few minutes)")
    ap.add_argument("--random-weights", action="store_true",
                    help="a random model of SmolLM2-135M's shapes instead of the real weights (same speed)")
    args = ap.parse_args(argv)
    if args.gate_screen:
        gate_screen_table([64, 128, 256], [1, 4, 16, 64, 128, 256, 1024], args.reps)
        return
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        model = smollm2_shaped_random(dtype, device)
    else:
        model, _ = load_base_model("smollm2-135m", device=device, dtype=dtype, tokenizer=False)
    spec = BaseModelSpec.from_model(model)
    lib = bench_library(spec, max(args.experts + args.peft + [args.mixed or 0]))
    names = lib.names()
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, 49152, (8, 128), generator=g).to(device)
    prompt1 = torch.randint(0, 49152, (1, 32), generator=g).to(device)
    prompt16 = torch.randint(0, 49152, (16, 32), generator=g).to(device)
    print(f"SmolLM2-135M{' (random weights)' if args.random_weights else ''} {args.dtype} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"Arrow k=2, rank-8 adapters on 7 projections x 30 layers; median of {args.reps}\n")
    rows, screened = [], []

    def cells(labels, run):  # run(fn) -> (base seconds, seconds of each labelled configuration)
        with_base = [{} for _ in labels]
        for key, fn in (("prefill 8x128", lambda m: time_prefill(m, prefill_ids)),
                        ("decode b=1", lambda m: time_decode(m, prompt1, args.steps)),
                        ("decode b=16", lambda m: time_decode(m, prompt16, args.steps))):
            b, *others = run(fn)
            for cell, o in zip(with_base, others):
                cell[key] = (b, o)
        rows.extend(zip(labels, with_base))

    for E in args.experts:
        router = Arrow(top_k=2)
        rm = RoutedModel(model, lib, router=router, adapters=names[:E], backend=args.backend)
        paths = ("model.layers.0.self_attn.o_proj",)
        ab = args.screen_ab and router.linear_gate(paths, device, dtype).screen is not None

        def run(fn, rm=rm, ab=ab):
            def base():
                with rm.bare() as m:
                    return fn(m)

            def unscreened():  # the same model and gates, the float32 GEMM at every size
                native.SCREEN = False
                try:
                    return fn(rm.model)
                finally:
                    native.SCREEN = True
            return measure(base, lambda: fn(rm.model), args.reps, *([unscreened] if ab else []))

        before = native.screen_stats()
        label = f"Quiver Arrow E={E}"
        cells([label] + ([f"Quiver Arrow E={E}, float32 gate GEMM (no screen)"] if ab else []), run)
        at = next(i for i, (lbl, _) in enumerate(rows) if lbl == label)
        rows[at] = (f"{label} (bank {rm.bank.memory_bytes() / 2**20:.0f} MiB)", rows[at][1])
        after = native.screen_stats()
        if after["columns"] > before["columns"]:
            exact = after["exact"] - before["exact"]
            calls = after["calls"] - before["calls"]
            screened.append(f"E={E}: {calls} calls ({(after['i8'] - before['i8']) / calls:.0%} by the int8 pass), "
                            f"{exact / (after['columns'] - before['columns']):.2%} of the gate columns computed in "
                            f"float32 ({exact / calls:.1f} per call)")
        rm.unwrap()
    for E in args.peft:
        from peft import ArrowConfig, create_arrow_model

        with tempfile.TemporaryDirectory() as d:
            paths = [str(lib.export_peft(n, Path(d) / n)) for n in names[:E]]
            peft_model = create_arrow_model(copy.deepcopy(model), paths, ArrowConfig(top_k=2, router_temperature=1.0))
            peft_model.eval()

            def run_peft(fn, peft_model=peft_model):
                return measure(lambda: fn(model), lambda: fn(peft_model), args.reps)

            cells([f"PEFT create_arrow_model E={E}"], run_peft)
            del peft_model, run_peft

    keys = ["prefill 8x128", "decode b=1", "decode b=16"]
    if rows:
        print("| configuration | " + " | ".join(f"{k} (x base)" for k in keys) + " |")
        print("|---|" + "---|" * len(keys))
        for label, cells_ in rows:
            print(f"| {label} | " + " | ".join(f"{o / b:.2f}x ({o * 1e3:.0f} ms)"
                                               for b, o in (cells_[k] for k in keys)) + " |")
        base_cells = rows[0][1]
        print("| bare base model | " + " | ".join(f"1.00x ({base_cells[k][0] * 1e3:.0f} ms)" for k in keys) + " |")
        quiver16 = next((c for lbl, c in rows if lbl.startswith("Quiver Arrow E=16 ")), None)
        peft16 = next((c for lbl, c in rows if lbl.startswith("PEFT create_arrow_model E=16")), None)
        if quiver16 and peft16:
            print("\nQuiver vs PEFT Arrow at E=16 (targets: prefill >= 3x, decode >= 2x): " + ", ".join(
                f"{k} {peft16[k][1] / quiver16[k][1]:.1f}x" for k in keys))
    if screened:
        print("\nscreened gates (routing.base.GateScreen): " + "; ".join(screened))
    if args.mixed:
        mixed_routings(model, lib, names[:args.mixed], args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak RSS of this process: {peak:.0f} MiB (base model: "
          f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
