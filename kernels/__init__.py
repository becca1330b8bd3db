"""kernels: the math of "x through a weighted mixture of k LoRAs".

``delta = mixture_lora(x, bank, indices, weights)`` with, for each token t,
``delta[t] = Σ_j weights[t, j] · B[indices[t, j]] @ (A[indices[t, j]] @ x[t])`` (index -1: no
adapter). ``LoraBank`` holds one module's stacked factors, ``build_meta`` regroups one routing
decision by adapter once per batch, ``BACKENDS`` lists the implementations.
"""

import sys

if __name__ == "kernels":
    # This folder was imported as the top-level package `kernels`: the repository's root is on
    # sys.path (`python -m` run from the root; Ray puts a driver's working directory on its
    # workers' paths), where it shadows the `kernels` package that transformers imports. Hand
    # the name over to that package (the import system returns what sys.modules holds after this
    # file ran), and define nothing here.
    import os
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = PathFinder.find_spec("kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ImportError("no package 'kernels' is installed (the repository's kernels/ folder is quiver.kernels)")
    _real = module_from_spec(_spec)
    sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)
else:
    from .bank import LoraBank
    from .dispatch import BACKENDS, mixture_lora, pick_backend
    from .meta import MixtureMeta, build_meta
    from .torch_ref import mixture_lora_grouped, mixture_lora_reference

__all__ = [
    "BACKENDS",
    "LoraBank",
    "MixtureMeta",
    "build_meta",
    "mixture_lora",
    "mixture_lora_grouped",
    "mixture_lora_reference",
    "pick_backend",
]
