"""`quiver library embed --ray`: the per-adapter work as Ray tasks on the two-node test cluster
gives exactly the local run's embeddings, on a local library and on the team library."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

N_ADAPTERS = 10


def _derived(lib) -> dict:
    return {(r["blob"], r["kind"], r["config"]): bytes(r["data"])
            for r in lib._catalog.all("SELECT blob, kind, config, data FROM derived")}


def _fill(lib, spec):
    from quiver.library.synthetic import random_adapter

    for i in range(N_ADAPTERS):
        lib.add(random_adapter(spec, f"ad{i}", rank=2 + i % 3, seed=i),
                description=f"adapter {i}: " + ["sql queries", "french", "dates", "arithmetic"][i % 4],
                examples=[f"example prompt {i}"])


@pytest.fixture
def ray_driver(ray_cluster):
    import ray

    from quiver.cluster import connect

    connect(ray_cluster)
    yield ray_cluster
    ray.shutdown()


@pytest.mark.parametrize("backend", ["local", "team"])
def test_embed_on_ray_equals_local(backend, ray_driver, tiny_spec, tmp_path, request):
    from quiver.cluster.jobs import embed
    from quiver.cluster.serve import open_library
    from quiver.config import compose
    from quiver.library import Library

    cfg = compose([])
    if backend == "local":
        with Library.open(tmp_path / "a", base_model=tiny_spec) as lib:
            _fill(lib, tiny_spec)
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        local, on_ray = open_library(cfg, str(tmp_path / "a")), open_library(cfg, str(tmp_path / "b"))
        location = str(tmp_path / "b")
    else:  # two team libraries with the same adapters; the workers open theirs by its URL
        new_team = request.getfixturevalue("new_team")
        team_a, team_b = new_team(), new_team()
        local, on_ray = team_a.open(base_model=tiny_spec), team_b.open(base_model=tiny_spec)
        _fill(local, tiny_spec)
        _fill(on_ray, tiny_spec)
        location = team_b.url
    try:
        before = _derived(on_ray)
        counts = embed(cfg, on_ray, location=location, chunk_size=5, progress=False)
        assert counts == local.embed(progress=False) == {"arrow": N_ADAPTERS, "svd": N_ADAPTERS, "text": N_ADAPTERS}
        got, want = _derived(on_ray), _derived(local)
        assert not before and len(want) == 3 * N_ADAPTERS
        assert got.keys() == want.keys()
        differ = [k for k in want if got[k] != want[k] and k[1] != "text"]
        assert not differ, f"{len(differ)} arrow/svd item(s) differ from the local run, e.g. {differ[0][1]}"
        # text: the encoder pads each batch to its longest text, and the tasks batch other texts
        # together than the local run: equal up to float32 rounding (a wrong vector is ~0.1 off)
        texts = [k for k in want if k[1] == "text"]
        worst = max(float(np.abs(np.frombuffer(got[k], np.float32) - np.frombuffer(want[k], np.float32)).max())
                    for k in texts)
        assert len(texts) == N_ADAPTERS and worst < 1e-5, worst
        assert on_ray.search("french", k=1)[0][0] == local.search("french", k=1)[0][0]
    finally:
        local.close()
        on_ray.close()


def test_embed_on_ray_rejects_bad_input_before_any_work(ray_driver, lib):
    from quiver.cluster.jobs import embed
    from quiver.config import compose

    with pytest.raises(ValueError, match="unknown embedding kind"):
        embed(compose([]), lib, kinds=("arrow", "nope"))
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        embed(compose([]), lib, chunk_size=0)
