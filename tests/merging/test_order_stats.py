"""Order statistics of streamed chunks against torch.kthvalue over the concatenated rows."""

import pytest
import torch

from quiver.merging.order_stats import kth_smallest


def _hard_rows(numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, numel, generator=g)
    x[0, :100] = 0.0  # many exact zeros
    x[1, 5:300] = x[1, 5]  # a long run of one value
    x[2, :3] = -0.0
    x[2, 3], x[1, 7] = float("inf"), -float("inf")
    x[0, 100:110] = 1e-40  # subnormals
    return x


def _expected(x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    return torch.stack([x.kthvalue(r + 1, dim=1).values for r in ranks], dim=1)


def _chunks(x: torch.Tensor, cuts: list[int]):
    bounds = [0, *cuts, x.shape[1]]
    return lambda: (x[:, a:b] for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("numel", [1000, 300_000])
def test_chunks_give_kthvalue_of_the_concatenation(numel):
    x = _hard_rows(numel)
    ranks = [0, 1, 17, 99, 100, numel // 2, int(0.8 * numel), numel - 2, numel - 1]
    got = kth_smallest(_chunks(x, [300, 301, numel // 3]), lambda n: ranks)
    assert torch.equal(got, _expected(x, ranks))


def test_values_are_applied_to_the_chunks():
    x = _hard_rows(200_000)
    got = kth_smallest(_chunks(x, [70_000]), lambda n: [n // 5, n - 1], values=torch.abs)
    assert torch.equal(got, _expected(x.abs(), [40_000, 199_999]))


def test_ranks_are_computed_from_the_total_length():
    x = _hard_rows(1000)
    seen = []

    def ranks(numel):
        seen.append(numel)
        return [numel // 2, numel - 1]

    got = kth_smallest(_chunks(x, [10]), ranks)
    assert seen == [1000]
    assert torch.equal(got, _expected(x, [500, 999]))


def test_out_of_range_rank_is_an_error():
    with pytest.raises(ValueError, match="out of range"):
        kth_smallest(lambda: iter([torch.zeros(2, 5)]), lambda numel: [numel])
