"""MHR / Poly routers: head splitting in the runtime equals the explicit per-head computation."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver import Library, RoutedModel
from quiver.library.synthetic import random_adapter
from quiver.routing import MHR, ROUTERS, Poly, RoutingSite, Single, load_router, save_router
from quiver.runtime import head_view
from quiver.runtime.sources import view_sources

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127], [7, 7, 1, 2, 90, 33, 45]])
SKILLS = ["s0", "s1", "s2"]
TASKS = ["sql", "fr"]


@pytest.fixture
def lib3(tmp_path, tiny_spec):
    with Library.open(tmp_path / "lib", base_model=tiny_spec) as lib:
        for i, name in enumerate(SKILLS):  # one rank, different alphas (scalings 2, 1.5, 1)
            lib.add(random_adapter(tiny_spec, name, rank=4, alpha=8.0 - 2 * i, seed=i, std=0.2))
        yield lib


def explicit_weights(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """σ(logits) normalised over skills per head; -1 = uniform.  [N, H, S]"""
    S = logits.shape[-1]
    p = torch.sigmoid(logits)
    return torch.stack([torch.full(logits.shape[1:], 1 / S) if i < 0 else p[i] / p[i].sum(-1, keepdim=True)
                        for i in ids])


def make_router(cls, n_splits: int, seed: int = 0):
    router = cls(TASKS, adapters=SKILLS) if cls is Poly else cls(TASKS, n_splits=n_splits, adapters=SKILLS)
    with torch.no_grad():
        router.logits.copy_(torch.randn(router.logits.shape, generator=torch.Generator().manual_seed(seed)) * 2)
    return router


def reference_logits(model, lib, router, tasks: list[str | None]) -> torch.Tensor:
    """MHR's formula, independent of the runtime: each request's weights are constant over its
    tokens, so its output is the base model with W += B_mix A_mix at every module, where head h
    mixes block h of d_in (A) and of d_out (B) of every skill with w[h, :]."""
    w = explicit_weights(router.logits.detach(), [TASKS.index(t) if t in TASKS else -1 for t in tasks])  # [N, H, S]
    skills = [lib.get(n) for n in SKILLS]
    H = router.n_splits
    rows = []
    for i in range(len(tasks)):
        m = copy.deepcopy(model)
        for path in skills[0].modules:
            A0, B0 = skills[0].modules[path].A, skills[0].modules[path].B
            a, b = A0.shape[1] // H, B0.shape[0] // H
            A_mix, B_mix = torch.zeros_like(A0), torch.zeros_like(B0)
            for h in range(H):
                for s, ad in enumerate(skills):
                    A_mix[:, h * a:(h + 1) * a] += w[i, h, s] * ad.modules[path].A[:, h * a:(h + 1) * a]
                    B_mix[h * b:(h + 1) * b] += w[i, h, s] * ad.scaling(path) * ad.modules[path].B[h * b:(h + 1) * b]
            m.get_submodule(path).weight.data += B_mix @ A_mix
        with torch.no_grad():
            rows.append(m(IDS[i:i + 1]).logits[0])
    return torch.stack(rows)


@torch.no_grad()
@pytest.mark.parametrize("n_splits", [1, 2, 4])
def test_runtime_equals_explicit_per_head_mixing(tiny_model, lib3, n_splits):
    router = make_router(MHR, n_splits)
    rm = RoutedModel(copy.deepcopy(tiny_model), lib3, router=router)
    assert [s.key for s in router.sources] == SKILLS  # the runtime builds the head views
    for tasks in (["fr", "sql"], ["sql", "unknown-task"]):
        router.prepare(tasks=tasks)
        want = reference_logits(tiny_model, lib3, router, tasks)
        torch.testing.assert_close(rm(IDS).logits, want, atol=2e-5, rtol=0)
    assert len([k for k in rm.bank.keys if k]) == n_splits * len(SKILLS)
    # The heads matter: the same logits with one head give another model.
    if n_splits > 1:
        one = MHR(TASKS, n_splits=1, adapters=SKILLS)
        one.logits.copy_(router.logits[:, :1])
        one.prepare(tasks=["fr", "sql"])
        single = RoutedModel(copy.deepcopy(tiny_model), lib3, router=one)(IDS).logits
        router.prepare(tasks=["fr", "sql"])
        assert (single - rm(IDS).logits).abs().max() > 1e-3


@torch.no_grad()
def test_head_views_reproduce_block_mixing(lib3):
    """Σ_{h,s} w[h,s]·view(h,s) = the block-mixed factors MHR defines, for A and for B."""
    H = 4
    router = make_router(MHR, H)
    router.bind(lib3, SKILLS)
    path = "model.layers.1.mlp.down_proj"  # 64 -> 32
    views = [head_view(lib3.get(n), h, H).modules[path] for h in range(H) for n in SKILLS]
    w = explicit_weights(router.logits, [0])[0]  # [H, S]
    A_mix = sum(w[h, s] * views[h * 3 + s].A for h in range(H) for s in range(3))
    B_mix = sum(w[h, s] * views[h * 3 + s].B for h in range(H) for s in range(3))
    skills = [lib3.get(n).modules[path] for n in SKILLS]
    for h in range(H):
        cols, rows = slice(16 * h, 16 * (h + 1)), slice(8 * h, 8 * (h + 1))
        torch.testing.assert_close(A_mix[:, cols], sum(w[h, s] * skills[s].A[:, cols] for s in range(3)))
        torch.testing.assert_close(B_mix[rows], sum(w[h, s] * skills[s].B[rows] for s in range(3)))
    assert [s.key for s in view_sources(router)][5] == "s2#head1of4"


@torch.no_grad()
def test_poly_is_mhr_with_one_split(tiny_model, lib3):
    poly, mhr = make_router(Poly, 1), make_router(MHR, 1)
    assert torch.equal(poly.logits, mhr.logits) and poly.n_splits == 1
    assert poly.sources == [] and poly.config() == {"tasks": TASKS, "temperature": 1.0}
    outs = []
    for router in (poly, mhr):
        router.prepare(tasks=["sql", "fr"])
        outs.append(RoutedModel(copy.deepcopy(tiny_model), lib3, router=router)(IDS).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert [s.key for s in poly.sources] == SKILLS  # H = 1: the skills themselves
    assert ROUTERS["poly"] is Poly and ROUTERS["mhr"] is MHR


@torch.no_grad()
@pytest.mark.parametrize("n_splits", [1, 4])
def test_decision_rows_constant_per_request_and_sum_to_heads(tiny_model, lib3, n_splits):
    router = make_router(MHR, n_splits)
    RoutedModel(copy.deepcopy(tiny_model), lib3, router=router)
    router.prepare(tasks=["fr", "nope", None])
    x = torch.randn(15, 32)
    d = router.route(x, RoutingSite("model.layers.0.self_attn.q_proj", torch.arange(3).repeat_interleave(5)))
    H, S = n_splits, len(SKILLS)
    assert d.indices.shape == d.weights.shape == (15, H * S)
    assert torch.equal(d.indices[0], torch.arange(H * S))
    torch.testing.assert_close(d.weights.sum(-1), torch.full((15,), float(H)))
    for r in range(3):
        assert torch.equal(d.weights[5 * r: 5 * r + 5], d.weights[5 * r].expand(5, -1))
    torch.testing.assert_close(d.weights[0].view(H, S), explicit_weights(router.logits, [1])[0])
    assert torch.equal(d.weights[5:], torch.full((10, H * S), 1 / S))  # unknown task, no task: uniform
    # only some rows (another router serves the others): their own tasks
    d1 = router.route(x[:5], RoutingSite("model.layers.0.self_attn.q_proj", torch.tensor([0]).repeat_interleave(5)))
    assert torch.equal(d1.weights, d.weights[:5])
    with pytest.raises(ValueError, match="request 3 has no task"):
        router.route(x[:5], RoutingSite("model.layers.0.self_attn.q_proj", torch.tensor([3]).repeat_interleave(5)))


@torch.no_grad()
def test_routing_in_generate_is_per_request(tiny_model, lib3):
    router = make_router(MHR, 2)
    rm = RoutedModel(copy.deepcopy(tiny_model), lib3, router=router)
    router.prepare(tasks=["sql", "fr"])
    with rm.tracing() as tr:
        rm.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for row in (0, 1):
        want = explicit_weights(router.logits, [row]).flatten()
        for toks in tr.per_token(row).values():
            assert len(toks) == 7 + 2
            for pairs in toks:
                torch.testing.assert_close(torch.tensor([w for _, w in pairs]), want, atol=1e-6, rtol=0)
    # a mixed batch: row 0 by MHR (task of row 0), row 1 by a single adapter
    out = rm(IDS, routers=[router, Single("s1")]).logits
    alone = RoutedModel(copy.deepcopy(tiny_model), lib3, router=Single("s1"))(IDS[1:]).logits
    router.prepare(tasks=["sql"])
    torch.testing.assert_close(out[:1], rm(IDS[:1]).logits, atol=2e-5, rtol=0)
    torch.testing.assert_close(out[1:], alone, atol=2e-5, rtol=0)


def test_relaxed_bernoulli_only_in_training_mode():
    router = MHR(TASKS, n_splits=2, temperature=0.5, adapters=SKILLS)
    assert not router.training  # a new router is deterministic
    ids = router.task_ids(["fr", "sql", "zz"])
    assert ids.tolist() == [1, 0, -1]
    e1, e2 = router.weights(ids), router.weights(ids)
    assert torch.equal(e1, e2) and torch.equal(e1, torch.full((3, 2, 3), 1 / 3))  # logits start at 0
    router.train()
    torch.manual_seed(0)
    s1 = router.weights(ids)
    s2 = router.weights(ids)
    torch.manual_seed(0)
    assert torch.equal(router.weights(ids), s1) and not torch.equal(s1, s2)
    assert not torch.allclose(s1[:2], e1[:2], atol=1e-2)
    torch.testing.assert_close(s1.sum(-1), torch.ones(3, 2))
    assert torch.equal(s1[2], torch.full((2, 3), 1 / 3))  # unknown task: uniform, not sampled
    s1[:2].pow(2).sum().backward()  # rsample: reparameterised, gradients reach the logits
    assert router.logits.grad is not None and router.logits.grad.abs().sum() > 0


@torch.no_grad()
@pytest.mark.parametrize("cls, n_splits", [(MHR, 2), (Poly, 1)])
def test_save_and_load_round_trip(tiny_model, lib3, cls, n_splits):
    router = make_router(cls, n_splits, seed=3)
    router.prepare(tasks=["fr", "sql"])
    want = RoutedModel(copy.deepcopy(tiny_model), lib3, router=router)(IDS).logits
    save_router(lib3, "mix", router)
    loaded = load_router(lib3, "mix")
    assert type(loaded) is cls and loaded.config() == router.config() and not loaded.training
    assert loaded.adapters == SKILLS and torch.equal(loaded.logits, router.logits)
    loaded.prepare(tasks=["fr", "sql"])
    got = RoutedModel(copy.deepcopy(tiny_model), lib3, router=loaded)(IDS).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_validation(tiny_spec, tmp_path, lib3):
    with pytest.raises(ValueError, match="tasks must be distinct"):
        MHR(["a", "a"])
    with pytest.raises(ValueError, match="n_splits=3 does not divide"):
        MHR(TASKS, n_splits=3).bind(lib3, SKILLS)
    lib3.add(random_adapter(tiny_spec, "r2", rank=2, seed=9))
    with pytest.raises(ValueError, match="one rank per module; at model.layers.0.mlp.down_proj"):
        MHR(TASKS).bind(lib3, ["s0", "r2"])
    router = MHR(TASKS, n_splits=2)  # skills from the universe at bind time
    router.bind(lib3, SKILLS)
    assert router.logits.shape == (2, 2, 3) and router.adapters == SKILLS
    router.add_tasks(["de", "fr"])
    assert router.tasks == ["sql", "fr", "de"] and router.logits.shape == (3, 2, 3)
    with pytest.raises(RuntimeError, match="bind the router"):
        MHR(TASKS).weights(torch.tensor([0]))
