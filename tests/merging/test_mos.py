"""MoS (Mixture of Shards): shard-pool adapters, training, library storage, pool compression."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver.library.synthetic import random_adapter, smollm2_spec
from quiver.training import MoSModel  # the MoS training wrapper (runtime's wrapping path)
from quiver.merging.mos import (
    CompressConfig,
    MoSAdapter,
    MoSConfig,
    compress,
    expand,
    load_mos,
    load_pools,
    register_materialized,
    save_mos,
    save_pools,
)

QV = ("q_proj", "v_proj")


def _randomize(mos: MoSAdapter, seed: int = 0) -> MoSAdapter:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mos.pools.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return mos


# -- config and layout -------------------------------------------------------------------------
def test_config_errors(tiny_model):
    with pytest.raises(ValueError, match="exactly one"):
        MoSConfig(shards_per_vector=2, shard_length=8)
    with pytest.raises(ValueError, match="does not divide dimension 32"):
        MoSAdapter.for_model(tiny_model, MoSConfig(shards_per_vector=3))
    with pytest.raises(ValueError, match="shard_length 5 does not divide"):
        MoSAdapter.for_model(tiny_model, MoSConfig(shards_per_vector=None, shard_length=5))
    with pytest.raises(ValueError, match="no nn.Linear"):
        MoSAdapter.for_model(tiny_model, targets=("nope_proj",))
    with pytest.raises(ValueError, match="different shapes"):
        MoSAdapter({"l.0.x_proj": (32, 32), "l.1.x_proj": (16, 32)})


def test_differentiation_strategies(tiny_model):
    """Subset selection, pair dissociation, vector sharding and privatisation, read off the indices."""
    cfg = MoSConfig(rank=8, shards_per_vector=2, budget=1 / 4, private_fraction=0.5, seed=3)
    mos = MoSAdapter.for_model(tiny_model, cfg, targets=QV)
    L, r, l = 2, 8, 2
    n_total = round(cfg.budget * L * r * l)  # 8 shards per pool
    n_priv = 2  # floor(0.5 · 8 / 2) per layer
    n_shared = n_total - L * n_priv
    for proj in QV:
        ia, ib = mos.index(proj, "A"), mos.index(proj, "B")
        assert ia.shape == ib.shape == (L, r, l)  # vector sharding: l shard indices per rank vector
        assert mos.pools[f"{proj}_A"].shape == (n_total, 32 // l)
        assert not torch.equal(ia, ib)  # pair dissociation
        for idx in (ia, ib):
            for k in range(L):  # privatisation: layer k, and only layer k, uses its private rows
                own = set(range(n_shared + k * n_priv, n_shared + (k + 1) * n_priv))
                used = set(idx[k].flatten().tolist())
                assert own <= used
                assert not (used - own) & set(range(n_shared, n_total))
            assert not torch.equal(idx[0], idx[1])  # subset selection: layers differ
    tied = MoSAdapter.for_model(tiny_model, MoSConfig(pair_dissociation=False), targets=QV)
    assert torch.equal(tied.index("q_proj", "A"), tied.index("q_proj", "B"))
    # shard_length variant: l = d / s per factor (v_proj B has d_out 16 -> 2 shards of 8)
    by_len = MoSAdapter.for_model(tiny_model, MoSConfig(shards_per_vector=None, shard_length=8), targets=QV)
    assert by_len.index("q_proj", "A").shape[-1] == 4 and by_len.index("v_proj", "B").shape[-1] == 2


def test_parameter_ratio_is_one_eighth_of_lora(tiny_model):
    """Default config: pool size round(L·r·l / 8) -> exactly 1/8 of LoRA's parameters at rank 8."""
    mos = MoSAdapter.for_model(tiny_model, MoSConfig(), targets=QV)
    lora = sum(
        8 * (m.out_features + m.in_features) for n, m in tiny_model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in QV)
    assert mos.lora_num_parameters() == lora
    trainable = sum(p.numel() for p in mos.parameters() if p.requires_grad)
    assert trainable == mos.num_parameters() == lora // 8
    # the real model's shapes, all seven projections: still 1/8 (30 layers · 16 slots / 8 is whole)
    big = MoSAdapter(smollm2_spec().linears, MoSConfig())
    assert big.num_parameters() / big.lora_num_parameters() == pytest.approx(1 / 8)


