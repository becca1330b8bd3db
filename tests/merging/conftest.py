"""Fixtures for the merging tests: random LoRA adapters and a tiny random Llama checkpoint."""

from pathlib import Path

import pytest
import torch

from quiver.library.adapter import BaseModelRef, LoraAdapter, LoraModule

TINY_LAYERS = 2  # the shared tiny Llama of tests/conftest.py (hidden 32, MLP 64, 4 heads / 2 KV heads)
PROJECTIONS = {  # short name -> (d_out, d_in) in the tiny Llama (head_dim 8, 2 KV heads)
    "self_attn.q_proj": (32, 32),
    "self_attn.k_proj": (16, 32),
    "self_attn.v_proj": (16, 32),
    "self_attn.o_proj": (32, 32),
    "mlp.gate_proj": (64, 32),
    "mlp.up_proj": (64, 32),
    "mlp.down_proj": (32, 64),
}
TINY_MODULES = {
    f"model.layers.{layer}.{proj}": shape
    for layer in range(TINY_LAYERS)
    for proj, shape in PROJECTIONS.items()
}
BASE = BaseModelRef(id="tiny-llama", fingerprint="f" * 64)


def _make_adapter(
    name: str,
    seed: int,
    modules: dict[str, tuple[int, int]] = TINY_MODULES,
    rank: int = 4,
    alpha: float = 8.0,
    use_rslora: bool = False,
    base: BaseModelRef = BASE,
    std: float = 0.3,
) -> LoraAdapter:
    """A LoRA adapter with Gaussian factors (both nonzero, unlike a fresh PEFT init)."""
    generator = torch.Generator().manual_seed(seed)
    factors = {
        path: LoraModule(
            A=std * torch.randn(rank, d_in, generator=generator),
            B=std * torch.randn(d_out, rank, generator=generator),
            alpha=alpha,
        )
        for path, (d_out, d_in) in modules.items()
    }
    return LoraAdapter(name=name, base_model=base, modules=factors, use_rslora=use_rslora)


@pytest.fixture(scope="session")
def make_adapter():
    """``make_adapter(name, seed, modules={path: (d_out, d_in)}, rank=4, alpha=8.0, ...)``."""
    return _make_adapter


@pytest.fixture(scope="session")
def tiny_modules() -> dict[str, tuple[int, int]]:
    """The tiny Llama's seven projections per layer: ``{module path: (d_out, d_in)}``."""
    return dict(TINY_MODULES)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir) -> Path:
    """The shared tiny Llama (``tiny_model_dir``) saved with its tokenizer."""
    return tiny_model_dir
