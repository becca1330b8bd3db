"""Random adapters for tests, benchmarks and demos (seeded, any base-model spec)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapter import BaseModelRef, LoraAdapter, LoraModule
from .base_model import BaseModelSpec

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_paths(spec: BaseModelSpec, targets: Sequence[str] = ALL_PROJECTIONS) -> list[str]:
    """Full paths of the base model's linears whose last name is in ``targets``."""
    return sorted(p for p in spec.linears if p.rsplit(".", 1)[-1] in targets)


def random_adapter(spec: BaseModelSpec, name: str, *, rank: int = 8, alpha: float = 16.0,
                   targets: Sequence[str] = ALL_PROJECTIONS, seed: int = 0,
                   std: float = 0.02, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """A LoRA with Gaussian A and B (B non-zero, unlike a fresh training init)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path in module_paths(spec, targets):
        d_out, d_in = spec.linears[path]
        A = torch.randn(rank, d_in, generator=g, dtype=torch.float32) * std
        B = torch.randn(d_out, rank, generator=g, dtype=torch.float32) * std
        modules[path] = LoraModule(A=A.to(dtype), B=B.to(dtype), alpha=alpha)
    if not modules:
        raise ValueError(f"no linear of {spec.id!r} matches targets {list(targets)}")
    return LoraAdapter(name=name, base_model=BaseModelRef(spec.id, spec.fingerprint), modules=modules)


# SmolLM2-135M's architecture (a Llama): for random models of the same shapes and cost.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def smollm2_spec() -> BaseModelSpec:
    """SmolLM2-135M's linear shapes, without loading it (for benchmarks and sizing)."""
    c = SMOLLM2_135M
    hidden, mlp = c["hidden_size"], c["intermediate_size"]
    kv = hidden // c["num_attention_heads"] * c["num_key_value_heads"]
    linears = {}
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        for proj, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
                            ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (mlp, hidden)), ("mlp.up_proj", (mlp, hidden)),
                            ("mlp.down_proj", (hidden, mlp))):
            linears[f"{pre}.{proj}"] = shape
    return BaseModelSpec(id="smollm2-135m-shapes", fingerprint="synthetic", dtype="float32", linears=linears)
