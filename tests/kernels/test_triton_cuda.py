"""The compiled Triton kernels on a CUDA device against the reference, at serving sizes.

Skipped without CUDA; the interpreter tests cover the same code on CPU at small sizes.
"""

from __future__ import annotations

import pytest
import torch

from quiver.kernels import build_meta, mixture_lora, pick_backend

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# name -> (T, d_in, d_out, ranks of the bank's adapters, k)
SHAPES = {
    "mixed_ranks_k8": (1024, 576, 576, [1, 4, 8, 16, 32, 64] * 4, 8),
    "E1024": (2048, 576, 192, [8] * 1024, 2),
    "smollm2_up": (4096, 576, 1536, [16] * 16, 2),
    "smollm2_down": (4096, 1536, 576, [8, 16] * 8, 2),
    "long_segment": (4096, 576, 576, [8], 1),
    "decode": (16, 576, 576, [8] * 64, 2),
    "odd": (333, 37, 577, [3, 5, 33], 3),
    "empty": (0, 576, 576, [8], 2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("backend", ["triton", "grouped"])
def test_cuda_backend_matches_reference(backend, name, dtype, case_factory, check):
    case = case_factory(*SHAPES[name], dtype=DTYPES[dtype], device="cuda")
    check(mixture_lora(case.x, case.bank, case.indices, case.weights, backend=backend), case)


def test_auto_is_triton_on_cuda(case_factory):
    case = case_factory(80, 16, 16, [2], 1, device="cuda")  # 80 slots: past the small-call gather path
    assert pick_backend(case.x, case.indices.numel()) == "triton"


def test_triton_is_deterministic(case_factory):
    """The expand reduces each token's k slots in registers, in slot order: no atomics."""
    case = case_factory(2048, 576, 576, [8] * 64, 4, dtype=torch.bfloat16, device="cuda")
    meta = build_meta(case.indices, case.weights, 64)
    first = mixture_lora(case.x, case.bank, case.indices, case.weights, meta, backend="triton")
    for _ in range(3):
        assert torch.equal(mixture_lora(case.x, case.bank, case.indices, case.weights, meta, backend="triton"), first)
