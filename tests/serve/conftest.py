"""Fixtures for the server tests: a tiny Llama directory with a chat template, a library of
four random adapters (+ a saved router), and real `quiver serve` processes on 127.0.0.1."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # serve_helpers, imported by the tests too

from serve_helpers import KEY, Server, build_library, save_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    return save_model_dir(tmp_path_factory.mktemp("serve-tiny"), tiny_model, tiny_tokenizer)


@pytest.fixture(scope="session")
def serve_library(tmp_path_factory, tiny_spec):
    path = tmp_path_factory.mktemp("serve-lib") / "lib"
    build_library(path, tiny_spec).close()
    return path


@pytest.fixture(scope="session")
def server(serve_library, serve_model_dir, tmp_path_factory):
    s = Server(serve_library, serve_model_dir, keys=[KEY, "second-key"], tmp=tmp_path_factory.mktemp("srv"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def reference(serve_library, serve_model_dir):
    """Greedy completions computed in this process with RoutedModel.generate, one prompt alone."""
    from quiver.library import Library, load_base_model
    from quiver.routing import Arrow
    from quiver.runtime import RoutedModel
    from quiver.runtime.answer import cast_votes, task_token_mask, template_head_ids

    model, tok = load_base_model(serve_model_dir)
    lib = Library.open(serve_library)
    rm = RoutedModel(model, lib, router=Arrow(top_k=2))

    def generate(prompt: str, router=None, max_tokens: int = 12, chat: bool = False, bare: bool = False,
                 route_text: str | None = None):
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
        else:
            enc = tok(prompt, return_tensors="pt")
        kw = dict(max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        if bare:
            with rm.bare() as m, torch.no_grad():
                out = m.generate(**enc, **kw)
        else:
            if router is not None:
                rm.bind(router)
                router.prepare(prompts=[route_text or prompt])
                if router.prompt_pass:  # ArrowVote: its scoring pass over the prompt's tokens
                    cast_votes(rm, router, enc["input_ids"], enc["attention_mask"],
                               task_token_mask(template_head_ids(tok), enc["input_ids"], enc["attention_mask"]))
            out = rm.generate(**enc, routers=[router], **kw)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    generate.lib, generate.tok = lib, tok
    yield generate
    lib.close()


@pytest.fixture
def lib_copy(serve_library, tmp_path):
    dst = tmp_path / "lib"
    shutil.copytree(serve_library, dst)
    return dst
