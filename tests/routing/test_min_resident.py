"""How many adapters a router needs resident at once: what `generate.capacity` is checked against."""

from __future__ import annotations

from quiver.routing import MHR, Arrow, Fixed, MoEGate, Retrieval, Single, Uniform


def test_each_router_declares_the_adapters_one_forward_needs():
    assert Arrow(top_k=2).min_resident(12) == 2
    assert Arrow(top_k=4, adapters=["a", "b", "c"]).min_resident(12) == 3  # k beyond its adapters
    assert MoEGate(top_k=2).min_resident(12) == 2
    assert Retrieval(top_k=3).min_resident(12) == 3
    assert Single("a").min_resident(12) == 1
    assert Fixed({"a": 0.5, "b": 0.25, "c": 0.25}).min_resident(12) == 3
    assert Uniform().min_resident(12) == 12  # mixes the whole universe
    assert Uniform(adapters=["a", "b"]).min_resident(12) == 2
    assert MHR(tasks=["t"], adapters=["a", "b", "c", "d"]).min_resident(12) == 4
