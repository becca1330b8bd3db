"""The Triton kernels on CPU, run by Triton's interpreter, against the reference.

All cases go through one worker process started with ``TRITON_INTERPRET=1`` (the mode is
fixed when triton decorates the kernels, so it must not be set in this process). The
interpreter is slow: shapes stay small but still cross every block boundary of the kernels
(segments longer than BLOCK_M = 64, d_out > BLOCK_N = 64, ranks above BLOCK_R = 32).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quiver.kernels import LoraBank, mixture_lora

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter

# name -> (T, d_in, d_out, ranks of the bank's adapters, k)
SHAPES = {
    "rank1_k1": (17, 37, 19, [1, 1, 1], 1),
    "mixed_ranks": (33, 45, 29, [1, 8, 17, 40, 64], 3),
    "k8": (20, 32, 24, [4] * 6, 8),
    "long_segment": (150, 16, 70, [8], 1),
    "E64": (40, 24, 24, [2] * 64, 2),
    "empty": (0, 37, 19, [4, 8], 2),
    "one_token": (1, 37, 19, [16, 3], 4),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORKER = Path(__file__).with_name("triton_interpret_worker.py")


def _no_slots(case):
    case.indices.fill_(-1)
    return case


def _nan_padding(case):
    """Poison the rank padding of the bank: the kernels must never load it."""
    A, B = case.bank.A.clone(), case.bank.B.clone()
    for e, r in enumerate(case.bank.rank_list):
        A[e, r:] = float("nan")
        B[e, :, r:] = float("nan")
    case.bank = LoraBank(A, B, case.bank.ranks)
    return case


VARIANTS = {"plain": lambda case: case, "no_slots": _no_slots, "nan_padding": _nan_padding}
CASES = [(shape, dtype, "plain") for shape in SHAPES for dtype in DTYPES] + [
    ("mixed_ranks", dtype, variant) for dtype in DTYPES for variant in ("no_slots", "nan_padding")]


# Gradient cases (fp32): name -> shape key. The cotangent is a fixed random [T, d_out].
GRAD_CASES = {"grad-mixed_ranks": "mixed_ranks", "grad-k8": "k8", "grad-long_segment": "long_segment",
              "grad-one_token": "one_token", "grad-empty": "empty"}


# Cases run with sync-free ("bounded") metadata, as on CUDA: (shape, dtype).
BOUNDED = [("mixed_ranks", "fp32"), ("mixed_ranks", "bf16"), ("E64", "fp32"), ("long_segment", "fp32"),
           ("empty", "fp32"), ("one_token", "fp16")]


def _grad_case(case_factory, shape: str):
    case = case_factory(*SHAPES[shape], dtype=torch.float32)
    T, d_out = case.x.shape[0], case.bank.d_out
    case.g = torch.randn(T, d_out, generator=torch.Generator().manual_seed(7))
    return case


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory, case_factory):
    """(cases, results), every case run through the Triton backend in one interpreter process."""
    cases = {"-".join(key): VARIANTS[key[2]](case_factory(*SHAPES[key[0]], dtype=DTYPES[key[1]]))
             for key in CASES}
    cases |= {name: _grad_case(case_factory, shape) for name, shape in GRAD_CASES.items()}
    cases |= {f"bounded-{shape}-{dt}": case_factory(*SHAPES[shape], dtype=DTYPES[dt]) for shape, dt in BOUNDED}
    tmp = tmp_path_factory.mktemp("triton-interpret")
    torch.save({name: dict(x=c.x, A=c.bank.A, B=c.bank.B, ranks=c.bank.ranks, indices=c.indices,
                           weights=c.weights, **({"g": c.g} if hasattr(c, "g") else {}),
                           **({"bounded": torch.ones(())} if name.startswith("bounded-") else {}))
                for name, c in cases.items()}, tmp / "cases.pt")
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp / "cases.pt"), str(tmp / "deltas.pt")],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3:  # the worker's UNUSABLE: a known interpreter bug, not ours
        reason = proc.stderr.strip().splitlines()[-1]
        pytest.skip(f"{reason} (triton-lang/triton#9171: upgrade triton or use numpy < 2.4)")
    if proc.returncode:
        pytest.fail(f"interpreter worker failed:\n{proc.stderr[-4000:]}")
    return cases, torch.load(tmp / "deltas.pt", weights_only=True)


@pytest.mark.parametrize("key", CASES, ids="-".join)
def test_triton_matches_reference(key, interpreted, check):
    cases, deltas = interpreted
    name = "-".join(key)
    check(deltas[name], cases[name])


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_triton_gradients_equal_the_reference(name, interpreted):
    """The Triton backend's autograd.Function: gradients for x, the gate weights and both
    factors equal the reference backend's (fp32)."""
    cases, results = interpreted
    c, got = cases[name], results[name]
    leaves = {k: v.clone().requires_grad_() for k, v in
              {"x": c.x, "A": c.bank.A, "B": c.bank.B, "weights": c.weights}.items()}
    delta = mixture_lora(leaves["x"], LoraBank(leaves["A"], leaves["B"], c.bank.ranks), c.indices,
                         leaves["weights"], backend="reference")
    (delta * c.g).sum().backward()
    torch.testing.assert_close(got["delta"], delta.detach(), atol=1e-4, rtol=1e-4)
    for k, leaf in leaves.items():
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        torch.testing.assert_close(got[k], want, atol=1e-4, rtol=1e-4, msg=f"d{k}")
    if (c.indices >= 0).any():
        assert got["weights"].abs().sum() > 0 and got["A"].abs().sum() > 0


@pytest.mark.parametrize("shape, dt", BOUNDED, ids=lambda v: str(v))
def test_triton_with_sync_free_metadata_matches_reference(shape, dt, interpreted, check):
    """The grid sized by bounds (every adapter, T·k rows) gives the reference's result."""
    cases, results = interpreted
    name = f"bounded-{shape}-{dt}"
    check(results[name], cases[name])
