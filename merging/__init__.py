"""Offline merging: task-vector merge methods, LoRA and full-checkpoint outputs.

    from quiver.merging import merge_tensors, merge, merge_to_checkpoint
    tau = merge_tensors([t1, t2, t3], method="ties", weights=[1, 1, 1], density=0.2)
    adapter = merge([a1, a2], method="pcb", rank=16, ratio=0.1, name="merged")
    merge_to_checkpoint(base_dir, [a1, a2], out_dir, method="ties", density=0.2)

``METHODS`` maps each method name to the builder whose docstring states its formula.
"""

from .checkpoint import merge_to_checkpoint
from .lora import merge, retained_energy
from .methods import METHODS, MergeSpec, build, merge_tensors
from .mos import (
    CompressConfig,
    MoSAdapter,
    MoSConfig,
    MoSPools,
    compress,
    expand,
    load_mos,
    load_pools,
    register_materialized,
    save_mos,
    save_pools,
)
from .search import CoefficientSearch, PcbParts, search_coefficients, search_pcb_coefficients, task_vectors

__all__ = [
    "METHODS",
    "CoefficientSearch",
    "CompressConfig",
    "MergeSpec",
    "MoSAdapter",
    "MoSConfig",
    "MoSPools",
    "PcbParts",
    "build",
    "compress",
    "expand",
    "load_mos",
    "load_pools",
    "merge",
    "merge_tensors",
    "merge_to_checkpoint",
    "register_materialized",
    "retained_energy",
    "save_mos",
    "save_pools",
    "search_coefficients",
    "search_pcb_coefficients",
    "task_vectors",
]
