"""A CUDA step reads nothing back from the device. Without a GPU: the step is planned and run on
the ``meta`` device (shapes, no data), which the kernels dispatch as they dispatch CUDA, and
where any data-dependent host read (``.item()``, ``.tolist()``, ``nonzero``, ``bool(tensor)``,
``torch.equal``, a Python loop over a tensor's values) raises. Covered: the plan, routing,
the routing metadata and the Triton backend's launch preparation (the launch itself is
recorded instead of run)."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver.kernels import build_meta
from quiver.library.synthetic import random_adapter
from quiver.routing import MHR, Arrow, Fixed, MoEGate, Uniform
from quiver.runtime import RoutedModel

triton_mixture = pytest.importorskip("quiver.kernels.triton_mixture")
META = torch.device("meta")


@pytest.fixture
def recorded(monkeypatch):
    """Replace the Triton launch by a record of what would be launched."""
    launches = []

    def plan_only(x, bank, meta):
        out, plan = triton_mixture.launch_plan(x, bank, meta)
        launches.extend(plan)
        return out

    monkeypatch.setattr(triton_mixture, "_launch", plan_only)
    return launches


@pytest.fixture
def lib5(lib):
    for i in range(4):
        lib.add(random_adapter(lib.base, f"a{i}", rank=2 + i % 2, seed=i, std=0.1))
    lib.add(random_adapter(lib.base, "q-only", rank=2, seed=9, std=0.1, targets=("q_proj",)))
    return lib


ROUTERS = {
    "arrow": lambda: Arrow(top_k=2),
    "moe": lambda: MoEGate(top_k=2).eval(),
    "fixed": lambda: Fixed({"a0": 0.5, "a3": 0.5}),
    "uniform": lambda: Uniform(["a1", "a2"]),
    "mhr": lambda: MHR(["t"], n_splits=2, adapters=["a1", "a3"]),  # merge-before, head views
}


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("tokens", [1, 64], ids=["decode", "prefill"])
def test_a_cuda_step_has_no_host_read(tiny_model, lib5, name, tokens, recorded):
    rm = RoutedModel(copy.deepcopy(tiny_model).to(META), lib5, router=ROUTERS[name](), check_fingerprint=False)
    eng = rm._engine
    eng.begin((2, tokens), META)  # the first step loads the bank (from the host, between steps)
    eng.end()
    plan = eng.begin((2, tokens), META)  # bank resident: this step must not read back
    try:
        for path in rm.paths:
            lin = rm.model.get_submodule(path)
            delta = plan.delta(torch.empty(2, tokens, lin.in_features, device=META), path)
            assert delta.shape == (2 * tokens, lin.out_features) and delta.is_meta
    finally:
        eng.end()
    if name != "mhr" and 2 * tokens * 2 > 32:  # merge-after, not a small call: planned Triton launches
        assert recorded and {k.__name__ for k, *_ in recorded} >= {"_shrink_kernel", "_expand_kernel"}


def test_host_reads_fail_on_meta():
    """The check above can fail: the CPU's exact metadata (one host copy) raises on meta."""
    idx = torch.zeros(8, 2, dtype=torch.int64, device=META)
    w = torch.ones(8, 2, device=META)
    with pytest.raises((NotImplementedError, RuntimeError)):
        build_meta(idx, w, 4)
    meta = build_meta(idx, w, 4, exact=False)
    assert meta.active is None and meta.max_count == 16
