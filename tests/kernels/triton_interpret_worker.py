"""Runs the Triton backend under ``TRITON_INTERPRET=1`` in a process of its own.

``test_triton_interpreter.py`` starts it so that interpreter mode, which triton fixes when its
kernels are decorated, never leaks into the test process. Usage::

    TRITON_INTERPRET=1 python triton_interpret_worker.py CASES.pt DELTAS.pt

CASES.pt maps a name to tensors ``x, A, B, ranks, indices, weights``; DELTAS.pt maps the same
names to ``mixture_lora(..., backend="triton")``. A case that also holds ``g`` (a cotangent
``[T, d_out]``) is run with gradients: its entry is ``{delta, x, A, B, weights}``, the last four
the gradients of ``(delta * g).sum()``. A case holding ``bounded`` runs with the metadata of
``build_meta(..., exact=False)`` (what a CUDA step builds without reading the host). Exits with ``UNUSABLE`` when this triton's
interpreter cannot run a loop bounded by a kernel argument (triton-lang/triton#9171: before
the fix, numpy >= 2.4 refuses its ``int(array)``), so the tests can skip with that reason.
"""

import os
import sys

import torch
import triton
import triton.language as tl

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting this worker"

from quiver.kernels import LoraBank, build_meta, mixture_lora  # noqa: E402  (after the interpreter check)

UNUSABLE = 3


@triton.jit
def _count_to(out_ptr, n):
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out_ptr, total)


def interpreter_usable() -> bool:
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to[(1,)](out, 3)
    except triton.runtime.errors.InterpreterError as err:
        print(f"triton {triton.__version__} interpreter cannot bound loops by arguments: {err}", file=sys.stderr)
        return False
    return out.item() == 3


def main(src: str, dst: str) -> None:
    if not interpreter_usable():
        sys.exit(UNUSABLE)
    cases = torch.load(src, weights_only=True)
    out = {}
    for name, c in cases.items():
        if "g" not in c:
            bank = LoraBank(c["A"], c["B"], c["ranks"])
            # "bounded" cases: the metadata CUDA steps use (no host read; grid over every adapter)
            meta = build_meta(c["indices"], c["weights"], bank.num_adapters, exact=False) if "bounded" in c else None
            out[name] = mixture_lora(c["x"], bank, c["indices"], c["weights"], meta=meta, backend="triton")
            continue
        leaves = {k: c[k].clone().requires_grad_() for k in ("x", "A", "B", "weights")}
        delta = mixture_lora(leaves["x"], LoraBank(leaves["A"], leaves["B"], c["ranks"]), c["indices"],
                             leaves["weights"], backend="triton")
        (delta.float() * c["g"]).sum().backward()
        out[name] = {"delta": delta.detach(), **{k: v.grad for k, v in leaves.items()}}
    torch.save(out, dst)


if __name__ == "__main__":
    main(*sys.argv[1:])
