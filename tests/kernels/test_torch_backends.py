"""The PyTorch backends: the reference against an independent per-token loop, the grouped
path against the reference over dtypes, ranks, k, E, empty and ragged inputs."""

from __future__ import annotations

import pytest
import torch

from quiver.kernels import LoraBank, build_meta, mixture_lora, mixture_lora_grouped, mixture_lora_reference, native
from quiver.kernels.dispatch import BACKENDS
from quiver.kernels.torch_ref import mixture_lora_gather

# name -> (T, d_in, d_out, ranks of the bank's adapters, k)
SHAPES = {
    "rank1_k1": (33, 37, 19, [1, 1, 1, 1], 1),
    "mixed_ranks": (65, 577, 37, [1, 2, 7, 8, 16, 33, 64], 3),
    "k8": (129, 64, 48, [8] * 16, 8),
    "one_adapter": (50, 37, 37, [5], 2),
    "one_adapter_many_blocks": (1500, 37, 19, [3], 2),  # one segment across several BLOCK_ROWS blocks
    "E1024": (300, 64, 32, [4] * 1024, 2),
    "empty": (0, 37, 19, [4, 8], 2),
    "one_token": (1, 577, 37, [16, 3], 4),
    "smollm2_q": (256, 576, 576, [8] * 16, 2),
    "smollm2_kv": (256, 576, 192, [8] * 16, 2),
    "smollm2_up": (256, 576, 1536, [8] * 16, 2),
    "smollm2_down": (256, 1536, 576, [16, 8, 4] * 4, 2),
    "long": (3000, 64, 64, [8] * 64, 4),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_reference_matches_per_token_delta_w(case_factory):
    """The oracle against Σ_j w_tj · ΔW_e x_t, with ΔW_e = s_e B_e A_e formed densely in float64."""
    torch.manual_seed(0)
    ranks, scalings, d_in, d_out = [3, 1, 6], [0.5, 2.0, 1.0], 11, 7
    factors = [(torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64))
               for r in ranks]
    bank = LoraBank.from_factors(factors, scalings, dtype=torch.float64)
    x = torch.randn(9, d_in, dtype=torch.float64)
    indices = torch.tensor([[0, 1], [2, 2], [-1, 0], [-1, -1], [1, -1], [0, 0], [2, 1], [1, 2], [0, 2]])
    weights = torch.rand(9, 2, dtype=torch.float64)
    expected = torch.zeros(9, d_out, dtype=torch.float64)
    for t in range(9):
        for j in range(2):
            e = int(indices[t, j])
            if e >= 0:
                a, b = factors[e]
                expected[t] += weights[t, j] * scalings[e] * (b @ a) @ x[t]
    torch.testing.assert_close(mixture_lora_reference(x, bank, indices, weights), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SHAPES)
def test_grouped_matches_reference(name, dtype, case_factory, check):
    case = case_factory(*SHAPES[name], dtype=dtype)
    meta = build_meta(case.indices, case.weights, case.bank.num_adapters)
    check(mixture_lora_grouped(case.x, case.bank, meta), case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SHAPES)
def test_gather_matches_reference(name, dtype, case_factory, check):
    case = case_factory(*SHAPES[name], dtype=dtype)
    check(mixture_lora_gather(case.x, case.bank, case.indices, case.weights), case)


@pytest.mark.parametrize("backend", ["reference", "grouped", "gather", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason=f"native backend: {native.unavailable()}"))])
def test_rank_padding_is_never_read(backend, case_factory):
    """NaN in the padding rows of A / columns of B must not reach the output."""
    case = case_factory(40, 37, 19, [1, 4, 9], 2)
    A, B = case.bank.A.clone(), case.bank.B.clone()
    for e, r in enumerate(case.bank.rank_list):
        A[e, r:] = float("nan")
        B[e, :, r:] = float("nan")
    poisoned = LoraBank(A, B, case.bank.ranks)
    clean = mixture_lora(case.x, case.bank, case.indices, case.weights, backend="reference")
    torch.testing.assert_close(mixture_lora(case.x, poisoned, case.indices, case.weights, backend=backend), clean)


def test_all_empty_rows_give_zeros(case_factory):
    case = case_factory(12, 37, 19, [2, 3], 3)
    none = torch.full_like(case.indices, -1)
    for backend in ("reference", "grouped", "gather"):
        out = mixture_lora(case.x, case.bank, none, case.weights, backend=backend)
        assert torch.equal(out, torch.zeros(12, 19))


def test_grouped_is_linear_in_the_gate_weights(case_factory):
    """Doubling one slot's weight adds exactly that slot's contribution once more."""
    case = case_factory(30, 37, 19, [2, 5, 8], 2)
    idx0 = case.indices.clone()
    idx0[:, 1] = -1
    only0 = mixture_lora(case.x, case.bank, idx0, case.weights, backend="grouped")
    w2 = case.weights.clone()
    w2[:, 0] *= 2
    base = mixture_lora(case.x, case.bank, case.indices, case.weights, backend="grouped")
    doubled = mixture_lora(case.x, case.bank, case.indices, w2, backend="grouped")
    torch.testing.assert_close(doubled - base, only0, atol=1e-5, rtol=1e-5)


