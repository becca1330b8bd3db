"""LoraBank construction and the per-batch routing metadata."""

from __future__ import annotations

import pytest
import torch

from quiver.kernels import LoraBank, build_meta, mixture_lora


def test_from_factors_pads_ranks_and_folds_scaling():
    a0, b0 = torch.randn(2, 5), torch.randn(3, 2)
    a1, b1 = torch.randn(4, 5), torch.randn(3, 4)
    bank = LoraBank.from_factors([(a0, b0), (a1, b1)], scalings=[0.5, 2.0])
    assert (bank.num_adapters, bank.max_rank, bank.d_in, bank.d_out) == (2, 4, 5, 3)
    assert bank.ranks.dtype == torch.int32 and bank.rank_list == (2, 4)
    torch.testing.assert_close(bank.B[0, :, :2] @ bank.A[0, :2], 0.5 * b0 @ a0)
    torch.testing.assert_close(bank.B[1] @ bank.A[1], 2.0 * b1 @ a1)
    assert not bank.A[0, 2:].any() and not bank.B[0, :, 2:].any()
    a_t, b_t = bank.rank_views[0]
    assert a_t.shape == (5, 2) and b_t.shape == (2, 3) and a_t.data_ptr() == bank.A.data_ptr()


def test_from_factors_casts_dtype():
    bank = LoraBank.from_factors([(torch.randn(2, 5), torch.randn(3, 2))], [3.0], dtype=torch.bfloat16)
    assert bank.A.dtype == bank.B.dtype == torch.bfloat16 and bank.to(dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("factors, match", [
    ([], "at least one"),
    ([(torch.randn(2, 5), torch.randn(3, 2)), (torch.randn(2, 6), torch.randn(3, 2))], "adapter 1"),
    ([(torch.randn(2, 5), torch.randn(3, 3))], "adapter 0"),
])
def test_from_factors_rejects_mismatched_factors(factors, match):
    with pytest.raises(ValueError, match=match):
        LoraBank.from_factors(factors)


def test_bank_rejects_inconsistent_tensors():
    A, B = torch.zeros(2, 4, 5), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="disagree"):
        LoraBank(A, torch.zeros(2, 3, 5), torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        LoraBank(A, B, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        LoraBank(A, B, torch.tensor([1, 5], dtype=torch.int32))


def test_meta_groups_pairs_by_adapter_stably():
    indices = torch.tensor([[2, 0], [-1, 2], [0, 0], [-1, -1], [1, 2]], dtype=torch.int32)
    weights = torch.arange(10, dtype=torch.float32).reshape(5, 2) / 10
    meta = build_meta(indices, weights, num_adapters=4)
    assert (meta.num_tokens, meta.top_k, meta.num_adapters, meta.num_pairs) == (5, 2, 4, 7)
    # flat slots p = t*k + j: adapter 0 <- 1, 4, 5; adapter 1 <- 8; adapter 2 <- 0, 3, 9
    assert meta.pair_ids.tolist() == [1, 4, 5, 8, 0, 3, 9]
    assert meta.token_ids.tolist() == [0, 2, 2, 4, 0, 1, 4]
    torch.testing.assert_close(meta.pair_weights, torch.tensor([1, 4, 5, 8, 0, 3, 9]) / 10)
    assert meta.counts.tolist() == [3, 1, 3, 0] and meta.offsets.tolist() == [0, 3, 4, 7, 7]
    assert meta.active == (0, 1, 2) and meta.active_counts == (3, 1, 3) and meta.max_count == 3
    assert meta.active_adapters.tolist() == [0, 1, 2]
    assert meta.slot_adapters.tolist() == indices.reshape(-1).tolist()


def test_meta_of_an_empty_batch():
    meta = build_meta(torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3), num_adapters=5)
    assert meta.num_pairs == 0 and meta.max_count == 0 and meta.active == ()
    assert meta.offsets.tolist() == [0] * 6


@pytest.mark.parametrize("bad", [4, -2])
def test_meta_rejects_out_of_range_indices(bad):
    with pytest.raises(ValueError, match=r"outside \[-1, 4\)"):
        build_meta(torch.tensor([[0, bad]]), torch.ones(1, 2), num_adapters=4)


def test_one_meta_serves_every_module_sharing_the_decision(case_factory):
    """q_proj and k_proj (different d_out) under one decision: one meta, same answers."""
    q = case_factory(64, 576, 576, [8] * 6, 2, seed=1)
    kv = case_factory(64, 576, 192, [4, 8, 16] * 2, 2, seed=2)
    meta = build_meta(q.indices, q.weights, num_adapters=6)
    for bank in (q.bank, kv.bank):
        shared = mixture_lora(q.x, bank, q.indices, q.weights, meta=meta, backend="grouped")
        torch.testing.assert_close(shared, mixture_lora(q.x, bank, q.indices, q.weights, backend="reference"),
                                   atol=1e-5, rtol=1e-5)