# -- forward, training -------------------------------------------------------------------------
def test_wrapped_forward_equals_merged_weights(tiny_model):
    model = copy.deepcopy(tiny_model)
    wrapped = MoSModel(model, MoSConfig(private_fraction=0.5), targets=QV)
    _randomize(wrapped.mos)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
        dense = wrapped.mos.materialize()
        merged = copy.deepcopy(tiny_model)
        mods = dict(merged.named_modules())
        for path in dense.modules:
            mods[path].weight += dense.delta(path)
        want = merged(input_ids=ids).logits
        base = tiny_model(input_ids=ids).logits
    assert (got - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    wrapped.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_training_reduces_loss(tiny_model, tiny_spec):
    """A few dozen AdamW steps fit a teacher (the base plus a dense random rank-8 LoRA on q/v)."""
    teacher = copy.deepcopy(tiny_model)
    target = random_adapter(tiny_spec, "teacher", rank=8, targets=QV, std=0.3, seed=0)
    mods = dict(teacher.named_modules())
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for path in target.modules:
            mods[path].weight += target.delta(path)
        want = teacher(input_ids=ids).logits  # [4, 12, vocab]
    wrapped = MoSModel(copy.deepcopy(tiny_model), MoSConfig(), targets=QV)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    assert params and all(any(p is q for q in wrapped.mos.pools.values()) for p in params)
    opt = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(wrapped(input_ids=ids).logits, want)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


# -- library -----------------------------------------------------------------------------------
def test_save_load_roundtrip_and_register(lib, tiny_model):
    mos = _randomize(MoSAdapter.for_model(tiny_model, MoSConfig(private_fraction=0.5, seed=5), targets=QV))
    assert save_mos(lib, "mos-a", mos) == 1
    back = load_mos(lib, "mos-a")
    assert back.config == mos.config and back.base_model == mos.base_model
    for key, pool in mos.pools.items():
        assert torch.equal(back.pools[key], pool)
        proj, f = key.rsplit("_", 1)
        assert torch.equal(back.index(proj, f), mos.index(proj, f))
    tensors, _, _ = lib.get_artifact("mos", "mos-a")
    assert tensors["index.q_proj.A"].dtype == torch.int16  # compact indices
    rec = register_materialized(lib, "mos-b", mos)
    assert rec.name == "mos-b" and "mos-b" in lib
    dense = lib.get("mos-b")
    for path, m in mos.materialize().modules.items():
        assert torch.equal(dense.modules[path].A, m.A) and torch.equal(dense.modules[path].B, m.B)


# -- compression -------------------------------------------------------------------------------
def _pool_built_adapters(tiny_model, k: int = 3):
    """k dense adapters whose factors are gathers from one shared pool (different indices)."""
    cfg = dict(rank=8, shards_per_vector=2, budget=1 / 2, private_fraction=0.0)  # 16 shards per pool
    shared = _randomize(MoSAdapter.for_model(tiny_model, MoSConfig(**cfg, seed=0), targets=QV))
    adapters = []
    for i in range(k):
        mos = MoSAdapter.for_model(tiny_model, MoSConfig(**cfg, seed=100 + i), targets=QV)
        mos.pools.load_state_dict(shared.pools.state_dict())
        adapters.append(mos.materialize(f"task-{i}"))
    return adapters


def test_compress_recovers_pool_built_adapters(lib, tiny_model):
    adapters = _pool_built_adapters(tiny_model)
    pools, report = compress(adapters, CompressConfig(shards_per_vector=2, pool_size=16))
    assert report["compression_ratio"] > 4  # 3 × 4 modules of rank-8 factors vs 4 pools of 16 shards
    assert set(report["adapters"]) == {"task-0", "task-1", "task-2"}
    for errs in report["adapters"].values():
        assert errs["delta_error"] < 1e-5 and errs["A_error"] < 1e-5 and errs["B_error"] < 1e-5
    for i, a in enumerate(adapters):
        back = expand(pools, i)
        assert back.name == a.name and set(back.modules) == set(a.modules)
        lib.add(back)
    assert len(lib) == 3
    save_pools(lib, "pools", pools)
    again = load_pools(lib, "pools")
    assert lib.artifacts("mos")[0]["adapters"] == ["task-0", "task-1", "task-2"]
    for i, a in enumerate(adapters):
        x, y = expand(pools, i), expand(again, i)
        assert all(torch.equal(x.modules[p].A, y.modules[p].A) and torch.equal(x.modules[p].B, y.modules[p].B)
                   and x.modules[p].alpha == y.modules[p].alpha for p in x.modules)
    with pytest.raises(ValueError, match="not an adapter"):
        load_mos(lib, "pools")


def test_compress_random_adapters_reports_larger_error(lib, tiny_spec):
    adapters = [random_adapter(tiny_spec, f"r{i}", rank=8, targets=QV, seed=i) for i in range(3)]
    pools, report = compress(adapters, CompressConfig(budget=1 / 8))
    assert report["compression_ratio"] > 4
    for errs in report["adapters"].values():
        assert 0.3 < errs["delta_error"] < 1.5 and 0.3 < errs["A_error"] < 1.5
    more, report_more = compress(adapters, CompressConfig(budget=1 / 2))  # bigger pools fit better
    assert report_more["compression_ratio"] < report["compression_ratio"]
    assert report_more["adapters"]["r0"]["delta_error"] < report["adapters"]["r0"]["delta_error"]
    lib.add(expand(pools, 0, name="r0-mos"))
    assert "r0-mos" in lib


def test_compress_rejects_mismatched_adapters(tiny_spec):
    a = random_adapter(tiny_spec, "a", rank=8, targets=QV)
    with pytest.raises(ValueError, match="one rank"):
        compress([a, random_adapter(tiny_spec, "b", rank=4, targets=QV)])
    with pytest.raises(ValueError, match="different modules"):
        compress([a, random_adapter(tiny_spec, "c", rank=8, targets=("q_proj",))])
    with pytest.raises(ValueError, match="does not divide"):
        compress([a], CompressConfig(shards_per_vector=3))
    with pytest.raises(ValueError, match="at least one"):
        compress([])
