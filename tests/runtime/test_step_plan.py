"""The step plan: a batch mixing every kind of router equals each request run alone, with and
without a bank capacity, for prefill and for generation with a KV cache; pinning; packed
sequences; two routed models in one process."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver import Library, RoutedModel
from quiver.library.synthetic import random_adapter
from quiver.routing import MHR, Arrow, Fixed, MoEGate, Single, Uniform
from quiver.runtime import CapacityError

TASK_ADAPTERS = [f"a{i}" for i in range(6)]
SKILLS = ["s0", "s1", "s2"]


@pytest.fixture(scope="module")
def lib9(tmp_path_factory, tiny_spec):
    """Six adapters of ranks 2-4 (a5 without k/o/gate/up) and three rank-4 MHR skills."""
    with Library.open(tmp_path_factory.mktemp("lib9") / "lib", base_model=tiny_spec) as lib:
        for i in range(6):
            targets = ("q_proj", "v_proj", "down_proj") if i == 5 else ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj")
            lib.add(random_adapter(tiny_spec, f"a{i}", rank=2 + i % 3, seed=i, std=0.15, targets=targets))
        for i, name in enumerate(SKILLS):
            lib.add(random_adapter(tiny_spec, name, rank=4, alpha=8.0 - 2 * i, seed=10 + i, std=0.2))
        yield lib


def all_routers(lib) -> list:
    moe = MoEGate(top_k=2, adapters=TASK_ADAPTERS, seed=3).eval()
    mhr = MHR(["sql", "fr"], n_splits=2, adapters=SKILLS)
    with torch.no_grad():
        mhr.logits.normal_(0, 2, generator=torch.Generator().manual_seed(0))
    mhr.prepare(tasks=["fr"])  # one task: applies to every request this router serves
    return [Arrow(top_k=2, adapters=TASK_ADAPTERS), Single("a1"), Fixed({"a0": 0.6, "a4": 0.4}),
            Uniform(["a2", "a3"]), moe, mhr, Arrow(top_k=2, adapters=TASK_ADAPTERS, mode="merge-before")]


PROMPTS = [[5, 9, 13, 17, 21], [8, 16, 24], [40, 41, 42, 43], [3, 99, 7], [60, 61, 62, 63, 64], [11, 12],
           [100, 2, 30, 4]]


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, width


@torch.no_grad()
@pytest.mark.parametrize("capacity", [None, 16], ids=["unbounded", "capacity16"])
def test_every_router_kind_in_one_batch_equals_each_row_alone(tiny_model, lib9, capacity):
    routers = all_routers(lib9)
    rm = RoutedModel(copy.deepcopy(tiny_model), lib9, capacity=capacity)
    for r in routers:
        rm.bind(r)
    ids, mask, width = left_padded(PROMPTS)
    # prefill: the last position of every row (left padding leaves it a real token)
    batch = rm(input_ids=ids, attention_mask=mask, routers=routers).logits[:, -1]
    gen = rm.generate(input_ids=ids, attention_mask=mask, routers=routers, max_new_tokens=5, do_sample=False,
                      pad_token_id=0, use_cache=True)
    alone_rm = RoutedModel(copy.deepcopy(tiny_model), lib9, capacity=capacity)
    for i, (p, r) in enumerate(zip(PROMPTS, routers)):
        alone = alone_rm(input_ids=torch.tensor([p]), routers=[r]).logits[0, -1]
        torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=0, msg=f"request {i} ({type(r).__name__})")
        single = alone_rm.generate(input_ids=torch.tensor([p]), routers=[r], max_new_tokens=5, do_sample=False,
                                   pad_token_id=0, use_cache=True)
        assert gen[i, width:].tolist() == single[0, len(p):].tolist(), f"request {i} ({type(r).__name__})"
    if capacity is not None:
        assert len([k for k in rm.bank.keys if k]) <= capacity


@torch.no_grad()
def test_mixed_routers_never_evict_each_other_within_a_step(tiny_model, lib9):
    """The defect: with capacity 3, preparing the second router's adapters evicted the first
    router's after its decision was taken (row 0 off by 0.78). Now: a clear error at capacity 3,
    and exact rows at capacity 4."""
    r0, r1 = Fixed({"a0": 0.6, "a1": 0.4}), Fixed({"a4": 0.5, "a5": 0.5})
    ids = torch.tensor([[3, 17, 42, 99], [7, 7, 1, 2]])
    tight = RoutedModel(copy.deepcopy(tiny_model), lib9, capacity=3)
    with pytest.raises(CapacityError, match="needs 4 adapters resident at once, more than the bank capacity 3"):
        tight(ids, routers=[r0, r1])
    assert not tight.bank.pinned
    ok = RoutedModel(copy.deepcopy(tiny_model), lib9, capacity=4)
    both = ok(ids, routers=[r0, r1]).logits
    torch.testing.assert_close(both[0], ok(ids[:1], routers=[r0]).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], ok(ids[1:], routers=[r1]).logits[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_packed_sequences_route_by_request_ids(tiny_model, lib9):
    """Tokens of several requests in one row with a token → request map (what a continuous-
    batching server feeds): each request's tokens get its router's mixture. Checked at the
    module level: the first adapted layer's delta for the packed row equals each request's
    delta computed alone."""
    routers = [Single("a1"), Fixed({"a0": 0.5, "a2": 0.5}), Arrow(top_k=2, adapters=TASK_ADAPTERS)]
    rm = RoutedModel(copy.deepcopy(tiny_model), lib9)
    for r in routers:
        rm.bind(r)
    lengths = [3, 4, 2]
    request_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))  # [9]
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(0))
    eng = rm._engine
    eng.requests, eng.request_ids = routers, request_ids
    plan = eng.begin((1, 9), x.device)
    path = next(p for p in rm.paths if p.endswith("self_attn.q_proj"))
    try:
        packed = plan.delta(x[None], path)
    finally:
        eng.end()
        eng.requests = eng.request_ids = None
    lo = 0
    for r, n in zip(routers, lengths):
        eng.requests = [r]
        plan = eng.begin((1, n), x.device)
        try:
            alone = plan.delta(x[None, lo:lo + n], path)
        finally:
            eng.end()
            eng.requests = None
        torch.testing.assert_close(packed[lo:lo + n], alone, atol=1e-6, rtol=0)
        lo += n
    with pytest.raises(ValueError, match=r"request_ids covers 8 tokens, the input holds 9"):
        rm(torch.zeros(1, 9, dtype=torch.long), routers=routers, request_ids=request_ids[:8])


@torch.no_grad()
def test_two_routed_models_over_different_libraries_in_one_process(tiny_model, tiny_spec, lib9, tmp_path):
    with Library.open(tmp_path / "other", base_model=tiny_spec) as other:
        other.add(random_adapter(tiny_spec, "z", rank=3, seed=42, std=0.2))
        m1 = RoutedModel(copy.deepcopy(tiny_model), lib9, router=Single("a1"))
        m2 = RoutedModel(copy.deepcopy(tiny_model), other, router=Single("z"))
        ids = torch.tensor([[3, 17, 42, 99]])
        alone1, alone2 = m1(ids).logits, m2(ids).logits
        # interleave their forwards: no state leaks from one engine into the other
        for _ in range(2):
            torch.testing.assert_close(m2(ids).logits, alone2)
            torch.testing.assert_close(m1(ids).logits, alone1)
        assert (alone1 - alone2).abs().max() > 1e-3
        with pytest.raises(ValueError, match="already wrapped by a routed model"):
            RoutedModel(m1.model, lib9)


@torch.no_grad()
def test_over_capacity_router_in_a_mixed_batch_with_merge_before(tiny_model, lib9):
    """With a Single request and a merge-before MHR request pinned first (4 adapters), Arrow over
    the 6 task adapters cannot also be resident in a bank smaller than 10: it loads what its
    tokens select, pinned next to them; every row equals the same row alone on an unbounded
    model, and one slot fewer than the step needs is a clear error."""
    mhr = MHR(["sql"], n_splits=1, adapters=SKILLS)
    with torch.no_grad():
        mhr.logits.normal_(0, 2, generator=torch.Generator().manual_seed(1))
    routers = [Single("a1"), mhr, Arrow(top_k=1, adapters=TASK_ADAPTERS)]
    prompts = [[8], [40], [5]]
    full = RoutedModel(copy.deepcopy(tiny_model), lib9)
    with full.tracing() as tr:
        full(input_ids=torch.tensor([prompts[2]]), routers=[routers[2]])
    chosen = {a for tokens in tr.per_token().values() for slots in tokens for a, _ in slots}
    need = len(chosen | {"a1"} | set(SKILLS))
    assert need < 10, chosen
    rm = RoutedModel(copy.deepcopy(tiny_model), lib9, capacity=need)
    batch = rm(input_ids=torch.tensor(prompts), routers=routers).logits
    for i, (p, r) in enumerate(zip(prompts, routers)):
        torch.testing.assert_close(batch[i], full(input_ids=torch.tensor([p]), routers=[r]).logits[0],
                                   atol=1e-5, rtol=0, msg=f"request {i}")
    with pytest.raises(CapacityError, match=rf"more than the bank capacity {need - 1}"):
        RoutedModel(copy.deepcopy(tiny_model), lib9, capacity=need - 1)(input_ids=torch.tensor(prompts),
                                                                        routers=routers)


@torch.no_grad()
def test_routers_nobody_holds_are_released_and_a_new_one_routes_as_alone(tiny_model, lib9):
    """A long-lived model (the server) binds many short-lived routers: each is freed with its
    binding when dropped, and a router created later (perhaps at a freed one's address) routes
    exactly as in a fresh model."""
    import gc

    rm = RoutedModel(copy.deepcopy(tiny_model), lib9, router=Single("a0"))
    ids = torch.tensor([PROMPTS[0]])
    bound = rm._engine.source._bound
    baseline = len(bound)
    for i in range(20):
        rm(input_ids=ids, routers=[Arrow(top_k=1 + i % 3, adapters=TASK_ADAPTERS)])
    gc.collect()
    assert len(bound) == baseline, f"{len(bound) - baseline} dropped routers still bound"
    late = Fixed({"a2": 0.7, "a5": 0.3})
    got = rm(input_ids=ids, routers=[late]).logits
    alone = RoutedModel(copy.deepcopy(tiny_model), lib9, router=Fixed({"a2": 0.7, "a5": 0.3}))
    torch.testing.assert_close(got, alone(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert len(bound) == baseline + 1
