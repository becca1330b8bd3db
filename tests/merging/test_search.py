"""PCB's coefficient search with nevergrad (optional dependency)."""

import pytest
import torch

from quiver.library.errors import ValidationError
from quiver.merging import PcbParts, merge_tensors, search_coefficients, search_pcb_coefficients, task_vectors

pytest.importorskip("nevergrad")
pytestmark = pytest.mark.filterwarnings("ignore:COBYLA:UserWarning")  # nevergrad → scipy noise

TARGET = [1.2, 0.9, 1.05]


@pytest.fixture(scope="module")
def model() -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {"a": [torch.randn(20, 10, generator=g) for _ in range(3)],
            "b": [torch.randn(30, generator=g) for _ in range(3)]}  # fmt: skip


def test_search_recovers_the_coefficients_of_a_known_optimum(model):
    target = merge_tensors(model, "pcb", TARGET, ratio=0.3)

    def evaluate(merged):  # a stand-in for validation accuracy: closeness to the target
        return -sum(float(((merged[k] - target[k]) ** 2).sum()) for k in merged)

    result = search_pcb_coefficients(model, evaluate, ratio=0.3, budget=120)
    assert result.lambdas == pytest.approx(TARGET, abs=0.02)
    assert result.score > -1e-4 and result.evaluations == 121
    # the search's fast recombination is the pipeline's PCB merge with those weights
    merged = merge_tensors(model, "pcb", result.lambdas, ratio=0.3)
    assert result.score == pytest.approx(evaluate(merged), abs=1e-6)


def test_batched_search_depends_only_on_the_scores(model):
    """Candidates proposed four at a time and scored in any order (as parallel workers would)
    give the result of scoring them one after another in this process."""
    target = merge_tensors(model, "pcb", TARGET, ratio=0.3)
    parts = PcbParts(model, ratio=0.3)

    def score(lam):
        merged = parts.merged(lam)
        return -sum(float(((merged[k] - target[k]) ** 2).sum()) for k in merged)

    seen = []

    def shuffled(cands):  # scored last-first, as workers finishing out of order would
        seen.append(len(cands))
        return [s for s in reversed([score(c) for c in reversed(cands)])]

    local = search_pcb_coefficients(model, lambda m: -sum(float(((m[k] - target[k]) ** 2).sum()) for k in m),
                                    ratio=0.3, budget=120, batch=4)
    remote = search_coefficients(parts.count, shuffled, budget=120, batch=4)
    assert remote.lambdas == local.lambdas and remote.score == pytest.approx(local.score)
    assert seen[:-1] == [4] * 30 and seen[-1] == 1  # 30 rounds of 4, then the recommendation
    assert remote.lambdas == pytest.approx(TARGET, abs=0.05)
    with pytest.raises(ValidationError, match="2 coefficients for 3 sources"):
        parts.merged([1.0, 1.0])


def test_search_stays_within_the_bounds(model):
    result = search_pcb_coefficients(
        model, lambda m: float(m["b"].sum()), ratio=0.3, bounds=(0.9, 1.1), budget=30
    )
    assert all(0.9 <= lam <= 1.1 for lam in result.lambdas)


def test_task_vectors_of_adapters(make_adapter):
    modules = {"q": (6, 4)}
    adapters = [make_adapter(n, i, modules) for i, n in enumerate("ab")]
    tvs = task_vectors(adapters)
    assert list(tvs) == ["q"] and torch.equal(tvs["q"][1], adapters[1].delta("q"))


def test_bad_search_settings_are_refused(model):
    with pytest.raises(ValidationError, match="unknown nevergrad optimizer"):
        search_pcb_coefficients(model, lambda m: 0.0, optimizer="Nope")
    with pytest.raises(ValidationError, match="lower < upper"):
        search_pcb_coefficients(model, lambda m: 0.0, bounds=(1.3, 0.8))
    with pytest.raises(ValidationError, match="batch must be a positive integer"):
        search_coefficients(3, lambda c: [0.0] * len(c), batch=0)
