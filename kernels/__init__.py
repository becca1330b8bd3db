"""kernels: the math of "x through a weighted mixture of k LoRAs".

``delta = mixture_lora(x, bank, indices, weights)`` with, for each token t,
``delta[t] = Σ_j weights[t, j] · B[indices[t, j]] @ (A[indices[t, j]] @ x[t])`` (index -1: no
adapter). ``LoraBank`` holds one module's stacked factors, ``build_meta`` regroups one routing
decision by adapter once per batch, ``BACKENDS`` lists the implementations.
"""

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
