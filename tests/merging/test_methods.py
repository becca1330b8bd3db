"""Each merge method on small hand-computed examples, its options, and parameter validation."""

import math

import pytest
import torch

from quiver.library.errors import ValidationError
from quiver.merging import METHODS, build, merge_tensors

T = torch.tensor

# three task vectors of 4 entries; at density 0.5 each keeps its two largest magnitudes:
#   [4, -3, 0, 0], [-2, 0, 3, 0], [0, 2, 0, 5]
TAUS = [T([4.0, -3.0, 1.0, 0.5]), T([-2.0, -1.0, 3.0, 0.25]), T([-1.0, 2.0, -0.5, 5.0])]


def test_registry_lists_every_method():
    assert set(METHODS) == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "pcb",
        "magnitude_prune",
    }
    for name, builder in METHODS.items():
        assert build(name).method == name
        assert "τ" in builder.__doc__  # every method states its formula


def test_linear_is_a_weighted_average():
    taus, w = [T([1.0, 2.0]), T([3.0, -2.0])], [1.0, 3.0]
    assert torch.equal(merge_tensors(taus, "linear", w), T([2.5, -1.0]))
    assert torch.equal(merge_tensors(taus, "linear", w, normalize=False), T([10.0, -4.0]))


def test_task_arithmetic_is_a_weighted_sum_and_lambda_is_left_to_the_caller():
    taus, w = [T([1.0, 2.0]), T([3.0, -2.0])], [1.0, 3.0]
    assert torch.equal(merge_tensors(taus, "task_arithmetic", w, lambda_=0.5), T([10.0, -4.0]))
    assert build("task_arithmetic", lambda_=0.5).lambda_ == 0.5


def test_ties_trims_elects_the_total_sign_and_averages_the_agreeing_entries():
    # trimmed sum [2, -1, 3, 5] → signs [+, -, +, +]; entry 0 keeps only 4, entry 1 only -3
    assert torch.equal(merge_tensors(TAUS, "ties", density=0.5), T([4.0, -3.0, 3.0, 5.0]))


def test_ties_frequency_consensus_counts_signs_and_breaks_ties_to_plus():
    # entry 1: one minus (-3) and one plus (2) → +, so 2 survives instead of -3
    out = merge_tensors(TAUS, "ties", density=0.5, consensus="frequency")
    assert torch.equal(out, T([4.0, 2.0, 3.0, 5.0]))


def test_ties_weights_enter_the_vote_and_the_mean():
    # weighted trimmed: [4, -3, 0, 0], [-6, 0, 9, 0], [0, 2, 0, 5]: entry 0 votes minus (-2)
    out = merge_tensors(TAUS, "ties", [1.0, 3.0, 1.0], density=0.5)
    assert torch.equal(out, T([-2.0, -3.0, 3.0, 5.0]))  # -6 / 3 and 9 / 3
    unnormalized = merge_tensors(TAUS, "ties", [1.0, 3.0, 1.0], density=0.5, normalize=False)
    assert torch.equal(unnormalized, T([-6.0, -3.0, 9.0, 5.0]))


def test_ties_keeps_at_least_one_entry_of_a_tiny_tensor():
    out = merge_tensors([T([1.0, -5.0, 2.0])], "ties", density=0.1)
    assert torch.equal(out, T([0.0, -5.0, 0.0]))


def test_magnitude_prune_sums_the_trimmed_vectors():
    out = merge_tensors(TAUS[:2], "magnitude_prune", [1.0, 2.0], density=0.5)
    assert torch.equal(out, T([4.0 - 4.0, -3.0, 6.0, 0.0]))


def test_breadcrumbs_drops_the_top_gamma_and_the_smallest_entries():
    tau = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    out = merge_tensors([tau], "breadcrumbs", density=0.5, gamma=0.1)
    # keep 5 entries after dropping the largest one (10): magnitudes 5..9
    assert torch.equal(out, tau * (tau.abs() >= 5) * (tau.abs() <= 9))


