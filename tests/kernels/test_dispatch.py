"""The dispatcher: backend choice, leading dims, validation at the boundary."""

from __future__ import annotations

import pytest
import torch

from quiver.kernels import BACKENDS, build_meta, mixture_lora, pick_backend


def test_registry_names():
    assert set(BACKENDS) == {"reference", "gather", "grouped", "triton"}


def test_unknown_backend_lists_valid_names(case_factory):
    case = case_factory(4, 8, 6, [2], 1)
    with pytest.raises(ValueError, match="valid: auto, reference, gather, grouped, triton"):
        mixture_lora(case.x, case.bank, case.indices, case.weights, backend="cuda")


def test_auto_is_gather_for_small_calls_and_grouped_on_cpu(case_factory):
    small = case_factory(4, 8, 6, [2, 3], 2)
    assert pick_backend(small.x, small.indices.numel()) == "gather"
    torch.testing.assert_close(mixture_lora(small.x, small.bank, small.indices, small.weights),
                               mixture_lora(small.x, small.bank, small.indices, small.weights, backend="gather"))
    case = case_factory(40, 8, 6, [2, 3], 2)
    assert pick_backend(case.x, case.indices.numel()) == "grouped"
    torch.testing.assert_close(mixture_lora(case.x, case.bank, case.indices, case.weights),
                               mixture_lora(case.x, case.bank, case.indices, case.weights, backend="grouped"))


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_leading_dims_are_flattened(backend, case_factory):
    case = case_factory(24, 8, 6, [2, 3], 2)
    flat = mixture_lora(case.x, case.bank, case.indices, case.weights, backend=backend)  # [24, 6]
    x3, idx3, w3 = case.x.view(2, 12, 8), case.indices.view(2, 12, 2), case.weights.view(2, 12, 2)
    assert torch.equal(mixture_lora(x3, case.bank, idx3, w3, backend=backend), flat.view(2, 12, 6))
    assert torch.equal(mixture_lora(x3, case.bank, case.indices, case.weights, backend=backend), flat.view(2, 12, 6))


def test_boundary_errors(case_factory):
    case = case_factory(10, 8, 6, [2, 3], 2)
    x, bank, idx, w = case.x, case.bank, case.indices, case.weights
    with pytest.raises(ValueError, match="d_in 9"):
        mixture_lora(torch.zeros(10, 9), bank, idx, w)
    with pytest.raises(ValueError, match="dtype and device"):
        mixture_lora(x.double(), bank, idx, w)
    with pytest.raises(ValueError, match="one shape"):
        mixture_lora(x, bank, idx, w[:, :1])
    with pytest.raises(ValueError, match="floating point"):
        mixture_lora(x, bank, idx, idx)
    with pytest.raises(ValueError, match="covers 5 tokens"):
        mixture_lora(x, bank, idx[:5], w[:5])
    with pytest.raises(ValueError, match="meta is for"):
        mixture_lora(x, bank, idx, w, meta=build_meta(idx[:5], w[:5], 2))


def test_grouped_gradients_equal_the_reference():
    import torch

    from quiver.kernels import LoraBank, mixture_lora

    g = torch.Generator().manual_seed(0)
    bank = LoraBank.from_factors([(torch.randn(r, 12, generator=g), torch.randn(9, r, generator=g)) for r in (2, 4, 3)])
    idx = torch.tensor([[0, 2], [1, -1], [2, 2], [0, 1], [-1, -1]])
    grads = {}
    for backend in ("reference", "grouped"):
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = torch.rand(5, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
        out = mixture_lora(x, bank, idx, w, backend=backend)
        (out * torch.arange(9.0)).sum().backward()
        grads[backend] = (out.detach(), x.grad, w.grad)
    for got, want in zip(grads["grouped"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert grads["grouped"][2].abs().sum() > 0  # the gate weights do receive gradient
