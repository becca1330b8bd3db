"""The native CPU backend (C, compiled at first use) against the reference: shapes, ranks, k,
E, empty and ragged inputs, both B layouts, the accumulating form, batch invariance, bad
indices, and the dispatcher's fallback when it cannot be built; then its top-k softmax for
linear gates against ``LinearGate.route`` (rank padding: tests/kernels/test_torch_backends.py)."""

from __future__ import annotations

import pytest
import torch

from quiver.kernels import mixture_lora, native, pick_backend
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
    """Each token's row depends on its own input and decision only: batching never changes it
    (a prefill-sized call over 40 adapters against each token alone)."""
    case = case_factory(300, 576, 192, [8, 4, 8, 2, 8] * 8, 2)
    bank = _transposed_b(case.bank)
    together = mixture_lora(case.x, bank, case.indices, case.weights, backend="native")
    assert together.abs().max() > 0
    for t in range(0, 300, 7):
        alone = mixture_lora(case.x[t:t + 1], bank, case.indices[t:t + 1], case.weights[t:t + 1], backend="native")
        assert torch.equal(alone[0], together[t])


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
def test_auto_picks_native_for_float32_inference_calls_only(case_factory):
    small = case_factory(4, 8, 6, [2, 3], 2)
    assert pick_backend(small.x, small.indices.numel()) == "native"
    assert pick_backend(small.x.bfloat16(), small.indices.numel()) == "gather"  # float32 only
    assert pick_backend(small.x, small.indices.numel(), grad=True) == "gather"  # no autograd
    assert pick_backend(small.x, 400) == "native"  # prefill-sized calls too
    assert pick_backend(small.x.bfloat16(), 400) == "grouped"
    assert pick_backend(small.x, 400, grad=True) == "grouped"


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


def _gate(M, E, d_in, k, absolute=True, temperature=1.0, absent=(), seed=0):
    from quiver.routing import LinearGate

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_in, M * E, generator=g)
    present = None
    if absent:
        present = torch.ones(M, E, dtype=torch.bool)
        for m, e in absent:
            present[m, e] = False
            weight[:, m * E + e] = 0.0  # as Arrow stores an adapter absent at a module
    n_present = E if present is None else int(present.sum(1).min())
    return LinearGate(weight, present, n_present, M, absolute=absolute, top_k=k, temperature=temperature)


def _native_gate(x, gate):
    return native.linear_gate_native(x, gate.weight, gate.present, gate.modules, gate.absolute, gate.top_k,
                                     gate.temperature)


@needs_native
@pytest.mark.parametrize("T", [0, 1, 5, 16, 32, 300])
@pytest.mark.parametrize("M,E,k", [(1, 4, 2), (3, 16, 2), (2, 256, 4), (1, 3, 8), (2, 7, 1)])
@pytest.mark.parametrize("absolute", [True, False], ids=["abs", "signed"])
def test_native_gate_equals_the_linear_gate(T, M, E, k, absolute):
    gate = _gate(M, E, 96, k, absolute=absolute, temperature=0.7 if absolute else 1.0)
    x = torch.randn(T, 96, generator=torch.Generator().manual_seed(T))
    idx, w = _native_gate(x, gate)
    want_idx, want_w = gate.route(x)
    assert idx.shape == w.shape == (M, T, min(k, E))
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)
    if T:
        torch.testing.assert_close(w.sum(-1), torch.ones(M, T))


@needs_native
@pytest.mark.parametrize("absent", [[(0, 1), (1, 0), (1, 3)], [(0, 0), (0, 1), (0, 2), (0, 3)]],
                         ids=["some", "all-at-one"])
def test_native_gate_skips_absent_adapters_and_pads_missing_slots(absent):
    """An adapter absent at a module is never chosen there; with fewer present than k the
    missing slots get -1 and weight 0 (as the PyTorch gate gives them)."""
    gate = _gate(2, 4, 24, 4, absent=absent)
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(3))
    idx, w = _native_gate(x, gate)
    want_idx, want_w = gate.route(x)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)
    for m, e in absent:
        assert not (idx[m] == e).any()
    assert (idx == -1).any() and (w[idx == -1] == 0).all()


