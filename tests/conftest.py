"""Shared fixtures: a tiny random Llama (hidden 32, 2 layers, GQA) built once per session."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random Llama; tests that modify it must deep-copy it."""
    model = make_tiny_llama()
    model._quiver_model_id = "tiny-llama"
    return model


@pytest.fixture(scope="session")
def tiny_spec(tiny_model):
    from quiver.library import BaseModelSpec

    return BaseModelSpec.from_model(tiny_model, "tiny-llama")


def make_tiny_tokenizer():
    """A 128-token character-level BPE tokenizer (trained here, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!:+-=")
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    corpus = ["translate this sentence into french please", "what is two plus two? four.",
              "write a query that selects all users", "convert the date to iso format"] * 20
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct and its tokenizer, loaded once (tests must leave it as they found it)."""
    from quiver import load_base_model

    return load_base_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny character-level tokenizer (no chat template)."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model):
    """The tiny Llama and a tiny tokenizer saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def lib(tmp_path, tiny_spec):
    from quiver.library import Library

    with Library.open(tmp_path / "lib", base_model=tiny_spec) as library:
        yield library


@pytest.fixture
def peft_adapter_dir(tmp_path, tiny_model):
    """Factory: save a LoRA made by peft itself on the tiny model; returns its directory."""
    from peft import LoraConfig, get_peft_model

    def make(name="a", seed=1, **lora_kwargs):
        kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        kwargs.update(lora_kwargs)
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(**kwargs))
        out = tmp_path / f"peft-{name}"
        peft_model.save_pretrained(out)
        return out

    return make


@pytest.fixture
def random_lib(tmp_path, tiny_spec):
    """Factory: a library of ``n`` random adapters a0..a{n-1} (std 0.15) on every projection,
    the last one on q, v and down projections only; ``rank(i)`` gives adapter i's rank."""
    from quiver.library import Library
    from quiver.library.synthetic import random_adapter

    opened = []

    def make(n: int, rank=lambda i: 2):
        lib = Library.open(tmp_path / "lib", base_model=tiny_spec)
        opened.append(lib)
        for i in range(n):
            targets = ("q_proj", "v_proj", "down_proj") if i == n - 1 else ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj")
            lib.add(random_adapter(tiny_spec, f"a{i}", rank=rank(i), seed=i, std=0.15, targets=targets))
        return lib

    yield make
    for lib in opened:
        lib.close()


@pytest.fixture
def lib6(random_lib):
    """Six random adapters a0..a5 of ranks 2-4 (a5 adapts only q, v and down projections)."""
    return random_lib(6, rank=lambda i: 2 + i % 3)
