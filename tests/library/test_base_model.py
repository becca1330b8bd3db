"""Base-model loading and fingerprints; one end-to-end test on the real SmolLM2-135M."""

from __future__ import annotations

import copy

import pytest
import torch

from quiver.library import BaseModelSpec, Library, fingerprint, load_base_model
from quiver.library.synthetic import random_adapter


def test_fingerprint_ignores_dtype_but_not_values(tiny_model):
    fp32 = copy.deepcopy(tiny_model)
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    for m in (fp32, bf16):
        m.__dict__.pop("_quiver_fingerprint", None)
    assert fingerprint(fp32) == fingerprint(bf16)
    changed = copy.deepcopy(tiny_model)
    changed.__dict__.pop("_quiver_fingerprint", None)
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight[3, 4] += 0.5
    assert fingerprint(changed) != fingerprint(fp32)


def test_spec_lists_every_linear_with_its_shape(tiny_spec):
    assert tiny_spec.linears["model.layers.0.self_attn.k_proj"] == (16, 32)  # GQA: 2 kv heads of 8
    assert tiny_spec.linears["model.layers.1.mlp.down_proj"] == (32, 64)
    assert BaseModelSpec.from_json(tiny_spec.to_json()) == tiny_spec


def test_load_local_directory_and_unknown_name(tiny_model_dir, tmp_path):
    model, tok = load_base_model(tiny_model_dir, tokenizer=False)
    assert tok is None and model.config.hidden_size == 32 and not model.training
    with pytest.raises(FileNotFoundError, match="neither a known model name \\(smollm2-135m\\) nor a directory"):
        load_base_model(tmp_path / "missing")


@pytest.mark.real_model
def test_real_smollm2_load_fingerprint_and_register(tmp_path):
    model, tok = load_base_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.padding_side == "left" and tok.pad_token is not None
    fp = fingerprint(model)
    model2, _ = load_base_model("smollm2-135m", tokenizer=False)  # from the cache
    assert model2._quiver_fingerprint == fp
    model2.__dict__.pop("_quiver_fingerprint")
    assert fingerprint(model2) == fp  # the stored fingerprint is the weights' real one
    spec = BaseModelSpec.from_model(model)
    with Library.open(tmp_path / "lib", base_model=spec) as lib:
        ad = random_adapter(spec, "smol", rank=8, seed=0)
        rec = lib.add(ad, description="a random adapter for SmolLM2")
        assert rec.n_modules == 30 * 7 and rec.base_fingerprint == fp
        got = lib.get("smol")
        path = "model.layers.29.mlp.down_proj"
        assert got.delta(path).shape == model.get_submodule(path).weight.shape
        assert torch.equal(got.delta(path), ad.delta(path))
        ids = tok(["The capital of France is"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 3