@needs_native
def test_native_gate_breaks_ties_by_the_lower_index_and_rejects_a_bad_k():
    weight = torch.tensor([[1.0, 0.0, 1.0, -1.0], [0.0, 1.0, 0.0, 0.0]])  # |x·w| ties: 0, 2, 3
    idx, w = native.linear_gate_native(torch.tensor([[2.0, 1.0]]), weight, None, 1, True, 3, 1.0)
    assert idx.tolist() == [[[0, 2, 3]]]
    torch.testing.assert_close(w, torch.full((1, 1, 3), 1 / 3))
    with pytest.raises(ValueError, match="top_k 65 outside"):
        native.linear_gate_native(torch.zeros(1, 2), torch.zeros(2, 128), None, 1, True, 65, 1.0)


def _sibling_banks(d_in, d_outs, ranks, seed):
    from quiver.kernels import LoraBank

    g = torch.Generator().manual_seed(seed)
    banks = []
    for d_out in d_outs:
        factors = [(torch.randn(r, d_in, generator=g) / d_in**0.5, torch.randn(d_out, r, generator=g) / r**0.5)
                   for r in ranks]
        banks.append(_transposed_b(LoraBank.from_factors(factors, [1.0] * len(ranks))))
    return banks


@needs_native
@pytest.mark.parametrize("T", [0, 1, 3, 40])
@pytest.mark.parametrize("E,k,slots", [(4, 2, None), (6, 3, [5, 0, 3, 1, 4, 2]), (3, 8, None), (5, 1, [1, 2, 3, 4, 0])],
                         ids=["identity", "permuted", "k-above-E", "top1"])
@pytest.mark.parametrize("absent", [(), ((0, 1), (2, 0))], ids=["all-present", "some-absent"])
def test_fused_gate_mixture_equals_the_gate_then_the_mixture(T, E, k, slots, absent):
    """One call for M = 3 siblings (different d_out, ragged ranks, a router-to-bank slot map, some
    adapters absent at a module) adds into each output what the native gate followed by the
    per-module native mixture adds, bitwise, and agrees with the reference mixture."""
    from quiver.kernels.torch_ref import mixture_lora_reference

    d_in, d_outs = 24, (24, 8, 8)
    ranks = [2, 4, 3, 4, 1, 2][:E] if slots is None else [2, 4, 3, 4, 1, 2][: len(slots)]
    banks = _sibling_banks(d_in, d_outs, ranks, seed=E)
    gate = _gate(3, E, d_in, k, absent=absent, temperature=0.8)
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(T + 1))
    table = None if slots is None else torch.tensor(slots)
    outs = [torch.randn(T, d, generator=torch.Generator().manual_seed(d)) for d in d_outs]
    before = [o.clone() for o in outs]
    native.gate_mixture_native(x, gate.weight, gate.present, gate.absolute, gate.top_k, gate.temperature, table,
                               banks, outs)
    idx, w = _native_gate(x, gate)
    for m, (bank, o, o0) in enumerate(zip(banks, outs, before)):
        local = idx[m]
        bank_idx = local if table is None else torch.where(local >= 0, table[local.clamp_min(0)], -1)
        want = o0.clone()
        native.mixture_lora_native(x, bank, bank_idx, w[m], out=want)
        assert torch.equal(o, want)
        ref = mixture_lora_reference(x, bank, bank_idx, w[m])
        torch.testing.assert_close(o - o0, ref, atol=1e-5, rtol=1e-5)


