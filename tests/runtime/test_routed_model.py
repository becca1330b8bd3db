"""RoutedModel: exact against merged weights, mixed batches, generate, capacity, traces, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from quiver import RoutedModel
from quiver.library import ValidationError
from quiver.routing import Arrow, Fixed, Single, Uniform
from quiver.runtime import CapacityError

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127], [7, 7, 1, 2, 90, 33, 45]])


def merged_model(model, lib, weights):
    """The reference: the base model with Σ w_i ΔW_i added to its weights."""
    m = copy.deepcopy(model)
    for name, w in weights.items():
        ad = lib.get(name)
        for path in ad.modules:
            m.get_submodule(path).weight.data += w * ad.delta(path)
    return m


@torch.no_grad()
@pytest.mark.parametrize("router, weights", [
    (Single("a1"), {"a1": 1.0}),
    (Fixed({"a0": 0.2, "a3": 0.5, "a5": 0.3}), {"a0": 0.2, "a3": 0.5, "a5": 0.3}),
    (Uniform(["a2", "a4"]), {"a2": 0.5, "a4": 0.5}),
], ids=["single", "fixed", "uniform"])
def test_static_routers_equal_merged_weights(tiny_model, lib6, router, weights):
    rm = RoutedModel(copy.deepcopy(tiny_model), lib6, router=router)
    want = merged_model(tiny_model, lib6, weights)(IDS).logits
    torch.testing.assert_close(rm(IDS).logits, want, atol=1e-5, rtol=0)


def test_logits_without_no_grad_and_unwrap(tiny_model, lib6):
    rm = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Single("a0"))
    out = rm(IDS).logits  # grad mode on, as in a plain `rm(input_ids).logits`
    torch.testing.assert_close(out.detach(), merged_model(tiny_model, lib6, {"a0": 1})(IDS).logits, atol=1e-5, rtol=0)
    bare = rm.unwrap()
    torch.testing.assert_close(bare(IDS).logits, tiny_model(IDS).logits)


@torch.no_grad()
def test_routers_given_to_the_wrapped_model_are_refused(tiny_model, lib6):
    """``rm.model(ids, routers=...)`` would reach the transformers model, which ignores unknown
    keyword arguments: every row would route by the default router. It is an error instead."""
    rm = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=2))
    for kw in ({"routers": [Single("a1")] * 2}, {"request_ids": torch.zeros(2, 7, dtype=torch.long)}):
        with pytest.raises(TypeError, match="goes to the RoutedModel"):
            rm.model(IDS, **kw)
    assert rm._engine.plan is None  # nothing left half-begun
    torch.testing.assert_close(rm(IDS, routers=[Single("a1")] * 2).logits,
                               merged_model(tiny_model, lib6, {"a1": 1.0})(IDS).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_mixed_batch_generation_equals_each_request_alone(tiny_model, lib6):
    # Three left-padded requests, three routers: Arrow over the library, one adapter, fixed weights.
    prompts = [[5, 9, 13, 17, 21], [8, 16, 24], [40, 41, 42, 43]]
    routers = [Arrow(top_k=2), Single("a4"), Fixed({"a0": 0.5, "a1": 0.25, "a2": 0.25})]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    rm = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=2))
    out = rm.generate(input_ids=ids, attention_mask=mask, routers=routers, max_new_tokens=6,
                      do_sample=False, pad_token_id=0)
    for i, (p, r) in enumerate(zip(prompts, routers)):
        alone = RoutedModel(copy.deepcopy(tiny_model), lib6, router=r)
        single = alone.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out[i, width:].tolist() == single[0, len(p):].tolist(), f"request {i}"
    # and the single-adapter request equals the merged-weight model's greedy continuation
    merged = merged_model(tiny_model, lib6, {"a4": 1.0})
    ref = merged.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out[1, width:].tolist() == ref[0, 3:].tolist()


@torch.no_grad()
def test_kv_cache_and_sampling_work_unchanged(tiny_model, lib6):
    rm = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=2))
    cached = rm.generate(input_ids=IDS[:1], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = rm.generate(input_ids=IDS[:1], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    torch.manual_seed(0)
    s1 = rm.generate(input_ids=IDS, max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(0)
    s2 = rm.generate(input_ids=IDS, max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(s1, s2) and s1.shape == (2, 12)


@torch.no_grad()
def test_capacity_evicts_lru_between_steps_and_keeps_results(tiny_model, lib6):
    full = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=1))
    small = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=1), capacity=2)
    for names in (["a0", "a1"], ["a2", "a3"], ["a0", "a4"]):  # each step fits; the bank turns over
        r = Fixed({names[0]: 0.7, names[1]: 0.3})
        torch.testing.assert_close(small(IDS, routers=[r]).logits, full(IDS, routers=[r]).logits, atol=1e-5, rtol=0)
    assert small.bank.loads > 2 and len([k for k in small.bank.keys if k]) == 2


@torch.no_grad()
def test_over_capacity_router_loads_what_it_selects_pinned_for_the_step(tiny_model, lib6):
    """Arrow over 6 adapters with a smaller bank: each step loads the adapters its tokens select
    (in every module), keeps them for the whole step, and equals the unbounded model; one
    adapter fewer than the step selects is a clear error, never a wrong result."""
    ids = IDS[:1, :1]
    full = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=1))
    with full.tracing() as tr:
        want = full(ids).logits
    used = {a for tokens in tr.per_token().values() for slots in tokens for a, _ in slots}
    assert 1 < len(used) < 6, used
    fits = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=1), capacity=len(used))
    torch.testing.assert_close(fits(ids).logits, want, atol=1e-5, rtol=0)
    tight = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=1), capacity=len(used) - 1)
    with pytest.raises(CapacityError, match=rf"needs {len(used)} adapters resident at once, more than the bank "
                                            rf"capacity {len(used) - 1}"):
        tight(ids)
    assert not tight.bank.pinned  # the failed step released its pins


@torch.no_grad()
def test_merge_before_mode_runs_in_the_model(tiny_model, lib6):
    after = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=2, adapters=["a0", "a3"]))
    before = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=2, adapters=["a0", "a3"], mode="merge-before"))
    one = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=1, adapters=["a0", "a3"], mode="merge-before"))
    one_after = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=1, adapters=["a0", "a3"]))
    assert (after(IDS).logits - before(IDS).logits).abs().max() > 1e-4
    torch.testing.assert_close(one(IDS).logits, one_after(IDS).logits, atol=1e-5, rtol=0)  # k=1: same thing


@torch.no_grad()
def test_trace_json_and_heatmap(tiny_model, lib6, tmp_path):
    rm = RoutedModel(copy.deepcopy(tiny_model), lib6, router=Arrow(top_k=2))
    with rm.tracing() as tr:
        rm.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    per = tr.per_token()
    assert len(per["model.layers.0.self_attn.q_proj"]) == 7 + 2  # prefill + 2 steps (the 3rd token needs none)
    for toks in per.values():
        for pairs in toks:
            assert len(pairs) == 2 and abs(sum(w for _, w in pairs) - 1) < 1e-5
    tr.to_json(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    assert set(data["modules"]) == set(per)
    names, layers, top = tr.top_adapters()
    assert top.shape == (9, 2) and layers == [0, 1] and set(names) <= {f"a{i}" for i in range(6)}
    tr.heatmap(tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert abs(sum(tr.adapter_share().values()) - 1) < 1e-6


def test_wrong_base_model_and_unsupported_layers(tiny_model, lib6):
    other = copy.deepcopy(tiny_model)
    other.__dict__.pop("_quiver_fingerprint", None)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(1.0)
    with pytest.raises(ValidationError, match="differs from the library's base model 'tiny-llama'"):
        RoutedModel(other, lib6)

    class MyLinear(nn.Linear):
        pass

    odd = copy.deepcopy(tiny_model)
    q = odd.model.layers[1].self_attn.q_proj
    odd.model.layers[1].self_attn.q_proj = MyLinear(q.in_features, q.out_features, bias=False)
    odd.model.layers[1].self_attn.q_proj.weight = q.weight
    with pytest.raises(TypeError, match=r"model\.layers\.1\.self_attn\.q_proj is a MyLinear; Quiver adapts torch\.nn\.Linear"):
        RoutedModel(odd, lib6)
    with pytest.raises(LookupError, match=r"adapter\(s\) not in the library .*\['nope'\]"):
        RoutedModel(copy.deepcopy(tiny_model), lib6, adapters=["a0", "nope"])
