"""Quiver's methods against mergekit's own outputs on tiny tensors.

The outputs were produced by mergekit 0.1.5 (see ``golden/make_mergekit_golden.py``, which
also documents how DARE's drop mask is fixed). Each case holds a base, three models and
per-model weights; Quiver must give ``θ₀ + λ τ_m`` equal to mergekit's merged tensor.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quiver.merging import merge_tensors
from quiver.merging.sparsify import RandomDrop

GOLDEN = Path(__file__).parent / "golden" / "mergekit.safetensors"


def _load():
    with safe_open(GOLDEN, framework="pt") as f:
        cases = json.loads(f.metadata()["cases"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    return cases, tensors


CASES, TENSORS = _load()
KEYS = sorted({name.split(".")[1] for name in TENSORS if name.startswith("base.")})


def test_golden_file_covers_the_mergekit_methods():
    assert {case["method"] for case in CASES.values()} == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
    }
    assert KEYS == ["v", "w"]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("key", KEYS)
def test_matches_mergekit(case, key, monkeypatch):
    spec = CASES[case]
    base = TENSORS[f"base.{key}"]
    taus = [TENSORS[f"model{i}.{key}"] - base for i in range(len(spec["weights"]))]
    if f"mask.{case}.{key}" in TENSORS:
        mask = TENSORS[f"mask.{case}.{key}"]
        monkeypatch.setattr(RandomDrop, "keep_mask", lambda self, shape, generator: mask)

    tau = merge_tensors(taus, spec["method"], spec["weights"], **spec["params"])
    merged = base + spec["params"].get("lambda_", 1.0) * tau

    expected = TENSORS[f"out.{case}.{key}"]
    assert not torch.equal(expected, base)
    torch.testing.assert_close(merged, expected)
