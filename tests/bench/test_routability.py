"""Routing diagnostics: the shares and top-1 hits against their definitions on a tiny model."""

from __future__ import annotations

import copy

import pytest

from quiver.bench.routability import routing_diagnostics, template_prefix_len
from quiver.library.synthetic import random_adapter
from quiver.routing import Arrow, Fixed
from quiver.runtime import RoutedModel

PROMPTS = ["convert the date", "what is two plus two?", "write a query that selects all users please", "four"]
TASKS = ["a", "b", "c", "a"]


@pytest.fixture
def routed(lib, tiny_spec, tiny_model):
    for i, name in enumerate("abc"):
        lib.add(random_adapter(tiny_spec, name, rank=4, seed=i, std=0.3, targets=("q_proj", "v_proj")))
    lib.embed(kinds=("arrow",), progress=False)
    rm = RoutedModel(copy.deepcopy(tiny_model), lib, adapters=["a", "b", "c"])
    yield rm
    rm.unwrap()


def _items(prompts=PROMPTS, tasks=TASKS):
    return [{"prompt": p, "task": t} for p, t in zip(prompts, tasks)]


def test_fixed_weights_give_their_share_and_top1(routed, tiny_tokenizer):
    rep = routing_diagnostics(routed, tiny_tokenizer, _items(), Fixed({"a": 0.25, "b": 0.75}), batch_size=3)
    assert rep["random"] == pytest.approx(1 / 2)  # the router chooses among a and b
    assert rep["per_task"]["a"] == pytest.approx({"own_share": 0.25, "own_share_all": 0.25, "top1_hit": 0.0})
    assert rep["per_task"]["b"] == pytest.approx({"own_share": 0.75, "own_share_all": 0.75, "top1_hit": 1.0})
    assert "c" not in rep["per_task"]  # c is not among the router's adapters
    assert rep["own_share"] == pytest.approx((0.25 + 0.75 + 0.25) / 3)
    assert rep["top1_hit"] == pytest.approx(1 / 3) and rep["n_prompts"] == 3


def test_padded_batches_equal_each_prompt_alone(routed, tiny_tokenizer):
    """Left padding must not count: a batch's per-prompt figures equal each prompt read alone."""
    router = Arrow(top_k=2, adapters=["a", "b", "c"])
    batch = routing_diagnostics(routed, tiny_tokenizer, _items()[:3], router, batch_size=3)
    for p, t in zip(PROMPTS[:3], TASKS[:3]):
        alone = routing_diagnostics(routed, tiny_tokenizer, _items([p], [t]), router)
        assert alone["per_task"][t]["own_share"] == pytest.approx(batch["per_task"][t]["own_share"], abs=1e-5)
        assert alone["per_task"][t]["top1_hit"] == batch["per_task"][t]["top1_hit"]
    assert 0 < batch["own_share"] < 1  # Arrow spreads weight: the test can tell shares apart


def test_tasks_without_an_adapter_are_skipped_and_none_left_is_an_error(routed, tiny_tokenizer):
    rep = routing_diagnostics(routed, tiny_tokenizer, _items(tasks=["a", "zz", "b", "zz"]), Fixed({"a": 0.5, "b": 0.5}))
    assert rep["n_prompts"] == 2 and set(rep["per_task"]) == {"a", "b"}
    with pytest.raises(ValueError, match="no prompt's task"):
        routing_diagnostics(routed, tiny_tokenizer, _items(tasks=["zz"] * 4), Fixed({"a": 1.0}))


def test_where_the_mass_goes_covers_tasks_without_an_adapter_too(routed, tiny_tokenizer):
    """``where``: per task, held-out ones included, the adapter with the most mass per prompt and
    the median runner-up / top ratio — with fixed weights 0.3 / 0.7, b on top at 0.3 / 0.7."""
    rep = routing_diagnostics(routed, tiny_tokenizer, _items(tasks=["a", "zz", "b", "zz"]), Fixed({"a": 0.3, "b": 0.7}))
    assert set(rep["where"]) == {"a", "zz", "b"}
    assert rep["where"]["zz"]["top"] == {"b": 2} and rep["where"]["a"]["top"] == {"b": 1}
    for w in rep["where"].values():
        assert w["second_to_top"] == pytest.approx(0.3 / 0.7, abs=1e-5)


def test_template_prefix_is_counted_from_the_tokenizer(tiny_tokenizer):
    assert template_prefix_len(tiny_tokenizer) == 0  # no chat template: every token is the user's


def test_the_task_screen_refuses_tasks_without_an_adapter(capsys):
    from quiver.bench.routability import main

    with pytest.raises(SystemExit):
        main(["--tasks", "date_iso", "lowercase"])  # lowercase is held out: no adapter to route to
    assert "not held-in tasks (no adapter): ['lowercase']" in capsys.readouterr().err


def test_arrow_vote_gets_its_votes_and_routes_each_prompt_whole(routed, tiny_tokenizer):
    """The diagnostics run ArrowVote's scoring pass: with top-1, a prompt's every token goes to the
    one voted adapter, so its share is 0 or 1 and equals its top-1 hit; the voted adapter is the
    one per-token Arrow (the scorer) gave the most weight, i.e. Arrow's own top-1 over the prompt."""
    from quiver.routing import ArrowVote

    vote = routing_diagnostics(routed, tiny_tokenizer, _items(), ArrowVote(top_k=1, adapters=["a", "b", "c"]),
                               batch_size=4)
    arrow = routing_diagnostics(routed, tiny_tokenizer, _items(), Arrow(top_k=2, adapters=["a", "b", "c"]),
                                batch_size=4)
    for t, d in vote["per_task"].items():
        assert d["own_share"] in (0.0, 0.5, 1.0)  # task "a" has two prompts
        assert d["own_share"] == pytest.approx(d["top1_hit"])
        assert d["top1_hit"] == arrow["per_task"][t]["top1_hit"]


def test_the_budget_plot_draws_one_line_per_training_run(tmp_path):
    """A snapshot (``30-of-300``) and the end of its run (``300``) share a line; other labels
    are runs of their own; the plot is written."""
    from quiver.bench.routability import _run_of, study_plot

    assert _run_of("30-of-300") == _run_of("300") == "300-step run"
    assert _run_of("30") == "30-step run" and _run_of("shipped-30") == "shipped-30"
    row = {"own_share": 0.2, "top1_hit": 1.0, "random": 1 / 12, "arrow_over_oracle": 0.6, "valid_loss": 0.1}
    rows = [dict(row, budget=b, steps=n) for b, n in (("30", 30), ("30-of-300", 30), ("300", 300))]
    study_plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
