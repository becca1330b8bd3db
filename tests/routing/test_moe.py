"""MoEGate: top-k decisions, layer sharing, training through RoutedModel, the Switch balance loss,
and round trips through the library."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from quiver import RoutedModel
from quiver.library import ValidationError
from quiver.library.synthetic import random_adapter
from quiver.routing import MoEGate, RoutingSite, load_router, save_router
from quiver.routing.moe import load_balancing_loss

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127], [7, 7, 1, 2, 90, 33, 45]])
Q0 = "model.layers.0.self_attn.q_proj"
K1 = "model.layers.1.self_attn.k_proj"


@pytest.fixture
def lib4(random_lib):
    """Four adapters; a3 has no k_proj/o_proj/gate_proj/up_proj."""
    return random_lib(4)


@pytest.fixture
def one_thread():
    """Hundreds of tiny ops: intra-op threads only add synchronisation (badly so on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def site(module: str, T: int) -> RoutingSite:
    return RoutingSite(module, torch.zeros(T, dtype=torch.int64))


def bound(lib, **kwargs) -> MoEGate:
    gate = MoEGate(**kwargs)
    gate.bind(lib, lib.names())
    return gate


def test_decisions_are_top_k_with_softmax_over_the_selected_logits(lib4):
    gate = bound(lib4, top_k=2, temperature=0.5)
    x = torch.randn(13, 32)
    d = gate.route(x, site(Q0, 13))
    assert d.indices.shape == d.weights.shape == (13, 2)
    assert all(len(set(row.tolist())) == 2 for row in d.indices)
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(13))
    logits = x @ gate.weight(Q0).detach().T / 0.5  # [T, E]
    top, idx = logits.topk(2)
    assert torch.equal(d.indices, idx)
    torch.testing.assert_close(d.weights, torch.softmax(top, -1))


def test_absent_adapters_are_never_selected(lib4):
    gate = bound(lib4, top_k=4)
    d = gate.route(torch.randn(9, 32), site(K1, 9))  # a3 has no k_proj: 3 candidates for 4 slots
    assert not (d.indices == 3).any()
    assert (d.indices[:, 3] == -1).all() and (d.weights[:, 3] == 0).all()
    assert torch.equal(d.indices[:, :3].sort(-1).values, torch.tensor([0, 1, 2]).expand(9, 3))
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(9))


def test_layer_granularity_shares_one_gate_per_layer_and_width(lib4):
    per_module = bound(lib4)
    assert len(per_module.gates) == 14  # 7 projections × 2 layers
    gate = bound(lib4, granularity="layer")
    assert set(gate.gates) == {f"model/layers/{i}/in{w}" for i in (0, 1) for w in (32, 64)}
    shared = gate.weight(Q0)
    for proj in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert gate.weight(f"model.layers.0.{proj}") is shared
    assert gate.weight("model.layers.0.mlp.down_proj").shape == (4, 64)
    assert gate.weight("model.layers.1.self_attn.q_proj") is not shared
    x = torch.randn(6, 32)
    d_q, d_v = gate.route(x, site(Q0, 6)), gate.route(x, site("model.layers.0.self_attn.v_proj", 6))
    assert torch.equal(d_q.indices, d_v.indices) and torch.equal(d_q.weights, d_v.weights)
    d_up = gate.route(x, site("model.layers.0.mlp.up_proj", 6))  # same gate, a3 masked (no up_proj)
    logits = x @ shared.detach().T
    logits[:, 3] = float("-inf")
    assert torch.equal(d_up.indices, logits.topk(2).indices)