@needs_native
def test_fused_gate_mixture_rejects_bad_input_and_writes_nothing():
    banks = _sibling_banks(16, (16, 8), [2, 2, 2], seed=0)
    gate = _gate(2, 3, 16, 2)
    x = torch.randn(4, 16)
    outs = [torch.zeros(4, 16), torch.zeros(4, 8)]
    with pytest.raises(ValueError, match=r"module 0 of the call, slot 0: a bank slot outside \[-1, 3\)"):
        native.gate_mixture_native(x, gate.weight, None, True, 2, 1.0, torch.tensor([7, 7, 7]), banks, outs)
    assert all((o == 0).all() for o in outs)
    with pytest.raises(ValueError, match="output \\(4, 9\\) for a bank of d_out 8"):  # the wrong width
        native.gate_mixture_native(x, gate.weight, None, True, 2, 1.0, None, banks, [outs[0], torch.zeros(4, 9)])
    with pytest.raises(ValueError, match="top_k 65 outside"):
        native.gate_mixture_native(x, torch.zeros(16, 2 * 70), None, True, 65, 1.0, None, banks, outs)
    with pytest.raises(ValueError, match="2 modules"):  # gate columns not M·E
        native.gate_mixture_native(x, torch.zeros(16, 7), None, True, 2, 1.0, None, banks, outs)


@needs_native
def test_a_prepared_gate_mixture_call_equals_the_one_shot_call_on_every_input():
    """GateMixtureCall prepared once gives, input after input (decode- and prefill-sized), what
    gate_mixture_native computes from scratch; it refuses inputs and outputs it was not prepared
    for, and a call whose bank was freed raises instead of reading freed storage."""
    import gc

    d_in, d_outs = 24, (24, 8)
    banks = _sibling_banks(d_in, d_outs, [2, 4, 3, 1], seed=5)
    gate = _gate(2, 4, d_in, 2, absent=[(1, 2)], temperature=0.9)
    table = torch.tensor([3, 0, 2, 1])
    call = native.GateMixtureCall(d_in, gate.weight, gate.present, gate.absolute, gate.top_k, gate.temperature,
                                  table, banks)
    for T in (1, 7, 1, 0, 40):
        x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(100 + T))
        got = [torch.randn(T, d, generator=torch.Generator().manual_seed(d)) for d in d_outs]
        want = [o.clone() for o in got]
        call(x, got)
        native.gate_mixture_native(x, gate.weight, gate.present, gate.absolute, gate.top_k, gate.temperature, table,
                                   banks, want)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), T
    outs = [torch.zeros(3, d) for d in d_outs]
    with pytest.raises(ValueError, match="width 24"):
        call(torch.randn(3, 16), outs)
    with pytest.raises(ValueError, match="float32"):
        call(torch.randn(3, d_in, dtype=torch.float64), outs)
    with pytest.raises(ValueError, match="torch.float64"):
        call(torch.randn(3, d_in), [outs[0], torch.zeros(3, 8, dtype=torch.float64)])
    with pytest.raises(ValueError, match="slots for a gate over 4"):
        native.GateMixtureCall(d_in, gate.weight, None, True, 2, 1.0, torch.tensor([0, 1]), banks)
    assert all((o == 0).all() for o in outs)
    del banks
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        call(torch.randn(3, d_in), outs)


def _screened_gate(M, E, d_in, k, absolute=True, absent=(), seed=0, rows=None, temperature=1.0):
    """A gate stored as Arrow stores it (unit columns) with its screen."""
    from quiver.routing import LinearGate
    from quiver.routing.base import GateScreen

    g = torch.Generator().manual_seed(seed)
    if rows is None:
        rows = torch.nn.functional.normalize(torch.randn(M * E, d_in, generator=g), dim=1)
    present = None
    if absent:
        present = torch.ones(M, E, dtype=torch.bool)
        for m, e in absent:
            present[m, e] = False
            rows[m * E + e] = 0.0
    n_present = E if present is None else int(present.sum(1).min())
    return LinearGate(rows.T.contiguous(), present, n_present, M, absolute=absolute, top_k=k,
                      temperature=temperature, screen=GateScreen.of(rows))


