"""MoS adapters and compressed pools as library artefacts of kind ``"mos"``: pools as floats,
indices as int16 (pools of at most 32767 shards) or int32, restored exactly.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from quiver.library.adapter import BaseModelRef

from .compress import CompressConfig, MoSPools
from .shards import FACTORS, MoSAdapter, MoSConfig, index_dtype

_FORMAT = 1


def save_mos(lib, name: str, mos: MoSAdapter) -> int:
    """Store ``mos`` as library artifact ``("mos", name)``: pools (float) + indices (int16/32).

    Returns the artifact version. :func:`load_mos` restores it exactly.
    """
    tensors = {}
    for key, pool in mos.pools.items():
        proj, f = key.rsplit("_", 1)
        tensors[f"pool.{proj}.{f}"] = pool.detach()
        tensors[f"index.{proj}.{f}"] = mos.index(proj, f).to(index_dtype(pool.shape[0]))
    config = {"format": _FORMAT, "type": "adapter", "name": mos.name, "config": asdict(mos.config),
              "modules": {p: list(s) for p, s in sorted(mos.shapes.items())},
              "base_model": {"id": mos.base_model.id, "fingerprint": mos.base_model.fingerprint}}
    return lib.put_artifact("mos", name, tensors, config)


def load_mos(lib, name: str) -> MoSAdapter:
    """The :class:`MoSAdapter` stored by :func:`save_mos` under ``name`` (pools and indices as saved)."""
    tensors, config, _ = lib.get_artifact("mos", name)
    if config.get("type") != "adapter":
        raise ValueError(f"mos artifact {name!r} is a {config.get('type')!r}, not an adapter (use load_pools)")
    mos = MoSAdapter({p: tuple(s) for p, s in config["modules"].items()}, MoSConfig(**config["config"]),
                     BaseModelRef(**config["base_model"]), config["name"])
    with torch.no_grad():
        for key, pool in mos.pools.items():
            proj, f = key.rsplit("_", 1)
            pool.copy_(tensors[f"pool.{proj}.{f}"])
            mos.index(proj, f).copy_(tensors[f"index.{proj}.{f}"].long())
    return mos


def register_materialized(lib, name: str, mos: MoSAdapter, **add_kwargs):
    """Store the compact form (:func:`save_mos`) and add the dense adapter under the same name."""
    save_mos(lib, name, mos)
    return lib.add(mos.materialize(name), **add_kwargs)


def save_pools(lib, name: str, pools: MoSPools) -> int:
    """Store compressed pools as artifact ``("mos", name)`` (pools, int16/32 indices, alphas)."""
    tensors = {}
    for (proj, f), pool in pools.pools.items():
        tensors[f"pool.{proj}.{f}"] = pool
        tensors[f"index.{proj}.{f}"] = pools.index[(proj, f)].to(index_dtype(pool.shape[0]))
    tensors |= {f"alpha.{proj}": a for proj, a in pools.alphas.items()}
    config = {"format": _FORMAT, "type": "pools", "names": pools.names, "paths": pools.paths,
              "use_rslora": pools.use_rslora, "config": asdict(pools.config),
              "base_model": {"id": pools.base_model.id, "fingerprint": pools.base_model.fingerprint}}
    return lib.put_artifact("mos", name, tensors, config, adapters=pools.names)


def load_pools(lib, name: str) -> MoSPools:
    """The :class:`MoSPools` stored by :func:`save_pools` under ``name``."""
    tensors, config, _ = lib.get_artifact("mos", name)
    if config.get("type") != "pools":
        raise ValueError(f"mos artifact {name!r} is a {config.get('type')!r}, not compressed pools")
    keys = [(proj, f) for proj in config["paths"] for f in FACTORS]
    return MoSPools(base_model=BaseModelRef(**config["base_model"]), names=config["names"],
                    paths=config["paths"], pools={k: tensors[f"pool.{k[0]}.{k[1]}"] for k in keys},
                    index={k: tensors[f"index.{k[0]}.{k[1]}"].long() for k in keys},
                    alphas={proj: tensors[f"alpha.{proj}"] for proj in config["paths"]},
                    use_rslora=config["use_rslora"], config=CompressConfig(**config["config"]))
