"""Benchmark: TIES-merging 8 LoRA adapters, Quiver against PEFT, time and peak memory.

    python -m quiver.bench.merging [--adapters 8] [--rank 8] [--density 0.2] [--dtype float32]

A random Llama of SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP
1536, vocab 49152, tied embeddings) is saved to a temporary directory with ``--adapters``
random rank-``--rank`` adapters on all seven projections of every layer, both as Quiver
adapter files and as PEFT adapter directories. Each job then runs in its own subprocess, which
reports its wall time (loading its inputs and writing its output included) and its peak RSS
(``VmHWM``, the interpreter and imports included; ``import torch`` alone is ~220 MiB):

* ``quiver-lora``        ``merge(adapters, "ties", rank=r)``, saved as one adapter file
* ``quiver-checkpoint``  ``merge_to_checkpoint(base, adapters, out, "ties")``
* ``peft-lora``          ``add_weighted_adapter(combination_type="ties")`` + ``save_pretrained``
                         (PEFT merges the A and the B factors separately: cheap, not ``Σ ΔWᵢ``)
* ``peft-ties-svd-lora`` ``add_weighted_adapter(combination_type="ties_svd", svd_rank=r)``, the
                         like-for-like LoRA output (TIES on the dense ``ΔWᵢ``, then an SVD)
* ``peft-checkpoint``    ``ties`` + ``merge_and_unload`` + ``save_pretrained``

and the parent prints one table with the ratios, all measured in this one run. Jobs run
``--repeat`` times, interleaved, and the table keeps each job's fastest time (the machine may
be shared) and largest peak.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from quiver.library.synthetic import ALL_PROJECTIONS as PROJECTIONS
from quiver.library.synthetic import SMOLLM2_135M

JOBS = ("quiver-lora", "quiver-checkpoint", "peft-lora", "peft-ties-svd-lora", "peft-checkpoint")


# -- setup (parent) -------------------------------------------------------------------------------
def prepare(work: Path, adapters: int, rank: int, dtype: torch.dtype) -> int:
    """Write the base model and the adapters under ``work``; return the model's size in bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype)
    model.save_pretrained(work / "base")
    shapes = {
        name.removesuffix(".weight"): tuple(p.shape)
        for name, p in model.named_parameters()
        if name.rsplit(".", 2)[-2] in PROJECTIONS
    }
    del model
    for i in range(adapters):
        _write_adapter(work, f"adapter{i}", shapes, rank, seed=i)
    return sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))


def _write_adapter(work: Path, name: str, shapes: dict, rank: int, seed: int) -> None:
    from safetensors.torch import save_file

    from quiver.library.adapter import BaseModelRef, LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    modules = {
        path: LoraModule(
            A=torch.randn(rank, d_in, generator=g) / d_in**0.5,
            B=torch.randn(d_out, rank, generator=g) * 0.01,
            alpha=2.0 * rank,
        )
        for path, (d_out, d_in) in shapes.items()
    }
    adapter = LoraAdapter(name, BaseModelRef("smollm2-shapes", "0" * 64), modules)
    (work / f"{name}.safetensors").write_bytes(adapter.to_bytes())

    peft_dir = work / "peft" / name
    peft_dir.mkdir(parents=True)
    tensors = {}
    for path, m in modules.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = m.A
        tensors[f"base_model.model.{path}.lora_B.weight"] = m.B
    save_file(tensors, peft_dir / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2.0 * rank,
        "target_modules": list(PROJECTIONS), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": str(work / "base"),
    }  # fmt: skip
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))


# -- jobs (one subprocess each) -------------------------------------------------------------------
def run_job(job: str, work: Path, adapters: int, rank: int, density: float) -> dict:
    out = work / f"out-{job}"
    start = time.perf_counter()
    if job.startswith("quiver"):
        _quiver(job, work, out, adapters, rank, density)
    else:
        _peft(job, work, out, adapters, rank, density)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)  # the next repetition writes it again
    return {"job": job, "seconds": seconds, "peak_rss": _peak_rss()}


