"""ArrowVote: per-token Arrow's routing mass over the prompt chooses one mixture per request."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver import Library, RoutedModel
from quiver.library.synthetic import random_adapter
from quiver.routing import Arrow, ArrowVote, Fixed, RoutingSite, make_router
from quiver.runtime.answer import answer, cast_votes, encode_prompts, task_token_mask, template_head_ids

NAMES = ["a", "b", "c", "d"]
PROMPTS = ["hello world", "the cat sat on the mat", "xy", "numbers 12 and 345 please"]


@pytest.fixture
def vlib(tmp_path, tiny_spec):
    with Library.open(tmp_path / "lib", base_model=tiny_spec) as lib:
        for i, n in enumerate(NAMES):
            lib.add(random_adapter(tiny_spec, n, rank=2 + i % 2, seed=i, std=0.3))
        lib.embed(kinds=("arrow",), progress=False)
        yield lib


@pytest.fixture
def rm(vlib, tiny_model):
    m = RoutedModel(copy.deepcopy(tiny_model), vlib, router=Arrow(top_k=2), backend="reference")
    yield m
    m.unwrap()


def _reference_votes(rm, prompt_ids: list[int], scorer_k: int, start: int = 0) -> torch.Tensor:
    """One prompt alone, no padding: per-token Arrow's weights from a trace, summed per adapter
    over the modules and the tokens from ``start`` on."""
    arrow = rm.bind(Arrow(top_k=scorer_k))
    ids = torch.tensor([prompt_ids])
    with rm.tracing() as tr:
        rm(input_ids=ids, routers=[arrow])
    votes = torch.zeros(len(NAMES))
    for rec in tr.records:
        for t in range(start, ids.shape[1]):
            for i, w in zip(rec["indices"][0, t].tolist(), rec["weights"][0, t].tolist()):
                if i >= 0:
                    votes[NAMES.index(rec["keys"][i])] += w
    return votes


def test_votes_are_arrow_mass_over_task_tokens_and_batching_does_not_change_them(rm, tiny_tokenizer):
    vote = rm.bind(ArrowVote(top_k=2, scorer_k=2))
    enc = encode_prompts(tiny_tokenizer, PROMPTS, chat_template=False)  # left-padded batch
    assert (enc["attention_mask"] == 0).any()
    start = 2  # votes from each prompt's third token on
    mask = enc["attention_mask"].bool() & (enc["attention_mask"].cumsum(1) > start)
    votes = cast_votes(rm, vote, enc["input_ids"], enc["attention_mask"], mask)
    for r, p in enumerate(PROMPTS):
        ids = tiny_tokenizer(p)["input_ids"]
        want = _reference_votes(rm, ids, 2, start=min(start, len(ids)))
        torch.testing.assert_close(votes[r], want, atol=1e-4, rtol=1e-4)
        # mass per token and module is 1 (k=2 weights sum to 1): total = modules x task tokens
        n_task = int(mask[r].sum())
        assert float(votes[r].sum()) == pytest.approx(len(rm.paths) * n_task, rel=1e-5)
    assert (votes.argmax(1) != votes.argmax(1)[0]).any(), "the prompts should not all vote alike"


def test_set_votes_takes_the_top_k_with_their_share_of_the_mass(vlib):
    vote = ArrowVote(top_k=2)
    vote.bind(vlib, vlib.names())
    vote.prepare()
    with pytest.raises(RuntimeError, match="scoring pass"):
        vote.route(torch.randn(3, 32), RoutingSite("m", torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"\[requests, 4\]"):
        vote.set_votes(torch.ones(2, 3))
    vote.set_votes(torch.tensor([[1.0, 6.0, 3.0, 0.0],   # b (0.667), c (0.333)
                                 [2.0, 2.0, 2.0, 1.0],   # ties -> the lower index: a, b, 1/2 each
                                 [0.0, 0.0, 0.0, 0.0],   # no vote: no adapter
                                 [0.0, 0.0, 5.0, 0.0]])) # one adapter with mass: c alone
    assert vote.mixture(0) == pytest.approx({"b": 6 / 9, "c": 3 / 9})
    assert vote.mixture(1) == pytest.approx({"a": 0.5, "b": 0.5})
    assert vote.mixture(2) == {}
    assert vote.mixture(3) == {"c": 1.0}
    d = vote.route(torch.randn(5, 32), RoutingSite("m", torch.tensor([0, 0, 1, 2, 3])))
    assert d.indices.tolist() == [[1, 2], [1, 2], [0, 1], [-1, -1], [2, -1]]
    torch.testing.assert_close(d.weights[0], torch.tensor([6 / 9, 3 / 9]))
    assert d.weights[3].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="top_k"):
        ArrowVote(top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        ArrowVote(temperature=0)
    assert isinstance(make_router("arrow-vote", top_k=1), ArrowVote)


def test_answers_equal_the_voted_mixture_and_each_prompt_alone(rm, tiny_tokenizer):
    """answer() runs the scoring pass; the generation is the fixed mixture the vote chose, and a
    batch of prompts answers each prompt as it is answered alone."""
    vote = ArrowVote(top_k=2)
    batch, _ = answer(rm, tiny_tokenizer, PROMPTS, routers=[vote] * len(PROMPTS), max_new_tokens=6,
                      chat_template=False, trace=False)
    mixtures = [vote.mixture(r) for r in range(len(PROMPTS))]
    assert len({tuple(sorted(m)) for m in mixtures}) > 1
    for p, got, mix in zip(PROMPTS, batch, mixtures):
        alone, _ = answer(rm, tiny_tokenizer, [p], routers=[vote], max_new_tokens=6, chat_template=False,
                          trace=False)
        assert vote.mixture(0) == pytest.approx(mix)
        fixed, _ = answer(rm, tiny_tokenizer, [p], routers=[Fixed(mix)], max_new_tokens=6, chat_template=False,
                          trace=False)
        assert got.text == alone[0].text == fixed[0].text, p
    # mixed with other routers in one batch: only the vote's rows are scored, each as alone
    mixed, _ = answer(rm, tiny_tokenizer, PROMPTS[:2], routers=[vote, Arrow(top_k=1)], max_new_tokens=6,
                      chat_template=False, trace=False)
    assert mixed[0].text == batch[0].text
    assert vote.mixture(1) == {}  # the row it does not serve has no vote


def test_task_tokens_skip_the_chat_templates_head(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}bot:{% endif %}")
    tok.padding_side = "left"
    head = template_head_ids(tok)
    assert head and template_head_ids(tiny_tokenizer) == []
    enc = encode_prompts(tok, ["hi", "a longer prompt here"])
    mask = task_token_mask(head, enc["input_ids"], enc["attention_mask"])
    att = enc["attention_mask"].bool()
    for r in range(2):
        real = enc["input_ids"][r][att[r]].tolist()
        common = next((i for i, (a, b) in enumerate(zip(real, head)) if a != b), len(head))
        # this BPE may merge the head's last token with the prompt's first: the common prefix
        assert common >= len(head) - 1
        assert mask[r][att[r]].tolist() == [False] * common + [True] * (len(real) - common)
        assert not mask[r][~att[r]].any()
    # a prompt that shares only part of the head keeps its own tokens; one that is all head keeps all
    ids = torch.tensor([head[:2] + [7, 8, 9], head + [0, 0][:0]])
    m = task_token_mask(head, ids[:1], torch.ones_like(ids[:1]))
    assert m[0].tolist() == [False, False, True, True, True]
    only = torch.tensor([head])
    assert task_token_mask(head, only, torch.ones_like(only)).all()