@pytest.fixture(params=["bf16", "i8"])
def screen_path(request, monkeypatch):
    """One of the screen's two first passes taken at every size: the bfloat16 GEMM as on a CPU
    with AMX (forced where there is none: PyTorch's bfloat16 GEMM computes the same there,
    slowly), or the int8 pass (which needs the C build's vector unit). Returns the token counts
    to test with (the int8 pass works in blocks of 8 tokens: 7 and 100 end in part-blocks)."""
    if request.param == "bf16":
        monkeypatch.setitem(native._state, "amx", True)
        monkeypatch.setattr(native, "SCREEN_MIN_WORK", 1)
    else:
        if native.available() and not native._state["width"]:
            pytest.skip("this build of the native backend has no vector unit: no int8 pass")
        monkeypatch.setitem(native._state, "amx", False)
        monkeypatch.setattr(native, "SCREEN_I8_MAX_TOKENS", 1 << 30)
    return [1, 7, 100]


def test_the_screen_bounds_the_low_precision_logit_error():
    """err_n bounds |x · w_n - x · l_n| and, with norm_n, |x · w_n - x~ · l_n| for x~ = bfloat16(x),
    for any x (random x, and x along the error itself, where Cauchy-Schwarz is tight), in float64;
    the C rounding of x is PyTorch's, and its dx the distance."""
    from quiver.routing.base import GateScreen

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 577, generator=g) * torch.logspace(-3, 1, 64)[:, None]
    screen = GateScreen.of(rows)
    low = screen.low.double()
    diff = rows.double() - low
    xs = torch.cat([torch.randn(32, 577, generator=g, dtype=torch.float64), diff[:8]])
    assert ((xs @ diff.T).abs() <= xs.norm(dim=1, keepdim=True) * screen.err.double()).all()
    xl = xs.float().bfloat16().double()
    gap = (xs @ rows.double().T - xl @ low.T).abs()
    bound = xs.norm(dim=1, keepdim=True) * screen.err.double() + (xs - xl).norm(dim=1, keepdim=True) * screen.norm
    assert (gap <= bound).all()
    assert (screen.err.double() >= diff.norm(dim=1)).all() and (screen.norm.double() >= low.norm(dim=1)).all()
    assert screen.low.dtype == torch.bfloat16 and screen.low.shape == rows.shape
    # the bound takes PyTorch's bfloat16 GEMM to accumulate in float32 (bfloat16 sums stop at 256)
    ones = torch.ones(4096, dtype=torch.bfloat16)
    assert torch.mm(ones[None], ones[:, None]).item() == 4096.0
    if native.available():
        x = torch.randn(5, 577, generator=g) * torch.logspace(-30, 30, 5)[:, None]
        out, dx = torch.empty(5, 577, dtype=torch.bfloat16), torch.empty(5)
        native._state["to_bf16"](x.data_ptr(), 5, 577, 577, out.data_ptr(), dx.data_ptr())
        assert torch.equal(out, x.bfloat16())
        torch.testing.assert_close(dx, (x.double() - out.double()).norm(dim=1).float(), rtol=1e-5, atol=0)


