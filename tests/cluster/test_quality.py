"""`quiver bench quality --ray`: the methods, and PCB's coefficient candidates, as Ray tasks on the
two-node test cluster give the local run's results (tiny model loaded by every worker from its
Hugging Face directory; random adapters named after real tasks)."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("nevergrad")

HELD_IN, HELD_OUT = ["date_iso", "km_to_m", "topic"], ["date_us"]


@contextlib.contextmanager
def one_thread():
    """The workers run one thread each; the local run does too, so that float rounding (and so
    a greedy answer hinging on it) is the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def task_lib(tmp_path, tiny_spec):
    from quiver.library import Library
    from quiver.library.synthetic import random_adapter

    lib = Library.open(tmp_path / "tasks", base_model=tiny_spec)
    for i, t in enumerate(HELD_IN):
        lib.add(random_adapter(tiny_spec, t, rank=2, seed=i, std=0.3, targets=("q_proj", "v_proj")),
                description=f"the {t.replace('_', ' ')} task")
    lib.embed(kinds=("arrow",), progress=False)
    yield lib
    lib.close()


@pytest.fixture
def on_ray(ray_cluster, tiny_model_dir, task_lib):
    import ray

    from quiver.bench.onray import OnRay

    yield OnRay(str(tiny_model_dir), str(task_lib.path), ray_cluster)
    ray.shutdown()


def test_quality_methods_on_ray_equal_the_local_run(on_ray, task_lib, tiny_model_dir):
    from quiver.bench.quality import Settings, evaluate
    from quiver.library import load_base_model

    model, tok = load_base_model(tiny_model_dir)
    settings = Settings(n_test=2, max_new_tokens=4, router_steps=2, shots=1, batch_size=3,
                        arrow=((1, "merge-after"), (2, "merge-before")),
                        methods=("base", "oracle", "arrow", "uniform", "moe"))
    with one_thread():
        local = evaluate(model, tok, task_lib, HELD_IN, HELD_OUT, settings, log=lambda s: None)
    remote = evaluate(model, tok, task_lib, HELD_IN, HELD_OUT, settings, log=lambda s: None, ray=on_ray)
    assert list(remote["results"]) == ["base", "oracle", "arrow-k1", "arrow-k2-mb", "uniform", "moe"]
    for name, r in local["results"].items():  # the same answers, word for word
        assert remote["results"][name]["answers_sha256"] == r["answers_sha256"], name
        assert remote["results"][name]["per_task"] == r["per_task"], name
    digests = {r["answers_sha256"] for r in local["results"].values()}
    assert len(digests) >= 3, "the methods should not all answer alike"
    assert remote["diagnostics"] == local["diagnostics"] and set(local["diagnostics"]) == {"arrow-k1", "arrow-k2-mb",
                                                                                           "moe"}
    assert sorted(task_lib.names()) == sorted(HELD_IN)  # the merge the workers used is gone again


def test_pcb_search_on_ray_finds_the_local_coefficients(on_ray, task_lib, tiny_model_dir):
    from quiver.bench.groups import _search_pcb
    from quiver.library import load_base_model

    model, tok = load_base_model(tiny_model_dir)
    adapters = [task_lib.get(t) for t in HELD_IN[:2]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with one_thread():
        local = _search_pcb(model, tok, adapters, HELD_IN[:2], n_valid=2, budget=6, batch=3)
    remote = _search_pcb(model, tok, adapters, HELD_IN[:2], n_valid=2, budget=6, batch=3, ray=on_ray)
    assert remote == local and len(local) == 2 and all(0.8 <= x <= 1.3 for x in local)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored


def test_quality_on_ray_refuses_an_unknown_method_before_any_work(on_ray, task_lib, tiny_model):
    from quiver.bench.quality import Settings, evaluate

    with pytest.raises(ValueError, match="unknown method 'nope'"):
        evaluate(tiny_model, None, task_lib, HELD_IN, HELD_OUT, Settings(methods=("base", "nope")), ray=on_ray)
    assert sorted(task_lib.names()) == sorted(HELD_IN)
