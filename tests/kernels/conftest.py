"""Shared kernel-test fixtures: random routed cases and the per-dtype tolerance check.

Tolerances follow Liger's habit for low precision: the backend's error against a float32
computation (on the same, already rounded, inputs) may be at most ``factor`` times the error
torch's own reference makes in that dtype, plus a ``floor`` (relative to the output's
magnitude) for outputs torch gets exactly right, e.g. all-zero rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from quiver.kernels import LoraBank, mixture_lora_reference

# dtype -> (factor on torch's own error, floor relative to max |gold|). The factor is 3, not 1:
# the grouped path rounds each slot's product to the dtype before summing the k slots in
# float32, so it can round twice where torch's single einsum rounds once (measured worst case
# 2.6x over 10 seeds of these shapes); a real bug is off by orders of magnitude.
TOLERANCES = {
    torch.float32: (0.0, 1e-5),
    torch.bfloat16: (3.0, 2e-3),
    torch.float16: (3.0, 2e-4),
}

def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: Triton kernels run by TRITON_INTERPRET=1 on CPU")


@dataclass
class Case:
    x: torch.Tensor  # [T, d_in]
    bank: LoraBank
    indices: torch.Tensor  # int32 [T, k]
    weights: torch.Tensor  # float32 [T, k]


def make_case(T, d_in, d_out, ranks, k, dtype=torch.float32, seed=0, device="cpu") -> Case:
    """A random bank and decision with every awkward feature of real routing.

    Slots are drawn with replacement (so indices repeat within rows when E is small), ~10% of
    slots are -1, every 7th row is all -1 and every 5th row repeats its first adapter. Values
    are O(1): x ~ N(0, 1), A_e ~ N(0, 1/d_in), B_e ~ N(0, 1/r_e), weights in (0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(r, d_in, generator=g) / d_in**0.5, torch.randn(d_out, r, generator=g) / r**0.5)
               for r in ranks]
    scalings = torch.rand(len(ranks), generator=g).add(0.5).tolist()
    bank = LoraBank.from_factors(factors, scalings, dtype=dtype, device=device)
    indices = torch.randint(0, len(ranks), (T, k), generator=g, dtype=torch.int32)
    indices[torch.rand(T, k, generator=g) < 0.1] = -1
    indices[::7] = -1
    if k > 1:
        indices[1::5, 1] = indices[1::5, 0]
    weights = torch.rand(T, k, generator=g)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    return Case(x.to(device), bank, indices.to(device), weights.to(device))


def assert_matches_reference(out: torch.Tensor, case: Case) -> None:
    """``out`` has the right shape and dtype, is finite and lies within the dtype's error budget."""
    assert out.shape == (case.x.shape[0], case.bank.d_out) and out.dtype == case.x.dtype
    assert torch.isfinite(out).all()
    if out.numel() == 0:
        return
    gold = mixture_lora_reference(case.x.float(), case.bank.to(dtype=torch.float32), case.indices, case.weights)
    factor, floor = TOLERANCES[case.x.dtype]
    torch_err = 0.0
    if case.x.dtype != torch.float32:
        torch_out = mixture_lora_reference(case.x, case.bank, case.indices, case.weights)
        torch_err = (torch_out.float() - gold).abs().max().item()
    scale = gold.abs().max().item()
    budget = factor * torch_err + floor * max(scale, 1.0)
    err = (out.float() - gold).abs().max().item()
    assert err <= budget, (f"max error {err:.3g} > budget {budget:.3g} "
                           f"(torch {case.x.dtype} error {torch_err:.3g}, max |gold| {scale:.3g})")


@pytest.fixture(scope="session")
def case_factory():
    return make_case


@pytest.fixture(scope="session")
def check():
    return assert_matches_reference
