"""The native CPU backend (C, compiled at first use) against the reference: shapes, ranks, k,
E, empty and ragged inputs, both B layouts, the accumulating form, batch invariance, bad
indices, and the dispatcher's fallback when it cannot be built."""

from __future__ import annotations

import pytest
import torch

from quiver.kernels import LoraBank, mixture_lora, pick_backend
from quiver.kernels import native
from quiver.kernels.dispatch import BACKENDS

from .test_torch_backends import SHAPES, _transposed_b

needs_native = pytest.mark.skipif(not native.available(), reason=f"native backend: {native.unavailable()}")


@needs_native
@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize("name", SHAPES)
def test_native_matches_reference(name, layout, case_factory, check):
    case = case_factory(*SHAPES[name])
    bank = case.bank if layout == "plain" else _transposed_b(case.bank)
    case = type(case)(case.x, bank, case.indices, case.weights)
    check(mixture_lora(case.x, bank, case.indices, case.weights, backend="native"), case)


@needs_native
@pytest.mark.parametrize("name", ["mixed_ranks", "k8", "empty", "smollm2_q", "smollm2_down"])
def test_native_adds_into_out_exactly_what_it_returns(name, case_factory):
    case = case_factory(*SHAPES[name])
    bank = _transposed_b(case.bank)
    y0 = torch.randn(case.x.shape[0], bank.d_out, generator=torch.Generator().manual_seed(1))
    out = y0.clone()
    fn = BACKENDS["native"].accumulate["merge-after"]
    assert fn(case.x, bank, case.indices, case.weights, None, out) is out
    plain = BACKENDS["native"].impls["merge-after"](case.x, bank, case.indices, case.weights, None)
    torch.testing.assert_close(out - y0, plain, atol=1e-5, rtol=1e-5)
    assert plain.numel() == 0 or plain.abs().max() > 0  # a real delta was added (no case is all -1)


@needs_native
def test_a_token_gets_bitwise_the_same_delta_in_any_batch(case_factory):
    """Each token's row depends on its own input and decision only: batching never changes it."""
    case = case_factory(33, 576, 192, [8, 4, 8, 2, 8], 2)
    bank = _transposed_b(case.bank)
    together = mixture_lora(case.x, bank, case.indices, case.weights, backend="native")
    assert together.abs().max() > 0
    for t in range(33):
        alone = mixture_lora(case.x[t:t + 1], bank, case.indices[t:t + 1], case.weights[t:t + 1], backend="native")
        assert torch.equal(alone[0], together[t])


@needs_native
def test_native_never_reads_rank_padding(case_factory):
    case = case_factory(40, 37, 19, [1, 4, 9], 2)
    A, B = case.bank.A.clone(), case.bank.B.clone()
    for e, r in enumerate(case.bank.rank_list):
        A[e, r:] = float("nan")
        B[e, :, r:] = float("nan")
    poisoned = LoraBank(A, B, case.bank.ranks)
    clean = mixture_lora(case.x, case.bank, case.indices, case.weights, backend="reference")
    torch.testing.assert_close(mixture_lora(case.x, poisoned, case.indices, case.weights, backend="native"), clean)


@needs_native
@pytest.mark.parametrize("bad", [2, 7, -2])
def test_an_index_outside_the_bank_raises_and_writes_nothing(bad, case_factory):
    case = case_factory(6, 37, 19, [2, 3], 2)
    idx = case.indices.clone()
    idx[4, 1] = bad
    out = torch.randn(6, 19)
    before = out.clone()
    with pytest.raises(ValueError, match=rf"routing index {bad} outside \[-1, 2\)"):
        BACKENDS["native"].accumulate["merge-after"](case.x, case.bank, idx, case.weights, None, out)
    assert torch.equal(out, before)


@needs_native
def test_auto_picks_native_for_small_float32_calls_only(case_factory):
    small = case_factory(4, 8, 6, [2, 3], 2)
    assert pick_backend(small.x, small.indices.numel()) == "native"
    assert pick_backend(small.x.bfloat16(), small.indices.numel()) == "gather"  # float32 only
    assert pick_backend(small.x, small.indices.numel(), grad=True) == "gather"  # no autograd
    assert pick_backend(small.x, 400) == "grouped"


def test_without_a_compiler_the_backend_is_refused_with_the_reason(case_factory, monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("QUIVER_NATIVE", "0")
    case = case_factory(4, 8, 6, [2, 3], 2)
    assert native.unavailable() == "disabled by QUIVER_NATIVE=0"
    assert pick_backend(case.x, case.indices.numel()) == "gather"
    with pytest.raises(ValueError, match=r"backend 'native' does not run on cpu \(it runs on the cpu, once its C "
                                         r"kernel is built"):
        mixture_lora(case.x, case.bank, case.indices, case.weights, backend="native")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("QUIVER_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("QUIVER_CACHE", str(__import__("tempfile").mkdtemp()))  # nothing cached: must build
    assert not native.available() and "building native_mixture.c with /nonexistent/cc failed" in native.unavailable()