def test_arrow_init_rows_are_scaled_prototypes(lib4):
    gate = bound(lib4, init="arrow")
    scale = 0.02 * math.sqrt(32)
    for e, name in enumerate(lib4.names()):
        protos = lib4.arrow_prototypes(name)
        torch.testing.assert_close(gate.weight(Q0)[e].detach(), protos[Q0][0] * scale)
        if K1 in protos:
            torch.testing.assert_close(gate.weight(K1)[e].detach(), protos[K1][0] * scale)
        else:
            assert (gate.weight(K1)[e] == 0).all()
    layer = bound(lib4, init="arrow", granularity="layer")  # principal direction: unit rows, scaled
    torch.testing.assert_close(layer.weight(Q0).detach().norm(dim=-1), torch.full((4,), scale))


@pytest.mark.parametrize("backend", ["gather", "grouped"])
def test_routed_model_trains_only_the_gate_in_one_pass(tiny_model, lib4, backend):
    model = copy.deepcopy(tiny_model).requires_grad_(False)
    gate = MoEGate(top_k=2, balance_coef=0.1)
    rm = RoutedModel(model, lib4, router=gate, backend=backend)
    out = rm(IDS, labels=IDS)
    aux = gate.aux_loss()
    assert aux is not None and aux.requires_grad
    assert gate.aux_loss() is None  # collected once, then reset
    (out.loss + aux).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not any(t.requires_grad for bank in rm.bank.banks.values() for t in (bank.A, bank.B))
    with torch.no_grad():
        rm(IDS)
    assert gate.aux_loss() is None  # nothing collected without grad
    gen = rm.generate(IDS[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 7) and torch.equal(gen[:, :4], IDS[:, :4])


def test_aux_loss_is_the_coefficient_times_the_mean_over_modules(lib4):
    gate = bound(lib4, top_k=1, balance_coef=0.3)
    xs = {p: torch.randn(10, lib4.base.linears[p][1]) for p in (Q0, K1)}
    want = []
    for p, x in xs.items():
        d = gate.route(x, site(p, 10))
        logits = x @ gate.weight(p).T
        if p == K1:  # a3 has no k_proj: 3 candidates
            logits[:, 3] = float("-inf")
        want.append(load_balancing_loss(logits, d.indices, 3 if p == K1 else 4))
    torch.testing.assert_close(gate.aux_loss(), 0.3 * (want[0] + want[1]) / 2)
    gate.route(xs[Q0], site(Q0, 10))
    gate.route(xs[Q0], site(Q0, 10))  # the same module again: a new forward pass
    torch.testing.assert_close(gate.aux_loss(), 0.3 * want[0])


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    logits = probs.log()  # softmax(logits) = probs; P = column means = (0.5125, 0.3125, 0.175)
    top1 = torch.tensor([[0], [1], [0], [0]])  # f = (3/4, 1/4, 0)
    assert load_balancing_loss(logits, top1).item() == pytest.approx(3 * (0.75 * 0.5125 + 0.25 * 0.3125))  # 1.3875
    top2 = torch.tensor([[0, 1], [1, 0], [0, 1], [0, -1]])  # 7 routed slots: f = (4/7, 3/7, 0)
    assert load_balancing_loss(logits, top2).item() == pytest.approx(3 * (4 / 7 * 0.5125 + 3 / 7 * 0.3125))
    # Only P carries a gradient: d/dlogits of N·Σ f_i P_i.
    logits.requires_grad_(True)
    load_balancing_loss(logits, top1).backward()
    P = probs
    f = torch.tensor([0.75, 0.25, 0.0])
    want = 3 / 4 * P * (f - (P * f).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, want)


def test_load_balancing_loss_is_one_for_balanced_routing():
    logits = torch.randn(8, 4)
    balanced = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]).view(8, 1)
    assert load_balancing_loss(logits, balanced).item() == pytest.approx(1.0)
    two = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(logits, two).item() == pytest.approx(1.0)
    peaked = torch.tensor([[5.0, 0, 0, 0]]).expand(8, 4)
    all_to_0 = torch.zeros(8, 1, dtype=torch.int64)
    assert load_balancing_loss(peaked, all_to_0).item() == pytest.approx(4 * math.exp(5) / (math.exp(5) + 3))


