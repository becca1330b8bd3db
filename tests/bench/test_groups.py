"""Related-task merges: normalisation by each task's own adapter, a search that leaves the model as
it was, and nothing left in the library (tiny model, random adapters named after real tasks)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from quiver.bench.groups import evaluate_merges, merges_table, read_groups
from quiver.bench.quality import Settings, _answer_all, _score
from quiver.library.synthetic import random_adapter

pytest.importorskip("nevergrad")


def test_merges_are_scored_normalised_and_removed(lib, tiny_spec, tiny_model, tiny_tokenizer):
    model = copy.deepcopy(tiny_model)
    group = ["date_iso", "km_to_m"]
    for i, t in enumerate(group + ["topic"]):
        lib.add(random_adapter(tiny_spec, t, rank=2, seed=i, std=0.2, targets=("q_proj", "v_proj")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = Settings(n_test=2, max_new_tokens=3)

    def answer_all(rm, items, router_for):
        return _answer_all(rm, tiny_tokenizer, items, settings, router_for)

    own = {"date_iso": 0.5, "km_to_m": 0.0}  # a task whose own adapter scores 0 is left out
    rep = evaluate_merges(model, tiny_tokenizer, lib, {"g": group, "solo": ["topic"]}, answer_all, _score, own,
                          n_test=2, methods=("linear", "pcb-search"), n_valid=2, search_budget=3, log=lambda s: None)
    assert list(rep["groups"]) == ["g"]  # groups of one task are not merges
    for method in ("linear", "pcb-search"):
        per_task = rep["per_task"][method]["g"]
        assert set(per_task) == set(group)
        assert rep["normalised"][method]["g"] == pytest.approx(per_task["date_iso"] / 0.5)
        assert rep["normalised"][method]["mean"] == rep["normalised"][method]["g"]
    assert sorted(lib.names()) == sorted(group + ["topic"])  # the merges are gone
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the search restored every weight
    assert "| pcb-search |" in merges_table(rep)


def test_groups_file_errors_are_specific(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"clusters": {"0": ["date_iso", "no_such_task"]}}))
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        read_groups(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a clusters file"):
        read_groups(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"k": 1, "clusters": {"0": ["date_iso", "km_to_m"]}}))
    assert read_groups(ok) == {"cluster-0": ["date_iso", "km_to_m"]}


def test_cluster_library_routes_over_cluster_adapters(tmp_path, tiny_spec, tiny_model, tiny_tokenizer, peft_adapter_dir):
    """The MBC library: one adapter per cluster, its oracle routes a prompt to its cluster."""
    import shutil

    from quiver.bench.groups import evaluate_cluster_library

    groups = {"cluster-0": ["date_iso", "km_to_m"], "cluster-1": ["topic"]}
    adapters_dir = tmp_path / "clusters"
    for i, name in enumerate(groups):
        shutil.copytree(peft_adapter_dir(name, seed=i), adapters_dir / name)
    settings = Settings(n_test=2, max_new_tokens=3)

    def answer_all(rm, items, router_for):
        return _answer_all(rm, tiny_tokenizer, items, settings, router_for)

    rep = evaluate_cluster_library(copy.deepcopy(tiny_model), tiny_tokenizer, tiny_spec, tmp_path / "mbc", adapters_dir,
                                   groups, ["date_iso", "km_to_m", "topic"], ["date_us"], answer_all, _score, 2,
                                   log=lambda s: None)
    res = rep["results"]
    assert set(res) == {"cluster-oracle", "mbc-arrow-k1", "mbc-arrow-k2"}
    assert set(res["cluster-oracle"]["per_task"]) == {"date_iso", "km_to_m", "topic"}
    assert set(res["mbc-arrow-k2"]["per_task"]) == {"date_iso", "km_to_m", "topic", "date_us"}
    d = res["mbc-arrow-k1"]["diagnostics"]
    assert d["random"] == 0.5 and 0 <= d["own_share"] <= 1 and 0 <= d["top1_hit"] <= 1
    with pytest.raises(FileNotFoundError, match="cluster-2"):
        evaluate_cluster_library(tiny_model, tiny_tokenizer, tiny_spec, tmp_path / "mbc2", adapters_dir,
                                 {**groups, "cluster-2": ["uppercase"]}, ["date_iso"], [], answer_all, _score, 2)