def test_breadcrumbs_keeps_the_top_of_tiny_tensors():
    # ⌊0.01·50⌋ = 0 outliers: nothing is dropped from the top (mergekit < 0.1.5 zeroed it all)
    tau = torch.arange(1.0, 51.0)
    out = merge_tensors([tau], "breadcrumbs", density=0.5, gamma=0.01)
    assert torch.equal(out, tau * (tau > 25))


def test_dare_keeps_entries_with_probability_density_and_rescales_them_exactly():
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) + 3.0  # never 0
    out = merge_tensors([tau], "dare_linear", density=0.7)
    kept = out != 0
    assert torch.equal(out[kept], tau[kept] / 0.7)
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # ~5 standard deviations


def test_dare_is_seeded_per_tensor_name_not_by_call_order():
    g = torch.Generator().manual_seed(1)
    model = {name: [torch.randn(64, generator=g) for _ in range(2)] for name in ("a", "b")}
    forward = merge_tensors(model, "dare_ties", seed=3)
    backward = merge_tensors(dict(reversed(model.items())), "dare_ties", seed=3)
    other_seed = merge_tensors(model, "dare_ties", seed=4)
    assert all(torch.equal(forward[k], backward[k]) for k in model)
    assert not torch.equal(forward["a"], other_seed["a"])
    assert not torch.equal(forward["a"], forward["b"])


def test_dare_ties_elects_signs_after_the_drop():
    taus = [T([2.0, -2.0]), T([-1.0, -1.0])]
    out = merge_tensors(taus, "dare_ties", density=1.0)  # nothing dropped: plain sign election
    assert torch.equal(out, T([2.0, -3.0]))


def _reference_pcb(checks: torch.Tensor, ratio: float, clip: float) -> torch.Tensor:
    """The authors' PCB_merge (pcb-merging.py in duguodong7/pcb-merging), restated: per-row
    sort-based clamp and min-max normalisation of ``checks: [n, d]``."""

    def normalize(x):
        low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - low) / (high - low)

    def clamp(x, min_ratio, max_ratio):
        d = x.shape[1]
        s = x.sort(dim=1).values
        return x.clamp(
            s[:, int(d * min_ratio)][:, None], s[:, int(d * (1 - max_ratio) - 1)][:, None]
        )

    n = checks.shape[0]
    magnitude = clamp(checks.abs(), clip, clip)
    intra = torch.exp(n * normalize(magnitude) ** 2)
    inter = torch.tanh(checks * checks.sum(dim=0))
    scale = normalize(clamp(intra * inter, 1 - ratio, 0))
    return (checks.sign() * magnitude * scale).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)


@pytest.mark.parametrize("clip", [1e-4, 0.01])
def test_pcb_matches_the_authors_code_per_tensor(clip):
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(40, 30, generator=g) for _ in range(3)]
    out = merge_tensors(taus, "pcb", ratio=0.2, clip=clip)
    expected = _reference_pcb(torch.stack(taus).flatten(1), 0.2, clip).view(40, 30)
    torch.testing.assert_close(out, expected)


def test_pcb_over_the_whole_model_matches_the_authors_flattened_model():
    g = torch.Generator().manual_seed(1)
    model = {"a": [torch.randn(20, 10, generator=g) for _ in range(3)],
             "b": [torch.randn(77, generator=g) for _ in range(3)]}  # fmt: skip
    out = merge_tensors(model, "pcb", ratio=0.1, scope="model")
    flat = torch.stack([torch.cat([model["a"][i].flatten(), model["b"][i]]) for i in range(3)])
    expected = _reference_pcb(flat, 0.1, 1e-4)
    torch.testing.assert_close(torch.cat([out["a"].flatten(), out["b"]]), expected)