def test_training_on_the_balance_loss_spreads_a_skewed_load(lib4, one_thread):
    """Inputs all point one way and the gate prefers a0 for it: every token goes to a0. A few
    hundred small AdamW steps on the balance loss alone spread the tokens over all four."""
    u = torch.nn.functional.normalize(torch.ones(32), dim=0)

    def tokens(n, seed):  # [n, 32]: 10·u plus unit noise
        return 10 * u + torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))

    def load(gate):  # fraction of held-out tokens per adapter
        with torch.no_grad():
            d = gate.route(tokens(1024, 123), site(Q0, 1024))
        return torch.bincount(d.indices.flatten(), minlength=4) / d.indices.numel()

    gate = bound(lib4, top_k=1, balance_coef=1.0)
    with torch.no_grad():
        gate.weight(Q0)[0] += 0.3 * u
    skewed = load(gate)
    opt = torch.optim.AdamW(gate.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(200):
        gate.route(tokens(64, step), site(Q0, 64))
        loss = gate.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    spread = load(gate)
    assert skewed.max() > 0.95
    assert spread.max() < 0.4 and spread.min() > 0.1  # balanced would be 0.25 each


@pytest.mark.parametrize("kwargs", [dict(), dict(granularity="layer", init="arrow", top_k=3, temperature=2.0)],
                         ids=["module", "layer-arrow"])
def test_save_and_load_give_identical_decisions(tiny_model, lib4, tiny_spec, kwargs):
    gate = MoEGate(seed=3, **kwargs)
    rm = RoutedModel(copy.deepcopy(tiny_model), lib4, router=gate)
    with torch.no_grad():  # as if trained: not what a fresh gate with this seed would hold
        for p in gate.parameters():
            p.add_(torch.randn_like(p))
    assert save_router(lib4, "gate", gate) == 1
    loaded = load_router(lib4, "gate")
    assert type(loaded) is MoEGate and loaded.config() == gate.config() and loaded.adapters == gate.adapters
    json.dumps(loaded.config())
    rm2 = RoutedModel(copy.deepcopy(tiny_model), lib4, router=loaded)
    for path in (Q0, K1, "model.layers.1.mlp.down_proj"):
        x = torch.randn(11, lib4.base.linears[path][1])
        a, b = gate.route(x, site(path, 11)), loaded.route(x, site(path, 11))
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    with torch.no_grad():
        assert torch.equal(rm(IDS).logits, rm2(IDS).logits)

    lib4.add(random_adapter(tiny_spec, "a1", rank=2, seed=99, std=0.15), replace=True)
    with pytest.raises(ValidationError, match="another version of adapter 'a1'"):
        load_router(lib4, "gate")


def test_a_saved_gate_keeps_its_adapters_and_checks_shapes(lib4, tiny_spec):
    gate = bound(lib4)
    save_router(lib4, "gate", gate)
    lib4.add(random_adapter(tiny_spec, "a4", rank=2, seed=4))
    loaded = load_router(lib4, "gate")
    loaded.bind(lib4, lib4.names())
    assert loaded.adapters == ["a0", "a1", "a2", "a3"]  # not the new a4
    other = MoEGate.from_state(gate.config(), gate.state_tensors(), ["a0", "a1"])
    with pytest.raises(ValueError, match=r"has shape \(4, 64\), this binding needs \(2, 64\)"):
        other.bind(lib4, lib4.names())


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k"), (dict(granularity="token"), "granularity"), (dict(init="zeros"), "init"),
    (dict(temperature=0.0), "temperature"), (dict(balance_coef=-1.0), "balance_coef"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEGate(**kwargs)


def test_a_module_none_of_its_adapters_adapts_gets_empty_slots(lib4):
    gate = bound(lib4, adapters=["a3"])  # a3 has no k_proj
    d = gate.route(torch.randn(5, 32), site(K1, 5))
    assert d.indices.shape == (5, 1) and (d.indices == -1).all() and (d.weights == 0).all()
