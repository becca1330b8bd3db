"""Arrow: its decisions (top-k, normalised, only adapters with the module), and Quiver's Arrow
equals PEFT's create_arrow_model on the same adapters (fp32, atol 1e-4).

PEFT finds prototypes by 15 power iterations from a random start, Quiver by an exact SVD from
the factors; they agree when ΔW has a clear spectral gap, so the test adapters are built with
singular values (3, 1, 0.5, 0.25): ratio s2/s1 = 1/3.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model

from quiver import Library, RoutedModel
from quiver.routing import Arrow, RoutingSite

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 8, 20], [7, 7, 1, 2, 90, 33, 45, 61, 12]])


def gapped_peft_adapter(tiny_model, out_dir, seed, scale=1.0, r=4):
    """Save, with peft itself, a LoRA whose every ΔW = U diag(s) V^T with s = (3, 1, .5, .25)."""
    g = torch.Generator().manual_seed(seed)
    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=r, lora_alpha=r, target_modules=PROJ))
    s = scale * torch.tensor([3.0, 1.0, 0.5, 0.25])[:r]
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            V = torch.linalg.qr(torch.randn(A.shape[1], r, generator=g))[0]  # [d_in, r]
            U = torch.linalg.qr(torch.randn(B.shape[0], r, generator=g))[0]  # [d_out, r]
            with torch.no_grad():
                A.copy_((V * s.sqrt()).T)
                B.copy_(U * s.sqrt())
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def arrow_setup(tmp_path, tiny_model, tiny_spec):
    paths = [gapped_peft_adapter(tiny_model, tmp_path / f"task{i}", seed=i) for i in range(4)]
    lib = Library.open(tmp_path / "lib", base_model=tiny_spec)
    for i, p in enumerate(paths):
        lib.add_peft(p, name=f"task{i}")
    yield paths, lib
    lib.close()


@pytest.mark.parametrize("top_k, temperature", [(2, 1.0), (1, 1.0), (3, 0.5)])
def test_arrow_logits_equal_peft(arrow_setup, tiny_model, top_k, temperature):
    paths, lib = arrow_setup
    peft_model = create_arrow_model(copy.deepcopy(tiny_model), [str(p) for p in paths],
                                    ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0))
    rm = RoutedModel(copy.deepcopy(tiny_model), lib, router=Arrow(top_k=top_k, temperature=temperature))
    with torch.no_grad():
        want = peft_model(IDS).logits
        got = rm(IDS).logits
        base = tiny_model(IDS).logits
    assert (want - base).abs().max() > 0.05  # routing changes the output measurably
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_genknowsub_equals_peft(tmp_path, tiny_model, tiny_spec):
    tasks = [gapped_peft_adapter(tiny_model, tmp_path / f"t{i}", seed=i) for i in range(3)]
    general = [gapped_peft_adapter(tiny_model, tmp_path / f"g{i}", seed=10 + i, scale=0.05) for i in range(2)]
    with Library.open(tmp_path / "lib", base_model=tiny_spec) as lib:
        for i, p in enumerate(tasks):
            lib.add_peft(p, name=f"t{i}")
        for i, p in enumerate(general):
            lib.add_peft(p, name=f"g{i}")
        peft_model = create_arrow_model(copy.deepcopy(tiny_model), [str(p) for p in tasks],
                                        ArrowConfig(top_k=2, router_temperature=1.0, use_gks=True, rng_seed=0),
                                        general_adapter_paths=[str(p) for p in general])
        rm = RoutedModel(copy.deepcopy(tiny_model), lib,
                         router=Arrow(top_k=2, adapters=["t0", "t1", "t2"], general=["g0", "g1"]))
        with torch.no_grad():
            torch.testing.assert_close(rm(IDS).logits, peft_model(IDS).logits, atol=1e-4, rtol=0)
            plain = RoutedModel(copy.deepcopy(tiny_model), lib, router=Arrow(top_k=2, adapters=["t0", "t1", "t2"]))
            assert (plain(IDS).logits - rm(IDS).logits).abs().max() > 1e-3  # GKS did change something


@torch.no_grad()
def test_arrow_decisions_are_top_k_and_normalised(tiny_model, lib6):
    router = Arrow(top_k=3, temperature=0.7)
    RoutedModel(copy.deepcopy(tiny_model), lib6, router=router)
    x = torch.randn(11, 32)
    site = RoutingSite("model.layers.1.self_attn.k_proj", torch.zeros(11, dtype=torch.int64))
    d = router.route(x, site)
    assert d.indices.shape == (11, 3)
    assert not (d.indices == 5).any()  # a5 has no k_proj: never selected there
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(11))
    P = router._protos[site.module]
    logits = (x @ P.T).abs() / 0.7
    logits[:, 5] = float("-inf")
    top, idx = logits.topk(3)
    assert torch.equal(d.indices, idx) and torch.allclose(d.weights, torch.softmax(top, -1))


def test_routers_over_the_same_adapters_share_prototypes_and_gate_weights(tiny_spec, lib6):
    """Arrow routers over the same adapters (a server's routers for different top_k and
    temperature) share one copy of the prototype stacks and gate weights; a different adapter
    list, a replaced adapter (same name, new content) or GenKnowSub get their own, and every
    router still routes by its own adapters' prototypes."""
    from quiver.library.synthetic import random_adapter

    a, b = Arrow(top_k=2), Arrow(top_k=1, temperature=0.5)
    a.bind(lib6, lib6.names()), b.bind(lib6, lib6.names())
    q = "model.layers.0.self_attn.q_proj"
    paths = (q, "model.layers.0.self_attn.k_proj")
    cpu = torch.device("cpu")
    assert a._protos[q] is b._protos[q]
    assert a.linear_gate(paths, cpu, torch.float32).weight is b.linear_gate(paths, cpu, torch.float32).weight
    assert a.linear_gate(paths, cpu, torch.float32).top_k == 2 and b.linear_gate(paths, cpu, torch.float32).top_k == 1
    subset = Arrow(adapters=["a0", "a2"])
    subset.bind(lib6, lib6.names())
    assert subset._protos[q].shape[0] == 2
    torch.testing.assert_close(subset._protos[q], a._protos[q][[0, 2]])
    gks = Arrow(adapters=["a4"], general=["a1"])  # GenKnowSub wants equal ranks (3)
    gks.bind(lib6, lib6.names())
    assert not torch.allclose(gks._protos[q][0].abs(), a._protos[q][4].abs())
    before = a._protos[q].clone()
    lib6.remove("a1")
    lib6.add(random_adapter(tiny_spec, "a1", rank=3, seed=101, std=0.15))
    c = Arrow(top_k=2)
    c.bind(lib6, lib6.names())
    assert c._protos[q] is not a._protos[q] and not torch.equal(c._protos[q][1], before[1])
    torch.testing.assert_close(c._protos[q][0], before[0])
    assert torch.equal(a._protos[q], before)  # the routers bound before keep what they routed by


