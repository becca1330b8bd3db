"""Retrieval: prompts to adapters by text similarity, one mixture per request, in one forward."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver import Library, RoutedModel
from quiver.library import embeddings as emb
from quiver.library.synthetic import random_adapter
from quiver.routing import Fixed, Retrieval, RoutingSite, load_router, save_router

DESCRIPTIONS = {
    "dates": ("converts dates to ISO format", ["Write 03/04/2021 as YYYY-MM-DD"]),
    "french": ("translates English to French", ["Translate into French: good morning"]),
    "add": ("adds two numbers", ["What is 12 plus 30?"]),
    "sql": ("writes SQL queries that select rows from a database table", ["Select all users from the table"]),
}
PROMPTS = {  # prompt -> the adapter it is about
    "Convert 5 January 2022 to ISO 8601": "dates",
    "Translate into French: the cat is sleeping": "french",
    "What is 17 plus 25?": "add",
    "Write a query that selects all users older than 30 from the users table": "sql",
}
IDS = torch.tensor([[3, 17, 42, 99, 5, 64], [7, 7, 1, 2, 90, 33], [11, 5, 8, 120, 64, 2]])


@pytest.fixture
def tlib(tmp_path, tiny_spec):
    with Library.open(tmp_path / "lib", base_model=tiny_spec) as lib:
        for i, (name, (description, examples)) in enumerate(DESCRIPTIONS.items()):
            lib.add(random_adapter(tiny_spec, name, rank=2, seed=i, std=0.15), description=description,
                    examples=examples)
        yield lib


def bound(lib, **kwargs) -> Retrieval:
    router = Retrieval(**kwargs)
    router.bind(lib, lib.names())
    return router


def test_each_prompt_goes_to_its_adapter_with_softmax_weights(tlib):
    router = bound(tlib, top_k=2, temperature=0.1)
    prompts = list(PROMPTS)
    router.prepare(prompts=prompts)
    assert [hits[0][0] for hits in router.hits] == list(PROMPTS.values())
    # Similarities as the embedder gives them, without the index.
    names = tlib.names()
    docs = emb.embed_texts([emb.adapter_text(*DESCRIPTIONS[n]) for n in names])
    sims = emb.embed_texts(prompts) @ docs.T  # [R, E]
    S = 5
    d = router.route(torch.randn(len(prompts) * S, 32), RoutingSite("any", torch.arange(len(prompts)).repeat_interleave(S)))
    assert d.indices.shape == d.weights.shape == (len(prompts) * S, 2)
    for r, hits in enumerate(router.hits):
        rows = slice(r * S, (r + 1) * S)
        assert (d.indices[rows] == d.indices[r * S]).all() and (d.weights[rows] == d.weights[r * S]).all()
        idx = d.indices[r * S]
        assert [names[i] for i in idx] == [n for n, _ in hits]
        top = sims[r].topk(2)
        assert torch.equal(idx, top.indices)
        torch.testing.assert_close(torch.tensor([s for _, s in hits]), top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(d.weights[r * S], torch.softmax(top.values / 0.1, 0), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(len(prompts) * S))


def test_a_batch_of_prompts_is_a_batch_of_mixtures_in_one_forward(tiny_model, tlib):
    router = Retrieval(top_k=2, temperature=0.1)
    rm = RoutedModel(copy.deepcopy(tiny_model), tlib, router=router)
    prompts = list(PROMPTS)[:3]
    router.prepare(prompts=prompts)
    with torch.no_grad():
        batch = rm(IDS).logits
        mixtures = []
        for r, hits in enumerate(router.hits):
            weights = {n: float(w) for (n, _), w in zip(hits, torch.softmax(torch.tensor([s for _, s in hits]) / 0.1, 0))}
            mixtures.append(weights)
            alone = rm(IDS[r: r + 1], routers=[Fixed(weights)]).logits
            torch.testing.assert_close(batch[r: r + 1], alone, atol=1e-5, rtol=0)
    assert len({max(m, key=m.get) for m in mixtures}) == 3  # three different leading adapters
    with torch.no_grad():
        plain = rm(IDS, routers=[Fixed({"dates": 1.0})] * 3).logits
    assert not torch.allclose(batch[1:], plain[1:], atol=1e-4)


def test_generate_routes_each_request_by_its_prompt(tiny_model, tlib):
    router = Retrieval(top_k=1)
    rm = RoutedModel(copy.deepcopy(tiny_model), tlib, router=router)
    router.prepare(prompts=list(PROMPTS)[:2])
    out = rm.generate(IDS[:2, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    want = [rm.generate(IDS[r: r + 1, :4], routers=[Fixed({PROMPTS[p]: 1.0})], max_new_tokens=3,
                        do_sample=False, pad_token_id=0) for r, p in enumerate(list(PROMPTS)[:2])]
    assert torch.equal(out, torch.cat(want))


def test_sub_batches_read_their_own_rows(tlib):
    router = bound(tlib, top_k=1)
    router.prepare(prompts=list(PROMPTS))
    d = router.route(torch.randn(4, 32), RoutingSite("any", torch.tensor([3, 1]).repeat_interleave(2)))
    assert [tlib.names()[i] for i in d.indices[:, 0]] == ["sql", "sql", "french", "french"]


def test_restricted_adapters_and_search_many(tlib):
    router = bound(tlib, top_k=2, adapters=["french", "sql"])
    router.prepare(prompts=["What is 17 plus 25?", "Translate into French: hello"])
    assert all({n for n, _ in hits} == {"french", "sql"} for hits in router.hits)
    assert router.hits[1][0][0] == "french"
    d = router.route(torch.randn(2, 32), RoutingSite("any", torch.arange(2)))
    assert d.indices.max() <= 1  # positions among the router's two adapters
    many = tlib.search_many(list(PROMPTS), k=3)
    for prompt, hits in zip(PROMPTS, many):
        assert [n for n, _ in hits] == [n for n, _ in tlib.search(prompt, k=3)]
    assert tlib.search_many(["hello"], k=1, among=["add"])[0][0][0] == "add"


def test_errors_without_prompts(tlib):
    router = bound(tlib)
    with pytest.raises(RuntimeError, match="prepare"):
        router.route(torch.randn(2, 32), RoutingSite("any", torch.arange(2)))
    with pytest.raises(ValueError, match="prompt"):
        router.prepare(tasks=["x"])
    router.prepare(prompts=["What is 1 plus 1?"])  # one prompt: every request's
    one = router.route(torch.randn(2, 32), RoutingSite("any", torch.arange(2)))
    assert torch.equal(one.indices[0], one.indices[1])
    router.prepare(prompts=["What is 1 plus 1?", "Translate to French"])
    with pytest.raises(ValueError, match="request 2 has no prompt"):
        router.route(torch.randn(3, 32), RoutingSite("any", torch.arange(3)))
    with pytest.raises(RuntimeError, match="bind"):
        Retrieval().prepare(prompts=["x"])
    with pytest.raises(ValueError, match="temperature"):
        Retrieval(temperature=0)


def test_saved_and_loaded_through_the_library(tlib):
    router = bound(tlib, top_k=3, temperature=0.05, adapters=["add", "dates", "sql"])
    save_router(tlib, "retrieve", router)
    loaded = load_router(tlib, "retrieve")
    assert type(loaded) is Retrieval and loaded.config() == {"top_k": 3, "temperature": 0.05}
    assert loaded.adapters == ["add", "dates", "sql"]
    loaded.bind(tlib, tlib.names())
    for r in (router, loaded):
        r.prepare(prompts=list(PROMPTS))
    assert loaded.hits == router.hits
