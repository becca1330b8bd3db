"""The CLI tests' library factory; their helpers are cli_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # cli_helpers, imported by the tests


@pytest.fixture
def tiny_lib(tmp_path, tiny_model_dir, peft_adapter_dir):
    """Factory: a library on the tiny model at ``path`` holding adapters ``names``."""
    from quiver.library import BaseModelSpec, Library, load_base_model

    model, _ = load_base_model(tiny_model_dir, tokenizer=False)
    spec = BaseModelSpec.from_model(model)

    def make(path: Path, names=("a", "b")) -> Path:
        with Library.open(path, base_model=spec) as lib:
            for i, name in enumerate(names):
                lib.add_peft(peft_adapter_dir(name, seed=i + 1), name=name, description=f"adapter {name}",
                             examples=[f"example for {name}"], tags=["t"])
        return path

    return make
