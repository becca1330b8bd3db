"""Router artefacts: configured routers round-trip; unsavable ones and missing adapters fail clearly."""

from __future__ import annotations

import pytest
import torch

from quiver import Library
from quiver.library import ValidationError
from quiver.library.synthetic import random_adapter
from quiver.routing import Arrow, Fixed, RoutingSite, load_router, save_router


@pytest.fixture
def lib3(tmp_path, tiny_spec):
    with Library.open(tmp_path / "lib", base_model=tiny_spec) as lib:
        for i in range(3):
            lib.add(random_adapter(tiny_spec, f"a{i}", rank=2, seed=i, std=0.1))
        yield lib


def test_a_configured_arrow_router_round_trips_with_versions(lib3):
    arrow = Arrow(top_k=2, temperature=0.5, mode="merge-before", adapters=["a0", "a2"])
    arrow.bind(lib3, lib3.names())
    assert save_router(lib3, "arrow2", arrow) == 1
    assert save_router(lib3, "arrow2", arrow) == 2  # same name again: a new version
    loaded = load_router(lib3, "arrow2")
    assert isinstance(loaded, Arrow) and loaded.config() == arrow.config() and loaded.adapters == ["a0", "a2"]
    loaded.bind(lib3, lib3.names())
    path = "model.layers.1.self_attn.q_proj"
    x = torch.randn(5, lib3.base.linears[path][1])
    site = RoutingSite(path, torch.zeros(5, dtype=torch.int64))
    a, b = arrow.route(x, site), loaded.route(x, site)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert [r["version"] for r in lib3.artifacts("router")] == [2]


def test_routers_that_cannot_be_saved_or_loaded_fail_clearly(lib3):
    with pytest.raises(NotImplementedError, match="Fixed cannot be saved"):
        save_router(lib3, "f", Fixed({"a0": 1.0}))
    with pytest.raises(ValueError, match="bind the router"):
        save_router(lib3, "unbound", Arrow())
    save_router(lib3, "arrow", Arrow(adapters=["a0", "a1"]))
    lib3.remove("a1")
    with pytest.raises(ValidationError, match="no longer in the library"):
        load_router(lib3, "arrow")