def test_pcb_worked_example():
    # n = 2, no clipping, ratio 0.5 → each source keeps β > 0 on its single best score
    taus = [T([1.0, -2.0, 3.0, 0.0]), T([1.0, 2.0, 1.0, 4.0])]
    out = merge_tensors(taus, "pcb", weights=[1.0, 2.0], ratio=0.5, clip=0.0)
    total = [2.0, 0.0, 4.0, 4.0]  # Σⱼ τⱼ

    def scores(tau):
        low, high = min(map(abs, tau)), max(map(abs, tau))
        return [math.exp(2 * ((abs(t) - low) / (high - low)) ** 2) * math.tanh(t * s)
                for t, s in zip(tau, total)]  # fmt: skip

    def beta(tau):  # scores clamped at their value of ascending rank ⌊4·0.5⌋ = 2, min-maxed
        s = scores(tau)
        low, high = sorted(s)[2], max(s)
        return [(max(x, low) - low) / (high - low) for x in s]

    b1, b2 = beta(taus[0].tolist()), beta(taus[1].tolist())
    assert [x > 0 for x in b1] == [False, False, True, False]
    assert [x > 0 for x in b2] == [False, False, False, True]
    expected = [(1 * p * t1 + 2 * q * t2) / max(p + q, 1e-12)
                for p, q, t1, t2 in zip(b1, b2, taus[0].tolist(), taus[1].tolist())]  # fmt: skip
    torch.testing.assert_close(out, T(expected))
    assert out.tolist() == [0.0, 0.0, 3.0, 8.0]


def test_model_scope_trims_against_one_threshold_for_the_whole_model():
    # source 0 is large on "a" and tiny on "b": over the model all of its kept entries are in "a"
    g = torch.Generator().manual_seed(2)
    model = {"a": [10 * torch.randn(50, generator=g), torch.randn(50, generator=g)],
             "b": [0.01 * torch.randn(50, generator=g), torch.randn(50, generator=g)]}  # fmt: skip
    per_model = merge_tensors(model, "magnitude_prune", density=0.3, scope="model")
    per_tensor = merge_tensors(model, "magnitude_prune", density=0.3)
    flat = [torch.cat([model["a"][i], model["b"][i]]) for i in range(2)]
    expected = merge_tensors(flat, "magnitude_prune", density=0.3)
    torch.testing.assert_close(torch.cat([per_model["a"], per_model["b"]]), expected)
    assert not torch.equal(per_model["b"], per_tensor["b"])


def test_model_scope_of_a_single_tensor_equals_tensor_scope():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(30, 7, generator=g) for _ in range(3)]
    for method in ("ties", "breadcrumbs", "pcb"):
        model = merge_tensors({"x": taus}, method, scope="model")["x"]
        assert torch.equal(model, merge_tensors(taus, method, scope="tensor"))


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("tie", {}, "valid methods: linear, task_arithmetic, ties"),
        ("ties", {"densty": 0.2}, "its parameters: density, consensus"),
        ("ties", {"density": 0.0}, "density must be in (0, 1]"),
        ("ties", {"density": 1.5}, "density must be in (0, 1]"),
        ("dare_ties", {"density": -0.1}, "density must be in (0, 1]"),
        ("breadcrumbs", {"gamma": 1.0}, "gamma must be in [0, 1)"),
        ("pcb", {"ratio": 0}, "ratio must be in (0, 1]"),
        ("ties", {"consensus": "majority"}, "consensus must be one of ('total', 'frequency')"),
        ("ties", {"scope": "global"}, "scope must be one of ('tensor', 'model')"),
        ("linear", {"normalize": "yes"}, "normalize must be true or false"),
        ("dare_linear", {"seed": -1}, "seed must be a non-negative integer"),
        ("task_arithmetic", {"lambda_": float("nan")}, "lambda_ must be finite"),
    ],
)
def test_invalid_parameters_are_refused_with_the_reason(method, params, message):
    with pytest.raises(ValidationError) as error:
        merge_tensors(TAUS, method, **params)
    assert message in str(error.value)


def test_weights_must_match_the_sources():
    with pytest.raises(ValidationError, match="got 2 weights for 3 tensors"):
        merge_tensors(TAUS, "linear", [1.0, 2.0])


def test_task_vectors_must_share_a_shape():
    with pytest.raises(ValidationError, match="differ in shape"):
        merge_tensors([torch.zeros(3), torch.zeros(4)], "linear")
