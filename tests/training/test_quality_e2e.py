"""Train -> register -> route -> evaluate on the real model, in miniature (the quality bench's path)."""

from __future__ import annotations

import pytest

from quiver import Library
from quiver.bench.quality import Settings, evaluate, table, targets
from quiver.library import BaseModelSpec
from quiver.tasks import get_task
from quiver.training import TrainConfig, train_lora

pytestmark = pytest.mark.real_model
# The shipped adapters (--init b-random) measured 0.206 / 1.00 on these 24 prompts with per-token
# Arrow top-2 (random: 1/12 = 0.083 / 0.083; the previous PEFT-initialised ones 0.183 / 0.79): the
# share's target (0.5) is not met by per-token Arrow in any setting measured (docs/routability.md).
# ArrowVote top-2 (one mixture per request from Arrow's mass over the prompt) is held to both
# targets: own share >= 0.5, own adapter on top for >= 90% of prompts.
OWN_SHARE_MIN, TOP1_MIN = 0.17, 0.9
VOTE_SHARE_MIN = 0.5


def test_trained_task_adapters_beat_the_base_model_when_routed(real_model, tmp_path):
    model, tok = real_model
    spec = BaseModelSpec.from_model(model)
    cfg = TrainConfig(steps=10, batch_size=8, lr=3e-3, warmup_steps=2, progress=False)
    with Library.open(tmp_path / "lib", base_model=spec) as lib:
        for name in ("date_iso", "uppercase"):
            train = [e.to_dict() for e in get_task(name).examples("train", 80)]
            adapter, result = train_lora(model, tok, train, name, rank=4, alpha=8.0, config=cfg)
            assert result.final_loss < result.history[0]["loss"]
            lib.add(adapter, description=get_task(name).description)
        settings = Settings(n_test=6, methods=("base", "oracle", "arrow"), arrow=((1, "merge-after"),),
                            max_new_tokens=12)
        report = evaluate(model, tok, lib, ["date_iso", "uppercase"], ["date_us"], settings, log=lambda s: None)
        assert lib.names() == ["date_iso", "uppercase"]  # nothing left behind
    res = report["results"]
    assert list(res) == ["base", "oracle", "arrow-k1"]
    for name in ("base", "arrow-k1"):
        assert set(res[name]["per_task"]) == {"date_iso", "uppercase", "date_us"}
        assert 0 <= res[name]["held_in"] <= 1 and 0 <= res[name]["held_out"] <= 1
    assert set(res["oracle"]["per_task"]) == {"date_iso", "uppercase"} and res["oracle"]["held_out"] is None
    # ten steps teach the ISO date format, which the base model does not follow exactly
    assert res["oracle"]["per_task"]["date_iso"] > res["base"]["per_task"]["date_iso"]
    share = report["diagnostics"]["arrow-k1"]["own_share"]
    assert 0 <= share <= 1
    assert "| arrow-k1 |" in table(report) and "arrow_within_85pct_of_oracle" not in targets({"base": res["base"]})


def test_shipped_task_adapters_route_prompts_to_their_own_adapter(real_model, tmp_path):
    """The shipped library routes: Arrow top-2 gives a held-in prompt's own adapter more than twice
    the random share of the routing weight on its task tokens and puts it on top for at least 90%
    of prompts; ArrowVote top-2 gives it at least half of the weight (no generation: one prefill
    per batch, two with ArrowVote's scoring pass)."""
    from quiver.bench.routability import routing_diagnostics
    from quiver.routing import Arrow, ArrowVote
    from quiver.runtime import RoutedModel
    from quiver.tasks import HELD_IN
    from quiver.training.tasklib import register_task_adapters

    model, tok = real_model
    with Library.open(tmp_path / "lib", base_model=BaseModelSpec.from_model(model)) as lib:
        register_task_adapters(lib)
        lib.embed(kinds=("arrow",), progress=False)
        rm = RoutedModel(model, lib, router=Arrow(top_k=2, adapters=list(HELD_IN)), adapters=list(HELD_IN))
        try:
            items = [e.to_dict() for t in HELD_IN for e in get_task(t).examples("test", 2)]
            rep = routing_diagnostics(rm, tok, items, rm.router, batch_size=24)
            vote = routing_diagnostics(rm, tok, items, ArrowVote(top_k=2, adapters=list(HELD_IN)), batch_size=24)
        finally:
            rm.unwrap()
    assert rep["n_prompts"] == vote["n_prompts"] == 24
    assert rep["own_share"] >= OWN_SHARE_MIN, rep["per_task"]
    assert rep["top1_hit"] >= TOP1_MIN, rep["per_task"]
    assert vote["own_share"] >= VOTE_SHARE_MIN, vote["per_task"]
    assert vote["top1_hit"] >= TOP1_MIN, vote["per_task"]