def _quiver(job: str, work: Path, out: Path, adapters: int, rank: int, density: float) -> None:
    from quiver.library.adapter import LoraAdapter
    from quiver.merging import merge, merge_to_checkpoint

    names = [f"adapter{i}" for i in range(adapters)]
    loaded = [LoraAdapter.from_bytes((work / f"{n}.safetensors").read_bytes(), n) for n in names]
    if job == "quiver-lora":
        merged = merge(loaded, "ties", rank=rank, density=density)
        out.mkdir()
        (out / "merged.safetensors").write_bytes(merged.to_bytes())
    else:
        merge_to_checkpoint(work / "base", loaded, out, "ties", density=density)


def _peft(job: str, work: Path, out: Path, adapters: int, rank: int, density: float) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = [f"adapter{i}" for i in range(adapters)]
    base = AutoModelForCausalLM.from_pretrained(work / "base")
    model = PeftModel.from_pretrained(base, work / "peft" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(work / "peft" / name, adapter_name=name)
    combination = "ties_svd" if job == "peft-ties-svd-lora" else "ties"
    model.add_weighted_adapter(
        names, [1.0] * adapters, "merged", combination_type=combination,
        density=density, svd_rank=rank,
    )  # fmt: skip
    if job == "peft-checkpoint":
        model.merge_and_unload(adapter_names=["merged"]).save_pretrained(out)
    else:
        model.save_pretrained(out, selected_adapters=["merged"])


def _peak_rss() -> int:
    """This process's peak resident memory in bytes. ``VmHWM``, not ``ru_maxrss``: Linux keeps
    ``ru_maxrss`` across ``execve``, so a child would report its parent's peak."""
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
        * 1024
    )


# -- report (parent) ------------------------------------------------------------------------------
def table(results: dict[str, dict], model_bytes: int, baseline: int) -> str:
    mb = 2**20
    rows = [
        f"model: SmolLM2-135M shapes, {model_bytes / mb:.0f} MiB of weights; "
        f"interpreter + torch alone: {baseline / mb:.0f} MiB RSS",
        "",
        f"{'job':<20} {'seconds':>8} {'peak RSS MiB':>13} {'RSS / model':>12}",
    ]
    for job, r in results.items():
        rows.append(
            f"{job:<20} {r['seconds']:>8.1f} {r['peak_rss'] / mb:>13.0f} "
            f"{r['peak_rss'] / model_bytes:>12.2f}"
        )
    rows += ["", f"{'ratio (Quiver / PEFT)':<40} {'time':>6} {'peak RSS':>9}"]
    for ours, theirs in [
        ("quiver-lora", "peft-lora"),
        ("quiver-lora", "peft-ties-svd-lora"),
        ("quiver-checkpoint", "peft-checkpoint"),
    ]:
        if ours not in results or theirs not in results:
            continue
        a, b = results[ours], results[theirs]
        rows.append(
            f"{ours + ' / ' + theirs:<40} {a['seconds'] / b['seconds']:>6.2f} "
            f"{a['peak_rss'] / b['peak_rss']:>9.2f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--repeat", type=int, default=3, help="runs per job, interleaved")
    parser.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)  # the child's side
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        print(json.dumps(run_job(args.job, args.workdir, args.adapters, args.rank, args.density)))
        return

    with tempfile.TemporaryDirectory(prefix="quiver-bench-merging-") as tmp:
        work = Path(tmp)
        model_bytes = prepare(work, args.adapters, args.rank, getattr(torch, args.dtype))
        common = ["--adapters", str(args.adapters), "--rank", str(args.rank),
                  "--density", str(args.density), "--workdir", str(work)]  # fmt: skip
        results: dict[str, dict] = {}
        for _ in range(args.repeat):
            for job in args.jobs:
                child = [sys.executable, "-m", "quiver.bench.merging", "--job", job, *common]
                done = subprocess.run(child, check=True, capture_output=True, text=True)
                run = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{job}: {run['seconds']:.1f} s", file=sys.stderr)
                best = results.setdefault(job, run)  # fastest time, largest peak
                best["seconds"] = min(best["seconds"], run["seconds"])
                best["peak_rss"] = max(best["peak_rss"], run["peak_rss"])
        probe = "import quiver.merging, quiver.bench.merging as b; print(b._peak_rss())"
        baseline = subprocess.run(
            [sys.executable, "-c", probe], check=True, capture_output=True, text=True
        )
        print(table(results, model_bytes, int(baseline.stdout)))


if __name__ == "__main__":
    main()
