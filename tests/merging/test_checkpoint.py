"""merge_to_checkpoint(): a loadable Hugging Face checkpoint of base + merged delta."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quiver.library.errors import ValidationError
from quiver.merging import checkpoint as checkpoint_module
from quiver.merging import merge_tensors, merge_to_checkpoint

IDS = torch.tensor([[1, 5, 9, 33, 70, 127, 2, 64]])


@pytest.fixture(scope="module")
def base_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.fixture(scope="module")
def adapters(make_adapter, tiny_modules):
    return [make_adapter(f"a{i}", i, tiny_modules, rank=4) for i in range(3)]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _state(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state |= load_file(path / file)
    return state


def test_ties_checkpoint_loads_and_equals_base_plus_merged_delta(
    tiny_llama_dir, base_model, adapters, tmp_path
):
    out = merge_to_checkpoint(
        tiny_llama_dir, adapters, tmp_path / "merged", "ties", [1.0, 0.5, 2.0],
        density=0.3, lambda_=0.8, max_shard_size=20_000,
    )  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(out).eval()

    expected = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        for path in adapters[0].modules:
            tau = merge_tensors(
                [a.delta(path) for a in adapters], "ties", [1.0, 0.5, 2.0], density=0.3
            )
            expected.get_submodule(path).weight += 0.8 * tau
    torch.testing.assert_close(_logits(merged), _logits(expected))
    assert (_logits(merged) - _logits(base_model)).abs().max() > 1e-2  # the delta matters


def test_whole_model_thresholds_span_every_adapted_weight(tiny_llama_dir, adapters, tmp_path):
    out = merge_to_checkpoint(tiny_llama_dir, adapters, tmp_path / "m", "pcb", ratio=0.2)
    state, base = _state(out), load_file(tiny_llama_dir / "model.safetensors")
    model = {f"{p}.weight": [a.delta(p) for a in adapters] for p in adapters[0].modules}
    expected = merge_tensors(model, "pcb", ratio=0.2, scope="model")
    for name, theta in base.items():
        torch.testing.assert_close(state[name], theta + expected.get(name, 0.0))


def test_checkpoint_is_sharded_with_an_index_and_the_side_files(tiny_llama_dir, adapters, tmp_path):
    out = merge_to_checkpoint(
        tiny_llama_dir, adapters, tmp_path / "m", "linear", max_shard_size="20KB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    base = load_file(tiny_llama_dir / "model.safetensors")
    state = _state(out)
    assert set(index["weight_map"]) == set(state) == set(base)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in base.values()
    )
    assert all(f.stat().st_size <= 20_000 + 4096 for f in out.glob("model-*.safetensors"))
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).read_bytes() == (tiny_llama_dir / name).read_bytes()
    assert not (out / "model.safetensors").exists()
    provenance = json.loads((out / "quiver_merge.json").read_text())
    assert provenance["method"] == "linear" and provenance["sources"] == ["a0", "a1", "a2"]
    untouched = "model.embed_tokens.weight"
    assert torch.equal(state[untouched], base[untouched])


def _fine_tune(base_dir, path, seed: int) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' full checkpoint of the tiny base: every tensor moved (bf16 on disk)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.05 * torch.randn(p.shape, generator=g)
    model.to(torch.bfloat16).save_pretrained(path)
    return {k: v.clone() for k, v in load_file(path / "model.safetensors").items()}


def test_full_checkpoints_and_adapters_merge_together(tiny_llama_dir, adapters, tmp_path):
    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to(torch.bfloat16).save_pretrained(
        bf16_base
    )
    base = load_file(bf16_base / "model.safetensors")
    tuned = _fine_tune(bf16_base, tmp_path / "ft", seed=7)

    sources = [tmp_path / "ft", adapters[0]]
    out = merge_to_checkpoint(bf16_base, sources, tmp_path / "m", "task_arithmetic", [0.5, 2.0])
    state = _state(out)
    for name, theta in base.items():
        tau = tuned[name].float() - theta.float()
        if name.endswith(".weight") and name.removesuffix(".weight") in adapters[0].modules:
            tau = 0.5 * tau + 2.0 * adapters[0].delta(name.removesuffix(".weight"))
        else:
            tau = 0.5 * tau  # the adapter leaves this tensor alone: its task vector is 0 here
        assert state[name].dtype == torch.bfloat16
        torch.testing.assert_close(state[name], (theta.float() + tau).bfloat16())
    AutoModelForCausalLM.from_pretrained(out)  # loads as is


def test_a_non_empty_output_directory_is_refused_unless_overwrite(
    tiny_llama_dir, adapters, tmp_path
):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # not a checkpoint: never replaced
        with pytest.raises(ValueError, match="is not empty and is not a model checkpoint"):
            merge_to_checkpoint(tiny_llama_dir, adapters, out, "linear", overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    ckpt = tmp_path / "c"
    merge_to_checkpoint(tiny_llama_dir, adapters, ckpt, "linear")
    with pytest.raises(ValueError, match="not empty .* overwrite=True replaces it"):
        merge_to_checkpoint(tiny_llama_dir, adapters, ckpt, "ties")
    assert json.loads((ckpt / "quiver_merge.json").read_text())["method"] == "linear"
    merge_to_checkpoint(tiny_llama_dir, adapters, ckpt, "ties", overwrite=True)  # a previous checkpoint
    assert json.loads((ckpt / "quiver_merge.json").read_text())["method"] == "ties"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "m"]  # no temporary directory left


def test_a_failure_leaves_nothing_half_written(tiny_llama_dir, adapters, tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_module, "_copy_side_files", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_to_checkpoint(tiny_llama_dir, adapters, tmp_path / "m", "ties")
    assert list(tmp_path.iterdir()) == []


def test_adapters_must_fit_the_base(tiny_llama_dir, make_adapter, tmp_path):
    wrong = make_adapter("w", 0, {"model.layers.0.self_attn.q_proj": (32, 16)})
    with pytest.raises(
        ValidationError, match=r"'model.layers.0.self_attn.q_proj' .* weight \[32, 32\]"
    ):
        merge_to_checkpoint(tiny_llama_dir, [wrong], tmp_path / "m")
    missing = make_adapter("x", 0, {"model.layers.9.mlp.up_proj": (64, 32)})
    with pytest.raises(ValidationError, match="no such weight"):
        merge_to_checkpoint(tiny_llama_dir, [missing], tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_must_share_the_base_tensors(tiny_llama_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 vocab_size=128)).save_pretrained(other)  # fmt: skip
    with pytest.raises(ValidationError, match=r"missing \['model.layers.1"):
        merge_to_checkpoint(tiny_llama_dir, [other], tmp_path / "m")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weights": [1.0]}, ValidationError, "got 1 weights for 3 sources"),
        ({"density": 0.0}, ValidationError, "density must be in"),
        ({"method": "mean"}, ValidationError, "valid methods"),
        ({"max_shard_size": "lots"}, ValidationError, "max_shard_size"),
    ],
)
def test_bad_arguments_write_nothing(tiny_llama_dir, adapters, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        merge_to_checkpoint(
            tiny_llama_dir, adapters, tmp_path / "m", **{"method": "ties", **kwargs}
        )
    assert list(tmp_path.iterdir()) == []


def test_the_output_may_not_be_an_input(tiny_llama_dir, adapters):
    with pytest.raises(ValueError, match="which this command reads"):
        merge_to_checkpoint(tiny_llama_dir, adapters, tiny_llama_dir, overwrite=True)
