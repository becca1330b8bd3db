"""Merge-before mixing against its formula, on every backend that implements it."""

from __future__ import annotations

import pytest
import torch

from quiver.kernels import LoraBank, mixture_lora


@pytest.mark.parametrize("backend", ["reference", "grouped", "dense", "auto"])
def test_merge_before_equals_its_formula(backend):
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(4, 9, generator=g), torch.randn(7, 4, generator=g)) for _ in range(3)]
    bank = LoraBank.from_factors(factors, scalings=[0.5, 1.0, 2.0])
    x = torch.randn(5, 9, generator=g)
    idx = torch.tensor([[0, 1], [2, -1], [1, 1], [-1, -1], [2, 0]])
    w = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.4, 0.6], [0.0, 0.0], [0.9, 0.1]])
    got = mixture_lora(x, bank, idx, w, backend=backend, mode="merge-before")
    for t in range(5):
        A_mix = sum((w[t, j] * factors[e][0] for j, e in enumerate(idx[t].tolist()) if e >= 0), torch.zeros(4, 9))
        B_mix = sum((w[t, j] * [0.5, 1.0, 2.0][e] * factors[e][1] for j, e in enumerate(idx[t].tolist()) if e >= 0),
                    torch.zeros(7, 4))
        torch.testing.assert_close(got[t], B_mix @ A_mix @ x[t], atol=1e-5, rtol=1e-5)
