"""MHR training modes on the tiny model: pre-training, MHR-z (logits only), MHR-μ (averaged skills)."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver import Library, RoutedModel
from quiver.library.synthetic import random_adapter
from quiver.routing import MHR, Poly, Single, load_router
from quiver.training import (TrainConfig, average_skills, make_lm_loss, mean_loss, mhr_mu, mhr_pretrain, mhr_z,
                             router_loss_fn)

SKILLS = ["s0", "s1", "s2"]
MATH = [{"prompt": f"what is {i} plus {i}?", "answer": f"{2 * i}", "task": "math"} for i in range(1, 5)]
FR = [{"prompt": f"translate {w} into french", "answer": f"le {w}", "task": "fr"}
      for w in ("date", "query", "user", "sentence")]


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 12, "batch_size": 8, "lr": 5e-2, "warmup_steps": 0, "progress": False} | kw)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture
def lib3(tmp_path, tiny_spec):
    with Library.open(tmp_path / "lib", base_model=tiny_spec) as lib:
        for i, name in enumerate(SKILLS):
            lib.add(random_adapter(tiny_spec, name, rank=4, alpha=8.0 - 2 * i, seed=i, std=0.2,
                                   targets=("q_proj", "v_proj", "up_proj", "down_proj")))
        yield lib


def test_mhr_z_changes_only_the_routing_logits(tiny_model, lib3, tok):
    router = MHR(["math"], n_splits=2, adapters=SKILLS)
    rm = RoutedModel(copy.deepcopy(tiny_model), lib3, router=router)
    base = {k: v.clone() for k, v in rm.model.state_dict().items()}
    skills = {n: (lib3.info(n).blob, lib3.get(n)) for n in SKILLS}
    loss = router_loss_fn(rm, router, tok, chat_template=False)
    before = mean_loss(loss, MATH + FR)
    bank = {p: (b.A.clone(), b.B.clone()) for p, b in rm.bank.banks.items()}  # loaded by the forward
    logits0 = router.logits.detach().clone()

    result = mhr_z(rm, router, tok, MATH + FR, config=cfg(steps=15, lr=0.3), valid=FR)

    assert router.tasks == ["math", "fr"] and router.logits.shape == (2, 2, 3)  # "fr" added
    assert not router.training and result.evals[-1]["valid_loss"] == pytest.approx(mean_loss(loss, FR), abs=1e-6)
    assert not torch.equal(router.logits[:1].detach(), logits0)
    assert mean_loss(loss, MATH + FR) < before - 2e-2 and len(result.history) == 15
    for k, v in rm.model.state_dict().items():
        assert torch.equal(v, base[k]), k
    for n, (blob, ad) in skills.items():
        assert lib3.info(n).blob == blob
        now = lib3.get(n)
        for p, m in ad.modules.items():
            assert torch.equal(now.modules[p].A, m.A) and torch.equal(now.modules[p].B, m.B)
    assert len(bank) == 8 and set(rm.bank.keys) - {None} == {f"{n}#head{h}of2" for n in SKILLS for h in (0, 1)}
    for p, (A, B) in bank.items():
        assert torch.equal(rm.bank.banks[p].A, A) and torch.equal(rm.bank.banks[p].B, B)
    assert [n for n, p in router.named_parameters()] == ["logits"]
    with pytest.raises(ValueError, match="needs a string 'task'"):
        mhr_z(rm, router, tok, [{"prompt": "a", "answer": "b"}], config=cfg())


def test_pretrain_registers_skills_and_a_router_that_reproduces_the_model(tiny_model, lib, tok):
    model = copy.deepcopy(tiny_model)
    loss_base = mean_loss(make_lm_loss(model, tok, chat_template=False), MATH + FR)
    router, result = mhr_pretrain(model, tok, MATH + FR, lib, skills=3, n_splits=2, rank=2, alpha=4.0,
                                  targets=("q_proj", "v_proj"), config=cfg(steps=20, batch_size=4, lr=2e-2),
                                  valid=MATH + FR, chat_template=False, name_prefix="sk", router_name="mt")
    names = ["sk-0", "sk-1", "sk-2"]
    assert lib.names() == names and lib.get("sk-1").rank == 2
    assert type(router) is MHR and not router.training and router.tasks == ["fr", "math"]
    # skills start with B = 0 (the base model); training lowers the loss
    assert result.evals[-1]["valid_loss"] < loss_base - 1e-2
    assert all(p.requires_grad for p in model.parameters())  # flags restored, hooks removed, base untouched
    torch.testing.assert_close(model(torch.tensor([[3, 4, 5]])).logits, tiny_model(torch.tensor([[3, 4, 5]])).logits)

    loaded = load_router(lib, "mt")
    assert type(loaded) is MHR and torch.equal(loaded.logits, router.logits.detach().cpu())
    rm = RoutedModel(copy.deepcopy(tiny_model), lib, router=loaded)
    again = mean_loss(router_loss_fn(rm, loaded, tok, chat_template=False), MATH + FR)
    assert again == pytest.approx(result.evals[-1]["valid_loss"], abs=1e-5)

    poly, _ = mhr_pretrain(copy.deepcopy(tiny_model), tok, MATH, lib, skills=2, rank=2, alpha=4.0,
                           config=cfg(steps=1), chat_template=False, name_prefix="p", router_name="poly")
    assert type(load_router(lib, "poly")) is Poly and poly.adapters == ["p-0", "p-1"]
    with pytest.raises(ValueError, match="already has adapters"):
        mhr_pretrain(copy.deepcopy(tiny_model), tok, MATH, lib, skills=2, config=cfg(steps=1), name_prefix="p")


@torch.no_grad()
def test_average_skills_is_uniform_poly(tiny_model, lib3):
    avg = average_skills([lib3.get(n) for n in SKILLS], "mu")
    path = "model.layers.0.self_attn.v_proj"
    ads = [lib3.get(n) for n in SKILLS]
    A = sum(a.modules[path].A for a in ads) / 3
    B = sum(a.scaling(path) * a.modules[path].B for a in ads) / 3
    torch.testing.assert_close(avg.delta(path), B @ A)
    torch.testing.assert_close(avg.modules[path].A, A)
    lib3.add(avg)
    ids = torch.tensor([[3, 17, 42, 99, 5]])
    poly = Poly(["math"], adapters=SKILLS)
    poly.prepare(tasks=["unseen"])  # uniform weights
    want = RoutedModel(copy.deepcopy(tiny_model), lib3, router=poly)(ids).logits
    got = RoutedModel(copy.deepcopy(tiny_model), lib3, router=Single("mu"))(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_mhr_mu_starts_from_the_average_and_trains(tiny_model, lib3, tok):
    avg = average_skills([lib3.get(n) for n in SKILLS], "mu")
    model = copy.deepcopy(tiny_model)
    # A negligible learning rate: the returned adapter is the starting point.
    start, _ = mhr_mu(model, tok, lib3, SKILLS, MATH, "mu", config=cfg(steps=1, lr=1e-30), chat_template=False)
    assert sorted(start.modules) == sorted(avg.modules)
    for p, m in avg.modules.items():
        torch.testing.assert_close(start.modules[p].A, m.A, atol=1e-12, rtol=0)
        torch.testing.assert_close(start.delta(p), avg.delta(p), atol=1e-7, rtol=1e-6)
    trained, result = mhr_mu(model, tok, lib3, SKILLS, MATH, "mu", config=cfg(steps=15, lr=1e-2),
                             valid=MATH, chat_template=False)
    assert result.evals[-1]["valid_loss"] < result.history[0]["loss"] - 1e-2
    assert not torch.equal(trained.modules[path := "model.layers.0.self_attn.q_proj"].A, avg.modules[path].A)
    torch.testing.assert_close(model(torch.tensor([[3, 4]])).logits, tiny_model(torch.tensor([[3, 4]])).logits)
