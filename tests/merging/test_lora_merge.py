"""merge(): LoRA adapters into one LoRA adapter."""

import pytest
import torch

from quiver.library.adapter import BaseModelRef, LoraAdapter
from quiver.library.errors import ValidationError
from quiver.merging import merge, merge_tensors, retained_energy

MODULES = {"layers.0.q": (12, 10), "layers.0.down": (10, 16)}


@pytest.fixture
def adapters(make_adapter) -> list[LoraAdapter]:
    """Three adapters with different ranks, alphas and one rsLoRA scaling."""
    return [
        make_adapter("a", 0, MODULES, rank=2, alpha=4.0),
        make_adapter("b", 1, MODULES, rank=3, alpha=3.0, use_rslora=True),
        make_adapter("c", 2, MODULES, rank=4, alpha=16.0),
    ]


def test_linear_merge_is_an_exact_concatenation(adapters):
    merged = merge(adapters, "linear", weights=[1.0, 2.0, 3.0])
    for path in MODULES:
        expected = sum(w * a.delta(path) for w, a in zip([1, 2, 3], adapters)) / 6
        torch.testing.assert_close(merged.delta(path), expected)
        assert merged.modules[path].rank == 2 + 3 + 4
    assert retained_energy(merged) == dict.fromkeys(MODULES, 1.0)


def test_task_arithmetic_applies_lambda(adapters):
    merged = merge(adapters, "task_arithmetic", weights=[1.0, -1.0, 0.5], lambda_=0.4)
    path = "layers.0.down"
    expected = 0.4 * (
        adapters[0].delta(path) - adapters[1].delta(path) + 0.5 * adapters[2].delta(path)
    )
    torch.testing.assert_close(merged.delta(path), expected)


def test_linear_merge_over_the_rank_budget_is_the_best_low_rank_approximation(adapters):
    merged = merge(adapters, "linear", rank=3)
    for path in MODULES:
        target = sum(a.delta(path) for a in adapters) / 3
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(merged.delta(path), best, atol=1e-5, rtol=1e-4)
        energy = float((s[:3] ** 2).sum() / (s**2).sum())
        assert abs(retained_energy(merged)[path] - energy) < 1e-5
        assert merged.modules[path].rank == 3


def test_ties_merge_refactorises_the_merged_delta(adapters):
    full = merge(adapters, "ties", density=0.3, rank=10)  # rank ≥ min(d_out, d_in): exact
    low = merge(adapters, "ties", density=0.3, rank=2)
    for path in MODULES:
        tau = merge_tensors([a.delta(path) for a in adapters], "ties", density=0.3)
        torch.testing.assert_close(full.delta(path), tau, atol=1e-5, rtol=1e-4)
        s = torch.linalg.svdvals(tau)
        assert abs(retained_energy(low)[path] - float((s[:2] ** 2).sum() / (s**2).sum())) < 1e-4
        residual = ((tau - low.delta(path)) ** 2).sum() / (tau**2).sum()
        assert abs(float(residual) - (1 - retained_energy(low)[path])) < 1e-4


def test_default_rank_is_the_largest_source_rank(adapters):
    merged = merge(adapters, "dare_ties", density=0.5)
    assert {m.rank for m in merged.modules.values()} == {4}


def test_model_scope_merges_every_module_against_whole_model_thresholds(adapters):
    merged = merge(adapters, "ties", density=0.2, scope="model", rank=10)
    model = {p: [a.delta(p) for a in adapters] for p in MODULES}
    expected = merge_tensors(model, "ties", density=0.2, scope="model")
    for path in MODULES:
        torch.testing.assert_close(merged.delta(path), expected[path], atol=1e-5, rtol=1e-4)


def test_merge_report_travels_with_the_adapter(adapters):
    merged = merge(adapters, "pcb", weights=[1.0, 1.1, 0.9], rank=2, ratio=0.2, name="mix")
    report = merged.metadata["merge"]
    assert report["method"] == "pcb" and report["sources"] == ["a", "b", "c"]
    assert report["params"] == {"ratio": 0.2, "clip": 1e-4, "scope": "model", "lambda_": 1.0}
    assert report["weights"] == pytest.approx([1.0, 1.1, 0.9])
    assert 0 < report["min_retained_energy"] < 1
    restored = LoraAdapter.from_bytes(merged.to_bytes(), name="mix")
    assert restored.metadata == merged.metadata
    assert merged.name == "mix" and merged.base_model == adapters[0].base_model
    assert not merged.use_rslora


def test_output_keeps_the_factor_dtype(make_adapter):
    halves = [make_adapter(n, i, MODULES) for i, n in enumerate("ab")]
    for adapter in halves:
        for module in adapter.modules.values():
            module.A, module.B = module.A.bfloat16(), module.B.bfloat16()
    merged = merge(halves, "ties")
    assert {m.A.dtype for m in merged.modules.values()} == {torch.bfloat16}


def test_adapters_for_different_base_models_are_refused(adapters, make_adapter):
    other = make_adapter("x", 9, MODULES, base=BaseModelRef("other-model", "0" * 64))
    with pytest.raises(ValidationError, match="different base models: 'a' is for 'tiny-llama'"):
        merge([adapters[0], other], "linear")


def test_mismatched_module_sets_are_named(adapters, make_adapter):
    fewer = make_adapter("x", 9, {"layers.0.q": (12, 10)})
    with pytest.raises(
        ValidationError, match=r"'x' adapts other modules .* missing \['layers.0.down'\]"
    ):
        merge([adapters[0], fewer], "linear")
    reshaped = make_adapter("y", 9, {"layers.0.q": (12, 10), "layers.0.down": (10, 8)})
    with pytest.raises(ValidationError, match=r"module 'layers.0.down': ΔW is \[10, 8\]"):
        merge([adapters[0], reshaped], "linear")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0, 2.0]}, "got 2 weights for 3 adapters"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"density": 2.0}, "density must be in"),
        ({"name": "../evil"}, "invalid adapter name"),
    ],
)
def test_bad_arguments_are_refused(adapters, kwargs, message):
    with pytest.raises(ValueError, match=message):
        merge(adapters, "ties", **kwargs)


def test_no_adapters_is_an_error():
    with pytest.raises(ValidationError, match="no adapters"):
        merge([], "linear")
