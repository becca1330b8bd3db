"""The dispatcher: backend choice, leading dims, validation at the boundary."""

from __future__ import annotations

import pytest
import torch

import dataclasses

from quiver.kernels import BACKENDS, LoraBank, build_meta, mixture_lora, pick_backend
from quiver.kernels.dispatch import MODES


def test_registry_names():
    assert set(BACKENDS) == {"reference", "gather", "grouped", "dense", "native", "triton"}


def test_unknown_backend_lists_valid_names(case_factory):
    case = case_factory(4, 8, 6, [2], 1)
    with pytest.raises(ValueError, match="valid: auto, reference, gather, grouped, dense, native, triton"):
        mixture_lora(case.x, case.bank, case.indices, case.weights, backend="cuda")


def test_auto_is_gather_for_small_calls_and_grouped_on_cpu(case_factory, monkeypatch):
    monkeypatch.setitem(BACKENDS, "native", dataclasses.replace(BACKENDS["native"], devices=lambda d: False))
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


def _grads(backend: str, mode: str, case, cotangent: torch.Tensor):
    leaves = {k: v.clone().requires_grad_() for k, v in
              {"x": case.x, "A": case.bank.A, "B": case.bank.B, "weights": case.weights}.items()}
    bank = LoraBank(leaves["A"], leaves["B"], case.bank.ranks)
    out = mixture_lora(leaves["x"], bank, case.indices, leaves["weights"], backend=backend, mode=mode)
    (out * cotangent).sum().backward()
    return out.detach(), {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}


@pytest.mark.parametrize("mode, backend", [(m, b) for m in MODES for b in BACKENDS
                                           if b != "triton" and m in BACKENDS[b].impls and b != "reference"
                                           and BACKENDS[b].autograd])
def test_every_backend_gives_the_reference_gradients(mode, backend, case_factory):
    """x, the gate weights and both factors (ranks 2-5 mixed in one bank, empty slots, repeats)."""
    for T in (5, 40):  # both sides of SMALL_SLOTS
        case = case_factory(T, 12, 9, [2, 4, 3, 5], 2, seed=T)
        g = torch.randn(T, 9, generator=torch.Generator().manual_seed(1))
        out, got = _grads(backend, mode, case, g)
        ref_out, want = _grads("reference", mode, case, g)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=f"{backend} {mode} d{k}")
        assert got["weights"].abs().sum() > 0 and got["A"].abs().sum() > 0 and got["B"].abs().sum() > 0


def test_backends_declare_what_they_support_and_refuse_the_rest(case_factory, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = case_factory(40, 8, 6, [2, 3], 2)
    with pytest.raises(ValueError, match=r"backend 'triton' does not run on cpu \(it runs on cuda, or on cpu "
                                         r"under TRITON_INTERPRET=1\)"):
        mixture_lora(case.x, case.bank, case.indices, case.weights, backend="triton")
    with pytest.raises(ValueError, match=r"backend 'gather' does not implement merge-before"):
        mixture_lora(case.x, case.bank, case.indices, case.weights, backend="gather", mode="merge-before")
    with pytest.raises(ValueError, match="unknown mixing mode 'sideways'"):
        mixture_lora(case.x, case.bank, case.indices, case.weights, mode="sideways")
    # auto follows the declarations: merge-before never picks gather; a backend that declared no
    # autograd would be skipped when a gradient is needed
    assert pick_backend(case.x, 4, "merge-before") == "reference"
    assert pick_backend(case.x, 400, "merge-before") == "grouped"
    monkeypatch.setitem(BACKENDS, "grouped", dataclasses.replace(BACKENDS["grouped"], autograd=False))
    x64 = case.x.double()  # float64: the native backend (float32 only) is not a candidate
    assert pick_backend(x64, 400, grad=False) == "grouped"
    assert pick_backend(x64, 400, grad=True) == "reference"
    assert pick_backend(case.x, 400, grad=True) == "reference"  # neither native nor grouped has a backward
    x = case.x.clone().requires_grad_()
    with pytest.raises(ValueError, match="backend 'grouped' has no backward, and this call needs gradients"):
        mixture_lora(x, case.bank, case.indices, case.weights, backend="grouped")