def _transposed_b(bank: LoraBank) -> LoraBank:
    """The same bank with B held as the runtime's AdapterBank holds it: the transposed view of a
    contiguous ``[E, R, d_out]`` tensor."""
    return LoraBank(bank.A, bank.B.transpose(1, 2).contiguous().transpose(1, 2), bank.ranks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("backend", ["gather", "grouped"])
def test_accumulating_forms_add_the_delta_into_out(backend, name, dtype, case_factory, check):
    """``out += delta`` in place (the base output): from zeros it is the delta itself, within the
    dtype's budget, also for a bank whose B is stored transposed; from a random ``out`` (float32)
    it adds exactly what the plain form returns."""
    case = case_factory(*SHAPES[name], dtype=dtype)
    for bank in (case.bank, _transposed_b(case.bank)):
        c = type(case)(case.x, bank, case.indices, case.weights)
        meta = build_meta(c.indices, c.weights, bank.num_adapters)
        fn = BACKENDS[backend].accumulate["merge-after"]
        out = torch.zeros(c.x.shape[0], bank.d_out, dtype=dtype)
        assert fn(c.x, bank, c.indices, c.weights, meta, out) is out
        check(out, c)
    if dtype == torch.float32:
        y0 = torch.randn(case.x.shape[0], case.bank.d_out, generator=torch.Generator().manual_seed(1))
        out = fn(case.x, case.bank, case.indices, case.weights, meta, y0.clone())
        plain = BACKENDS[backend].impls["merge-after"](case.x, case.bank, case.indices, case.weights, meta)
        torch.testing.assert_close(out - y0, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["mixed_ranks", "k8", "empty", "one_token", "smollm2_up"])
@pytest.mark.parametrize("backend", ["reference", "gather", "grouped"])
def test_backends_read_a_transposed_b_bank(backend, name, dtype, case_factory, check):
    case = case_factory(*SHAPES[name], dtype=dtype)
    case = type(case)(case.x, _transposed_b(case.bank), case.indices, case.weights)
    check(mixture_lora(case.x, case.bank, case.indices, case.weights, backend=backend), case)


def test_accumulating_gather_keeps_gradients(case_factory):
    """Autograd follows the in-place form too (x, gate weights, factors), as the plain one."""
    case = case_factory(6, 37, 19, [2, 5, 8], 2, dtype=torch.float64)
    A, B = case.bank.A.clone().requires_grad_(), case.bank.B.clone().requires_grad_()
    x, w = case.x.clone().requires_grad_(), case.weights.double().requires_grad_()
    bank = LoraBank(A, B, case.bank.ranks)
    y0 = torch.randn(6, 19, dtype=torch.float64, requires_grad=True)
    got = mixture_lora_gather(x, bank, case.indices, w, out=y0 * 1)
    want = y0 + mixture_lora_reference(x, bank, case.indices, w)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (x, w, A, B, y0), g)
    ref = torch.autograd.grad(want, (x, w, A, B, y0), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T, k, ranks", [(1, 2, [8] * 6), (16, 2, [4] * 16), (5, 3, [1, 4, 9, 9]), (0, 2, [8, 8]),
                                         (3, 4, [2, 2])], ids=["decode1", "decode16", "mixed_ranks", "empty", "k4"])
def test_fused_sibling_gather_matches_each_module_alone(T, k, ranks, dtype, case_factory, check):
    """Three modules reading one x (d_out 19, 7, 33), each with its own bank and decision (NaN in
    rank padding): each ``outs[m]`` gets exactly its module's delta."""
    from quiver.kernels.torch_ref import mixture_lora_gather_siblings

    cases = [case_factory(T, 37, d_out, ranks, k, dtype=dtype, seed=s) for s, d_out in enumerate((19, 7, 33))]
    x = cases[0].x
    cases = [type(c)(x, c.bank, c.indices, c.weights) for c in cases]
    banks = []
    for c in cases:
        A, B = c.bank.A.clone(), c.bank.B.clone()
        for e, r in enumerate(c.bank.rank_list):
            A[e, r:], B[e, :, r:] = float("nan"), float("nan")
        banks.append(LoraBank(A, B, c.bank.ranks))
    outs = [torch.zeros(T, c.bank.d_out, dtype=dtype) for c in cases]
    idx = torch.stack([c.indices for c in cases])
    w = torch.stack([c.weights for c in cases])
    mixture_lora_gather_siblings(x, banks, idx, w.to(dtype), outs)
    for out, c in zip(outs, cases):
        check(out, c)
