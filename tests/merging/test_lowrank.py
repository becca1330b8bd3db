"""Low-rank factorisations of merged deltas and the energy they report."""

import torch

from quiver.merging.lowrank import concat, truncate_dense, truncate_factored


def _best(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], float((s[:rank] ** 2).sum() / (s**2).sum())


def _factors(seed: int, rank: int, d_out: int = 24, d_in: int = 18):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)


def test_concat_is_the_exact_weighted_sum():
    (a1, b1), (a2, b2) = _factors(0, 2), _factors(1, 3)
    f = concat([a1, a2], [b1, b2], [0.5, -2.0])
    assert f.A.shape == (5, 18) and f.B.shape == (24, 5) and f.energy == 1.0
    torch.testing.assert_close(f.B @ f.A, 0.5 * b1 @ a1 - 2.0 * b2 @ a2)


def test_factored_truncation_is_the_best_rank_r_approximation():
    a, b = _factors(2, 6)
    f = truncate_factored(a, b, rank=3)
    best, energy = _best(b @ a, 3)
    assert f.A.shape == (3, 18) and f.B.shape == (24, 3)
    torch.testing.assert_close(f.B @ f.A, best, atol=1e-4, rtol=1e-4)
    assert abs(f.energy - energy) < 1e-5 and f.energy < 0.99


def test_dense_truncation_reports_exactly_what_it_keeps():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(80, 60, generator=g)  # flat spectrum: the randomized SVD is not exact
    f = truncate_dense(delta, rank=4, generator=torch.Generator().manual_seed(0))
    kept = float(((f.B @ f.A) ** 2).sum() / (delta**2).sum())
    residual = float(((delta - f.B @ f.A) ** 2).sum() / (delta**2).sum())
    assert abs(f.energy - kept) < 1e-5
    assert abs(residual - (1 - f.energy)) < 1e-5  # B A is a projection of ΔW
    assert f.energy <= _best(delta, 4)[1] + 1e-6


def test_dense_truncation_finds_the_top_subspace_of_a_decaying_spectrum():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(96, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(64, 40, generator=g))
    delta = (u * 0.7 ** torch.arange(40.0)) @ v.T
    f = truncate_dense(delta, rank=5, generator=torch.Generator().manual_seed(0))
    best, energy = _best(delta, 5)
    assert abs(f.energy - energy) < 1e-5
    torch.testing.assert_close(f.B @ f.A, best, atol=1e-5, rtol=1e-4)


def test_small_matrices_and_zero_deltas():
    delta = torch.randn(6, 5, generator=torch.Generator().manual_seed(5))
    full = truncate_dense(delta, rank=5, generator=torch.Generator())
    torch.testing.assert_close(full.B @ full.A, delta, atol=1e-5, rtol=1e-5)
    assert abs(full.energy - 1.0) < 1e-6
    zero = truncate_dense(torch.zeros(40, 30), rank=2, generator=torch.Generator())
    assert zero.energy == 1.0 and torch.count_nonzero(zero.B @ zero.A) == 0
