"""MoS — Mixture of Shards (Wang et al., ICLR 2025): LoRA factors assembled from shared shard pools.

Index legend: ``L`` layers (modules of one projection type), ``r`` rank, ``l`` shards per rank
vector, ``s = d / l`` shard length, ``N`` shards in a pool, ``K`` adapters.

For every projection type ``p`` (``q_proj``, ``v_proj``, ...) and factor ``f ∈ {A, B}`` there is
one global pool ``P[p, f]: [N, s]`` shared by all layers. The module of layer ``k`` owns fixed
index tensors ``I_A[k]: [r, l_A]`` and ``I_B[k]: [r, l_B]`` and its factors are gathers:

    A_k   = P[p, A][I_A[k]].reshape(r, d_in)            # row j = concat_t P[I_A[k, j, t]]
    B_k^T = P[p, B][I_B[k]].reshape(r, d_out)           # column j of B likewise
    ΔW_k  = scaling · B_k @ A_k,   scaling = alpha / r

The paper's four differentiation strategies are all properties of the index tensors:
  * subset selection  — each layer draws its shared shards from a random subset (a fresh
    permutation) of the pool, so layers differ although they share parameters;
  * pair dissociation — ``I_A`` and ``I_B`` are drawn independently (``pair_dissociation=False``
    reuses the A indices for B, the paper's ablation);
  * vector sharding   — ``l > 1`` shards per rank vector, so one rank vector is a concatenation
    of ``l`` independently chosen shorter shards;
  * shard privatisation — the last ``L · P`` rows of each pool are private: ``P`` per layer,
    used only by that layer (``private_fraction`` of the pool).

A library of K ordinary LoRA adapters can also be *compressed* into such pools
(:func:`compress`, k-means over all shard vectors plus a least-squares correction of B) and
expanded back (:func:`expand`). Pools and indices are stored as library artifacts of kind
``"mos"``; the runtime and exports see dense factors (:meth:`MoSAdapter.materialize`).
"""

from .compress import CompressConfig, MoSPools, compress, expand, reconstruction_error
from .shards import FACTORS, MoSAdapter, MoSConfig, projection
from .storage import load_mos, load_pools, register_materialized, save_mos, save_pools

__all__ = ["FACTORS", "CompressConfig", "MoSAdapter", "MoSConfig", "MoSPools", "compress", "expand",
           "load_mos", "load_pools", "projection", "reconstruction_error", "register_materialized",
           "save_mos", "save_pools"]
