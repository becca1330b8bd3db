"""PEFT interop: adapters written by peft itself are imported, exported and reloaded by peft."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from quiver.library import AdapterFormatError, UnsupportedAdapterError

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 3]])


def peft_logits(tiny_model, adapter_dir):
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), adapter_dir).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("lora_kwargs", [
    {},
    {"use_rslora": True},
    {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
     "rank_pattern": {"o_proj": 2, "model.layers.1.mlp.down_proj": 8}, "alpha_pattern": {"v_proj": 3}},
    {"layers_to_transform": [1], "target_modules": ["q_proj", "up_proj"]},
    {"fan_in_fan_out": True},
], ids=["plain", "rslora", "patterns", "layers_to_transform", "fan_in_fan_out"])
def test_peft_roundtrip_gives_identical_logits(lib, tiny_model, peft_adapter_dir, tmp_path, lora_kwargs):
    src = peft_adapter_dir(**lora_kwargs)
    lib.add_peft(src, name="x", description="d")
    out = lib.export_peft("x", tmp_path / "exported")
    base = tiny_model(IDS).logits
    want, got = peft_logits(tiny_model, src), peft_logits(tiny_model, out)
    assert (want - base).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_import_reads_patterns_into_per_module_rank_and_alpha(lib, peft_adapter_dir):
    src = peft_adapter_dir(target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2},
                           alpha_pattern={"model.layers.0.self_attn.q_proj": 5}, use_rslora=True)
    lib.add_peft(src, name="x")
    ad = lib.get("x")
    q0, o1 = ad.modules["model.layers.0.self_attn.q_proj"], ad.modules["model.layers.1.self_attn.o_proj"]
    assert (q0.rank, q0.alpha, o1.rank, o1.alpha) == (4, 5.0, 2, 8.0)
    assert ad.scaling("model.layers.1.self_attn.o_proj") == pytest.approx(8 / 2 ** 0.5)


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("mutate, error, message", [
    (lambda d: _edit_config(d, use_dora=True), UnsupportedAdapterError, r"DoRA \(use_dora=true\) is not supported"),
    (lambda d: _edit_config(d, modules_to_save=["lm_head"]), UnsupportedAdapterError, r"modules_to_save\) is not supported"),
    (lambda d: _edit_config(d, peft_type="IA3"), UnsupportedAdapterError, r"peft_type 'IA3' is not supported; only LORA"),
    (lambda d: (d / "adapter_config.json").unlink(), AdapterFormatError, r"missing adapter_config\.json"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), AdapterFormatError, r"adapter_config\.json: malformed JSON"),
    (lambda d: _edit_config(d, r=8), AdapterFormatError, r"has rank 4x4 in its weights but rank 8"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:300]),
     AdapterFormatError, r"corrupt or truncated safetensors"),
    (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), UnsupportedAdapterError,
     r"pickled weights are never loaded"),
], ids=["dora", "modules_to_save", "ia3", "no_config", "bad_json", "rank_mismatch", "truncated", "bin_only"])
def test_bad_peft_dirs_get_specific_errors(lib, peft_adapter_dir, mutate, error, message):
    src = peft_adapter_dir()
    mutate(src)
    with pytest.raises(error, match=message):
        lib.add_peft(src, name="x")
    assert len(lib) == 0 and list((lib.path / "blobs").glob("*/*")) == []


def test_embedding_lora_weights_are_refused(lib, peft_adapter_dir):
    src = peft_adapter_dir()
    tensors = load_file(src / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)
    save_file(tensors, src / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapterError, match="LoRA on embeddings is not supported"):
        lib.add_peft(src, name="x")


def test_export_refuses_non_empty_directory(lib, peft_adapter_dir, tmp_path):
    lib.add_peft(peft_adapter_dir(), name="x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder that is not a previous export is never replaced
        with pytest.raises(ValueError, match="is not empty and is not a PEFT adapter directory"):
            lib.export_peft("x", tmp_path / "out", overwrite=overwrite)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
