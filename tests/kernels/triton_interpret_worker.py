"""Runs the Triton backend under ``TRITON_INTERPRET=1`` in a process of its own.

``test_triton_interpreter.py`` starts it so that interpreter mode, which triton fixes when its
kernels are decorated, never leaks into the test process. Usage::

    TRITON_INTERPRET=1 python triton_interpret_worker.py CASES.pt DELTAS.pt

CASES.pt maps a name to tensors ``x, A, B, ranks, indices, weights``; DELTAS.pt maps the same
names to ``mixture_lora(..., backend="triton")``.
"""

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting this worker"

from quiver.kernels import LoraBank, mixture_lora  # noqa: E402  (after the interpreter check)


def main(src: str, dst: str) -> None:
    cases = torch.load(src, weights_only=True)
    deltas = {name: mixture_lora(c["x"], LoraBank(c["A"], c["B"], c["ranks"]), c["indices"], c["weights"],
                                 backend="triton")
              for name, c in cases.items()}
    torch.save(deltas, dst)


if __name__ == "__main__":
    main(*sys.argv[1:])
