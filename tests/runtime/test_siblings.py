"""Sibling modules (one input, several projections) routed in one call, and the delta added into
the base output in place: the results equal the unfused engine's, and a kept decision is never
used for another input."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver import RoutedModel
from quiver.routing import Arrow

from .test_step_plan import PROMPTS, TASK_ADAPTERS, all_routers, left_padded, lib9  # noqa: F401

QKV = tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")


class Counting(Arrow):
    """Arrow that counts the module decisions it computes."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.computed = 0

    def route_siblings(self, x, sites):
        self.computed += len(sites)
        return super().route_siblings(x, sites)


@torch.no_grad()
def test_siblings_are_learned_from_the_first_step(tiny_model, lib9):
    rm = RoutedModel(copy.deepcopy(tiny_model), lib9, router=Arrow(top_k=2, adapters=TASK_ADAPTERS))
    assert rm._engine.siblings == {}
    rm(torch.tensor([[5, 9, 13]]))
    sib = rm._engine.siblings
    for layer in (0, 1):
        qkv = tuple(f"model.layers.{layer}.self_attn.{p}_proj" for p in "qkv")
        gu = tuple(f"model.layers.{layer}.mlp.{p}_proj" for p in ("gate", "up"))
        assert all(sib[p] == qkv for p in qkv) and all(sib[p] == gu for p in gu)
        assert f"model.layers.{layer}.self_attn.o_proj" not in sib
        assert f"model.layers.{layer}.mlp.down_proj" not in sib


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fused_steps_equal_unfused_steps_for_every_router_kind(tiny_model, lib9, backend):
    """The first step (nothing learned: every module routes alone, the delta returned and added)
    against later steps (siblings fused, the delta accumulated into the base output), for a batch
    mixing every router kind, prefill and decode sizes, and against the reference backend."""
    routers = all_routers(lib9)
    ids, mask, _ = left_padded(PROMPTS)
    ref = RoutedModel(copy.deepcopy(tiny_model), lib9, backend="reference")
    rm = RoutedModel(copy.deepcopy(tiny_model), lib9, backend=backend)
    for r in routers:
        rm.bind(r), ref.bind(r)
    for rows in (slice(None), slice(0, 1)):  # T·k above and below the gather threshold
        kw = dict(input_ids=ids[rows], attention_mask=mask[rows], routers=routers[rows])
        ref._engine.siblings.clear()
        want = ref(**kw).logits
        ref._engine.siblings.clear()
        rm._engine.siblings.clear()
        first = rm(**kw).logits
        assert rm._engine.siblings  # learned
        second = rm(**kw).logits
        torch.testing.assert_close(first, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(second, want, atol=1e-5, rtol=0)


def _plan_deltas(rm, inputs, paths):
    eng = rm._engine
    plan = eng.begin((1, inputs[0].shape[1]), "cpu")
    try:
        return [plan.delta(x, p).clone() for x, p in zip(inputs, paths)]
    finally:
        eng.end()


@torch.no_grad()
def test_a_kept_decision_is_used_only_for_the_same_unmodified_input(tiny_model, lib9):
    router = Counting(top_k=2, adapters=TASK_ADAPTERS)
    rm = RoutedModel(copy.deepcopy(tiny_model), lib9, router=router)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 32, generator=g)
    other = torch.randn(1, 6, 32, generator=g)
    unfused = [_plan_deltas(rm, [x], [p])[0] for p in QKV]  # each module alone
    unfused_other = [_plan_deltas(rm, [other], [p])[0] for p in QKV]
    rm._engine.siblings = dict.fromkeys(QKV, QKV)

    router.computed = 0  # the same object for all three: one call computes q, k and v
    got = _plan_deltas(rm, [x, x, x], QKV)
    assert router.computed == 3
    for a, b in zip(got, unfused):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    router.computed = 0  # k receives another tensor with the same values: routed afresh
    got = _plan_deltas(rm, [x, x.clone(), x], QKV)
    assert router.computed == 3 + 2 + 1
    for a, b in zip(got, unfused):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    router.computed = 0  # x modified in place after q: k and v must see the new values
    eng = rm._engine
    plan = eng.begin((1, 6), "cpu")
    try:
        y = x.clone()
        dq = plan.delta(y, QKV[0]).clone()
        y.copy_(other)
        dk, dv = plan.delta(y, QKV[1]).clone(), plan.delta(y, QKV[2]).clone()
    finally:
        eng.end()
    assert router.computed == 3 + 2
    torch.testing.assert_close(dq, unfused[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(dk, unfused_other[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(dv, unfused_other[2], atol=1e-6, rtol=0)


def test_training_through_fused_siblings_gives_the_unfused_gradients(tiny_model, lib9):
    """With gradients on (the delta is returned and added, not accumulated), the fused routing
    gives the same loss and input gradients as the first, unfused step."""
    rm = RoutedModel(copy.deepcopy(tiny_model), lib9, router=Arrow(top_k=2, adapters=TASK_ADAPTERS))
    emb = rm.model.get_input_embeddings()(torch.tensor([[5, 9, 13, 17]])).detach()
    out = []
    for _ in range(2):
        e = emb.clone().requires_grad_()
        loss = rm(inputs_embeds=e).logits.square().mean()
        (grad,) = torch.autograd.grad(loss, e)
        out.append((loss.detach(), grad))
    assert rm._engine.siblings
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-6, rtol=1e-5)