def test_the_int8_screen_bounds_its_logit_error():
    """qerr_n bounds |x · w_n - x · l_n| for the float32 rows l_n of the scaled int8 values plus
    the float32 accumulation of the int8 pass, for any x (random, and along the error, where
    Cauchy-Schwarz is tight), in float64; q uses the int8 range, a ragged last group is scaled
    by its own elements, a zero row (an absent adapter) costs nothing, and the C side groups the
    elements as the screen does."""
    from quiver.routing.base import I8_GROUP, GateScreen

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 577, generator=g) * torch.logspace(-3, 1, 64)[:, None]
    rows[5] = 0.0
    rows[7, -1] = 100.0  # the last group, of one element
    screen = GateScreen.of(rows, bf16=False)
    G = -(-577 // I8_GROUP)
    assert screen.low is None and screen.q.dtype == torch.int8 and screen.q.shape == rows.shape
    assert screen.qscale.shape == (64, G) and int(screen.q.abs().max()) == 127 and screen.qerr[5] == 0
    assert screen.q[7, -1] == 127 and screen.qscale[7, -1] == torch.tensor(100.0) / 127
    assert screen.qscale[7, :-1].max() < 1  # that outlier scales its own group only
    low = (screen.q.float() * screen.qscale.repeat_interleave(I8_GROUP, dim=1)[:, :577]).double()
    diff = rows.double() - low
    acc = 577 * 2.0**-24 / (1 - 577 * 2.0**-24) * low.norm(dim=1)
    assert (screen.qerr.double() >= diff.norm(dim=1) + acc).all()
    xs = torch.cat([torch.randn(32, 577, generator=g, dtype=torch.float64), diff[:8]])
    assert ((xs @ diff.T).abs() <= xs.norm(dim=1, keepdim=True) * screen.qerr.double()).all()
    # tight enough to rule columns out: within 2x of the actual error
    assert (screen.qerr.double() <= 2 * diff.norm(dim=1))[:5].all()
    if native.available():
        assert native._state["i8_group"] == I8_GROUP


def _stats_delta(before):
    after = native.screen_stats()
    return {key: after[key] - before[key] for key in after}


@needs_native
@pytest.mark.parametrize("M,E,d_in,k", [(1, 32, 9, 2), (3, 64, 576, 2), (2, 40, 577, 4), (1, 33, 1536, 1),
                                        (1, 32, 48, 9), (1, 32, 48, 64)],
                         ids=["tail-only", "qkv", "ragged-d", "down-k1", "k9", "k-above-E"])
@pytest.mark.parametrize("absolute", [True, False], ids=["abs", "signed"])
@pytest.mark.parametrize("absent", [(), ((0, 1), (0, 5))], ids=["all-present", "some-absent"])
def test_screened_decisions_equal_the_float32_gemm(screen_path, M, E, d_in, k, absolute, absent):
    """The screened decision (indices exactly, weights to float32 rounding) is the one from the
    float32 logits ``x @ weight``, computing few of the columns in float32."""
    gate = _screened_gate(M, E, d_in, k, absolute=absolute, absent=absent, seed=E, temperature=0.7)
    for T in screen_path:
        x = 3 * torch.randn(T, d_in, generator=torch.Generator().manual_seed(T))
        want_idx, want_w = _native_gate(x, gate)
        before = native.screen_stats()
        idx, w = native.linear_gate_native(x, gate.weight, gate.present, M, absolute, k, gate.temperature,
                                           gate.screen)
        got = _stats_delta(before)
        assert got["calls"] == 1 and got["columns"] == T * M * E
        assert got["exact"] >= T * min(k, E) * M - (0 if gate.present is None else T * int((~gate.present).sum()))
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)
        if k <= 4:
            assert got["exact"] < got["columns"] / 2, "the screen ruled out few columns"


@needs_native
def test_the_screen_falls_back_to_float32_where_low_precision_flips_the_order(screen_path, request):
    """Columns whose low-precision logits (the pass under test's) order differently from their
    float32 logits (two near-equal prototypes): the screened decision is the float32 one, found
    by recomputing them, never the low-precision one."""
    from quiver.routing.base import I8_GROUP

    d, g = 576, torch.Generator().manual_seed(0)
    flips = 0
    for trial in range(300):
        T = screen_path[-1]
        x = torch.randn(T, d, generator=g)
        base = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
        rows = torch.nn.functional.normalize(torch.randn(32, d, generator=g), dim=1) * 1e-3  # far below
        rows[0] = base
        rows[1] = torch.nn.functional.normalize(base + 3e-3 * torch.randn(d, generator=g), dim=0)
        gate = _screened_gate(1, 32, d, 1, rows=rows.clone())
        f32 = (x @ rows.T).abs()
        if request.node.callspec.params["screen_path"] == "bf16":
            low = (x.bfloat16().float() @ gate.screen.low.float().T).abs()
        else:
            scale = gate.screen.qscale.repeat_interleave(I8_GROUP, dim=1)[:, :d]
            low = (x @ (gate.screen.q.float() * scale).T).abs()
        flipped = ((f32[:, 0] > f32[:, 1]) != (low[:, 0] > low[:, 1])) & ((f32[:, 0] - f32[:, 1]).abs() > 1e-5)
        if not flipped.any():
            continue
        flips += int(flipped.sum())
        idx, _ = native.linear_gate_native(x, gate.weight, None, 1, True, 1, 1.0, gate.screen)
        assert torch.equal(idx[0, :, 0], f32.argmax(1)), f"trial {trial}: the low-precision order won"
        if flips >= 5:
            break
    assert flips >= 5, "the construction found too few order flips to test the fallback"