@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_route_siblings_equals_route_per_module(tiny_model, lib6, top_k):
    """One GEMM over q/k/v's stacked prototypes gives each module its own decision, including a
    module where an adapter is absent (a5 has no k_proj) and k beyond the adapters present."""
    router = Arrow(top_k=top_k, temperature=0.7)
    RoutedModel(copy.deepcopy(tiny_model), lib6, router=router)
    x = torch.randn(13, 32)
    rid = torch.zeros(13, dtype=torch.int64)
    sites = [RoutingSite(f"model.layers.0.self_attn.{p}_proj", rid) for p in "qkv"]
    fused = router.route_siblings(x, sites)
    assert len(fused) == 3
    for site, d in zip(sites, fused):
        one = router.route(x, site)
        assert torch.equal(d.indices, one.indices), site.module
        torch.testing.assert_close(d.weights, one.weights, atol=1e-6, rtol=0)
        assert d.indices.is_contiguous() and d.weights.is_contiguous()
    assert not (fused[1].indices == 5).any()  # a5 has no k_proj: never selected there
    assert router.route_siblings(x[:0], sites)[2].indices.shape == (0, min(top_k, 6))


def test_the_linear_gate_is_arrows_decision_and_follows_top_k_changes(tiny_model, lib6):
    """``linear_gate`` (what the runtime's native kernel evaluates) gives route_siblings' decisions,
    and top_k / temperature set after the first call take effect (the stacked prototypes are
    cached, the gate's settings are not)."""
    router = Arrow(top_k=2)
    RoutedModel(copy.deepcopy(tiny_model), lib6, router=router)
    x = torch.randn(7, 32)
    paths = tuple(f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
    sites = [RoutingSite(p, torch.zeros(7, dtype=torch.int64)) for p in paths]
    idx, w = router.linear_gate(paths, x.device, x.dtype).route(x)
    for m, d in enumerate(router.route_siblings(x, sites)):
        assert torch.equal(idx[m], d.indices) and torch.equal(w[m], d.weights)
    router.top_k, router.temperature = 3, 0.5
    gate = router.linear_gate(paths, x.device, x.dtype)
    assert (gate.top_k, gate.temperature) == (3, 0.5)
    assert router.route_siblings(x, sites)[0].indices.shape == (7, 3)
