"""Every ```python block of README.md runs as written, in order, on the tiny model.

The blocks run one after another in one temporary folder, each in a fresh namespace (as a user
would paste them into separate scripts), with the folder holding the three PEFT directories the
README's text asks for (``sql-lora``, ``dates-lora``, ``french-lora``, made by ``peft`` on the
tiny model). The changes to the text: the model name ``"smollm2-135m"`` becomes the tiny
model's directory, and, to keep the suite fast, training runs 2 steps (``steps=N``) and
generation 4 tokens (``max_new_tokens=N``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_NAME = '"smollm2-135m"'


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_quickstart_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert all(MODEL_NAME in b or "Library.open(\"my-library\")" in b for b in blocks)


def test_readme_python_blocks_run(tmp_path, monkeypatch, tiny_model_dir, peft_adapter_dir):
    import shutil

    for i, name in enumerate(("sql", "dates", "french")):
        shutil.copytree(peft_adapter_dir(name, seed=i + 1), tmp_path / f"{name}-lora")
    monkeypatch.chdir(tmp_path)
    for n, block in enumerate(python_blocks(), start=1):
        code = block.replace(MODEL_NAME, repr(str(tiny_model_dir)))
        code = re.sub(r"\bsteps=\d+", "steps=2", code)
        code = re.sub(r"\bmax_new_tokens=\d+", "max_new_tokens=4", code)
        namespace: dict = {"__name__": f"readme_block_{n}"}
        try:
            exec(compile(code, f"README.md python block {n}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 -- name the block that failed
            pytest.fail(f"README python block {n} failed: {type(e).__name__}: {e}\n{block}")
        if "answers" in namespace:  # the routed quickstart and the training block answer prompts
            assert all(isinstance(a.text, str) for a in namespace["answers"])
    from quiver import Library
    from quiver.routing import load_router

    with Library.open("my-library") as lib:
        assert {"sql", "dates", "french", "sql-dates-fr", "my-mos", "dates-iso"} <= set(lib.names())
        assert load_router(lib, "my-moe") is not None
    assert (tmp_path / "out" / "sql" / "adapter_config.json").is_file()
    assert (tmp_path / "merged-model" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "trace.png").is_file() and (tmp_path / "trace.json").is_file()


@pytest.mark.real_model
def test_readme_routed_quickstart_answers_on_the_instruct_model(real_model, tmp_path):
    """The README's by-hand path (chat template + left padding) gives real answers on
    SmolLM2-135M-Instruct, as ``answer`` does (raw prompts got empty or wrong answers)."""
    import torch

    from quiver import Library, RoutedModel
    from quiver.library import BaseModelSpec
    from quiver.routing import Arrow
    from quiver.runtime.answer import answer, encode_prompts

    model, tok = real_model
    adapters = Path(__file__).resolve().parents[1] / "tasks" / "adapters"
    with Library.open(tmp_path / "lib", base_model=BaseModelSpec.from_model(model, "smollm2-135m")) as lib:
        for name in ("date_iso", "km_to_m"):
            lib.add_peft(adapters / name, name=name, description=name)
        rm = RoutedModel(model, lib, router=Arrow(top_k=2))
        try:
            prompts = ["Convert March 5, 2021 to ISO format.", "How many metres are 3 km?"]
            batch = encode_prompts(tok, prompts)
            with torch.no_grad():
                out = rm.generate(**batch, max_new_tokens=12, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            answers, _ = answer(rm, tok, prompts, max_new_tokens=12, trace=False)
        finally:
            rm.unwrap()
    assert all(t.strip() for t in texts), texts
    assert [t.strip() for t in texts] == [a.text for a in answers]