@needs_native
def test_a_token_that_is_not_finite_takes_every_column_in_float32(screen_path):
    gate = _screened_gate(2, 32, 64, 2)
    T = screen_path[-1]
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(1))
    x[1, 3] = float("inf")
    before = native.screen_stats()
    idx, _ = native.linear_gate_native(x, gate.weight, None, 2, True, 2, 1.0, gate.screen)
    assert _stats_delta(before)["exact"] >= 64  # token 1: both modules' 32 columns
    want_idx, _ = _native_gate(torch.cat([x[:1], x[2:]]), gate)
    assert torch.equal(torch.cat([idx[:, :1], idx[:, 2:]], dim=1), want_idx)  # the other tokens as ever


@needs_native
def test_a_prepared_call_with_a_screen_mixes_as_the_call_without_it(monkeypatch):
    """GateMixtureCall with the gate's screen adds what the call without it adds, with a slot
    map and an absent adapter; the screen is used up to SCREEN_I8_MAX_TOKENS tokens (the int8
    pass) and from SCREEN_MIN_WORK tokens × adapters on CPUs with bfloat16 matrix units, the
    float32 GEMM otherwise."""
    d_in, d_outs, E = 24, (24, 8, 8), 32
    banks = _sibling_banks(d_in, d_outs, [2 + e % 3 for e in range(E + 2)], seed=3)
    slots = torch.randperm(E + 2, generator=torch.Generator().manual_seed(0))[:E]
    gate = _screened_gate(3, E, d_in, 2, absent=((1, 4),))
    i8 = native._state["width"] > 0
    for amx in (False, True):
        monkeypatch.setitem(native._state, "amx", amx)
        for T in (1, native.SCREEN_I8_MAX_TOKENS, native.SCREEN_I8_MAX_TOKENS + 1, native.SCREEN_MIN_WORK // E - 1,
                  native.SCREEN_MIN_WORK // E + 3):
            x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(T))
            outs = [torch.zeros(T, d) for d in d_outs]
            want = [torch.zeros(T, d) for d in d_outs]
            before = native.screen_stats()
            native.GateMixtureCall(d_in, gate.weight, gate.present, True, 2, 0.8, slots, banks, gate.screen)(x, outs)
            bf16 = T * E >= native.SCREEN_MIN_WORK and amx
            by_i8 = not bf16 and i8 and T <= native.SCREEN_I8_MAX_TOKENS
            delta = _stats_delta(before)
            assert (delta["calls"], delta["i8"]) == (int(bf16 or by_i8), int(by_i8))
            native.GateMixtureCall(d_in, gate.weight, gate.present, True, 2, 0.8, slots, banks)(x, want)
            for o, wnt in zip(outs, want):
                torch.testing.assert_close(o, wnt, atol=1e-6, rtol=1e-5)


@needs_native
def test_a_screen_of_another_gate_is_refused(screen_path):
    """A screen whose rows do not match the gate's weight raises, from the gate call at a size
    the screen serves and from a prepared call as it is made (it checks once, not per step)."""
    gate = _screened_gate(1, 32, 24, 2)
    other = _screened_gate(1, 32, 16, 2).screen
    with pytest.raises(ValueError, match="gate screen"):
        native.linear_gate_native(torch.randn(1, 24), gate.weight, None, 1, True, 2, 1.0, other)
    banks = _sibling_banks(24, (8,), [2] * 32, seed=1)
    with pytest.raises(ValueError, match="gate screen"):
        native.GateMixtureCall(24, gate.weight, None, True, 2, 1.0, None, banks, other)
