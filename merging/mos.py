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

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from quiver.library.adapter import BaseModelRef, LoraAdapter, LoraModule
from quiver.library.base_model import fingerprint, linear_shapes, model_id_of

FACTORS = ("A", "B")
_FORMAT = 1


# --------------------------------------------------------------------------------------------
# config and layout
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoSConfig:
    """Shape of a trainable MoS adapter.

    ``budget`` is the pool size relative to LoRA of the same rank: each pool holds
    ``N = round(budget · L · r · l)`` shards of length ``d / l`` against LoRA's ``L · r · l``
    such slots, so trainable parameters ≈ ``budget`` × LoRA's (the default 1/8 is the paper's
    ~8× saving). Give ``shard_length`` instead of ``shards_per_vector`` to fix ``s`` (then
    ``l = d / s`` per factor). ``private_fraction`` of each pool is split into per-layer private
    shards (``P = floor(private_fraction · N / L)`` per layer, at least one shared shard kept).
    """

    rank: int = 8
    alpha: float = 16.0
    shards_per_vector: int | None = 2
    shard_length: int | None = None
    budget: float = 1 / 8
    private_fraction: float = 0.25
    pair_dissociation: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if (self.shards_per_vector is None) == (self.shard_length is None):
            raise ValueError("give exactly one of shards_per_vector and shard_length")
        if self.shards_per_vector is not None and self.shards_per_vector < 1:
            raise ValueError(f"shards_per_vector must be >= 1, got {self.shards_per_vector}")
        if self.shard_length is not None and self.shard_length < 1:
            raise ValueError(f"shard_length must be >= 1, got {self.shard_length}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if not 0 <= self.private_fraction < 1:
            raise ValueError(f"private_fraction must be in [0, 1), got {self.private_fraction}")

    def shards_for(self, dim: int, what: str) -> int:
        """``l`` for a rank vector of length ``dim``; errors unless the shards tile it exactly."""
        if self.shard_length is not None:
            if dim % self.shard_length:
                raise ValueError(f"{what}: shard_length {self.shard_length} does not divide dimension {dim}")
            return dim // self.shard_length
        if dim % self.shards_per_vector:
            raise ValueError(f"{what}: shards_per_vector {self.shards_per_vector} does not divide "
                             f"dimension {dim} (shard length would be {dim / self.shards_per_vector:g})")
        return self.shards_per_vector


def projection(path: str) -> str:
    """The projection type of a module path: its last component (``q_proj``)."""
    return path.rsplit(".", 1)[-1]


def _group(modules: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """``{projection: sorted paths}``; all modules of one projection must share ``(d_out, d_in)``."""
    groups: dict[str, list[str]] = {}
    for path in sorted(modules):
        groups.setdefault(projection(path), []).append(path)
    for proj, paths in groups.items():
        shapes = {tuple(modules[p]) for p in paths}
        if len(shapes) > 1:
            raise ValueError(f"modules of projection {proj!r} have different shapes {sorted(shapes)}; "
                             "one shard pool needs one (d_out, d_in)")
    return groups


def _assemble(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``pool: [N, s]``, ``index: [..., r, l]`` -> rank vectors ``[..., r, l·s]`` (concatenated shards)."""
    return pool[index].flatten(-2)


def _layer_indices(n_shared: int, n_private: int, layers: int, slots: int, g: torch.Generator) -> torch.Tensor:
    """Index slots ``[L, slots]`` into a pool laid out as ``[shared (n_shared) | private (L·n_private)]``.

    Layer k puts its ``n_private`` private shards in random slots and fills the rest from a
    fresh random permutation of the shared shards (repeated when the layer needs more slots
    than the pool has): subset selection.
    """
    out = torch.empty(layers, slots, dtype=torch.long)
    for k in range(layers):
        need = slots - n_private
        reps = math.ceil(need / n_shared) if need else 0
        shared = torch.cat([torch.randperm(n_shared, generator=g) for _ in range(reps)])[:need] if reps else \
            torch.empty(0, dtype=torch.long)
        private = n_shared + k * n_private + torch.arange(n_private)
        slot_order = torch.randperm(slots, generator=g)
        out[k, slot_order] = torch.cat([private, shared])
    return out


# --------------------------------------------------------------------------------------------
# the trainable adapter
# --------------------------------------------------------------------------------------------
class MoSAdapter(nn.Module):
    """A MoS adapter over ``modules = {path: (d_out, d_in)}``; see the module docstring for the math.

    Parameters: ``pools[f"{proj}_{f}"]: [N, s]`` (A pools uniform ±1/sqrt(d_in) like PEFT's
    kaiming init, B pools zero so ΔW starts at 0). Buffers: ``index_{proj}_{f}: [L, r, l]``
    (int64, fixed and seeded), layers in sorted-path order.
    """

    def __init__(self, modules: dict[str, tuple[int, int]], config: MoSConfig = MoSConfig(),
                 base_model: BaseModelRef | None = None, name: str = "mos"):
        super().__init__()
        if not modules:
            raise ValueError("MoSAdapter needs at least one module")
        self.config, self.name = config, name
        self.base_model = base_model or BaseModelRef("unknown", "unknown")
        self.shapes = {p: (int(s[0]), int(s[1])) for p, s in modules.items()}
        self.groups = _group(self.shapes)
        self.pools = nn.ParameterDict()
        g = torch.Generator().manual_seed(config.seed)
        r = config.rank
        for proj, paths in self.groups.items():
            d_out, d_in = self.shapes[paths[0]]
            L = len(paths)
            l_a = config.shards_for(d_in, f"{proj} A (d_in)")
            l_b = config.shards_for(d_out, f"{proj} B (d_out)")
            index_a = None
            for f, dim, l in (("A", d_in, l_a), ("B", d_out, l_b)):
                slots = r * l
                n_total = max(1, round(config.budget * L * slots))
                n_priv = min(math.floor(config.private_fraction * n_total / L), (n_total - 1) // L, slots)
                n_shared = n_total - L * n_priv
                if f == "B" and not config.pair_dissociation and l_b == l_a:
                    index = index_a  # same pool sizes (they depend only on L, r, l): tie the indices
                else:
                    index = _layer_indices(n_shared, n_priv, L, slots, g).view(L, r, l)
                index_a = index if f == "A" else index_a
                pool = torch.zeros(n_total, dim // l)  # [N, s]
                if f == "A":
                    pool.uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in), generator=g)
                self.pools[f"{proj}_{f}"] = nn.Parameter(pool)
                self.register_buffer(f"index_{proj}_{f}", index.clone())
            if not config.pair_dissociation and l_a != l_b:
                raise ValueError(f"{proj}: pair_dissociation=False needs the same shards per vector for "
                                 f"A and B (got {l_a} and {l_b})")

    @classmethod
    def for_model(cls, model: nn.Module, config: MoSConfig = MoSConfig(),
                  targets: Sequence[str] = ("q_proj", "v_proj"), name: str = "mos") -> MoSAdapter:
        """An adapter over ``model``'s ``nn.Linear`` layers whose last name is in ``targets``."""
        modules = {path: shape for path, shape in linear_shapes(model).items() if projection(path) in targets}
        if not modules:
            raise ValueError(f"no nn.Linear of the model matches targets {list(targets)}")
        return cls(modules, config, BaseModelRef(model_id_of(model), fingerprint(model)), name)

    def index(self, proj: str, factor: str) -> torch.Tensor:
        return getattr(self, f"index_{proj}_{factor}")  # [L, r, l]

    @property
    def scaling(self) -> float:
        return self.config.alpha / self.config.rank

    def factors(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(A: [r, d_in], B: [d_out, r])`` of one module (differentiable w.r.t. the pools)."""
        proj = projection(path)
        k = self.groups[proj].index(path)
        A = _assemble(self.pools[f"{proj}_A"], self.index(proj, "A")[k])  # [r, d_in]
        Bt = _assemble(self.pools[f"{proj}_B"], self.index(proj, "B")[k])  # [r, d_out]
        return A, Bt.T

    def delta(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling · x @ A^T @ B^T`` for ``x: [..., d_in]`` -> ``[..., d_out]``."""
        A, B = self.factors(path)
        return (x @ A.T.to(x.dtype)) @ B.T.to(x.dtype) * self.scaling

    def materialize(self, name: str | None = None) -> LoraAdapter:
        """The dense LoRA adapter with the same ΔW per module (for the library, runtime, export)."""
        with torch.no_grad():
            modules = {}
            for path in sorted(self.shapes):
                A, B = self.factors(path)
                modules[path] = LoraModule(A=A.detach().clone(), B=B.detach().clone(), alpha=self.config.alpha)
        return LoraAdapter(name=name or self.name, base_model=self.base_model, modules=modules,
                           metadata={"mos": {"config": asdict(self.config)}})

    def num_parameters(self) -> int:
        """Trainable parameters: the pool elements."""
        return sum(p.numel() for p in self.pools.values())

    def lora_num_parameters(self) -> int:
        """A plain LoRA's parameters at the same rank over the same modules: ``Σ r·(d_in + d_out)``."""
        return sum(self.config.rank * (d_out + d_in) for d_out, d_in in self.shapes.values())


# --------------------------------------------------------------------------------------------
# library storage (compact pool form)
# --------------------------------------------------------------------------------------------
def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32


def save_mos(lib, name: str, mos: MoSAdapter) -> int:
    """Store ``mos`` as library artifact ``("mos", name)``: pools (float) + indices (int16/32).

    Returns the artifact version. :func:`load_mos` restores it exactly.
    """
    tensors = {}
    for key, pool in mos.pools.items():
        proj, f = key.rsplit("_", 1)
        tensors[f"pool.{proj}.{f}"] = pool.detach()
        tensors[f"index.{proj}.{f}"] = mos.index(proj, f).to(_index_dtype(pool.shape[0]))
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


# --------------------------------------------------------------------------------------------
# compressing a library of LoRA adapters into shared pools
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressConfig:
    """How :func:`compress` sizes and fits the pools.

    Each pool (projection × factor) gets ``pool_size`` shards if given, else
    ``round(budget · M)`` where ``M = K · L · r · l`` is the number of shard vectors it replaces
    (capped at ``M``). k-means runs ``iters`` Lloyd steps from ``restarts`` k-means++ seeds.
    """

    shards_per_vector: int = 2
    pool_size: int | None = None
    budget: float = 1 / 8
    iters: int = 30
    restarts: int = 2
    least_squares: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shards_per_vector < 1 or (self.pool_size is not None and self.pool_size < 1):
            raise ValueError("shards_per_vector and pool_size must be >= 1")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")


@dataclass
class MoSPools:
    """K adapters in pool form.

    ``pools[(proj, f)]: [N, s]``; ``index[(proj, f)]: [K, L, r, l]`` (layers = ``paths[proj]``);
    ``alphas[proj]: [K, L]``; per adapter ``names``, ``use_rslora``.
    """

    base_model: BaseModelRef
    names: list[str]
    paths: dict[str, list[str]]
    pools: dict[tuple[str, str], torch.Tensor]
    index: dict[tuple[str, str], torch.Tensor]
    alphas: dict[str, torch.Tensor]
    use_rslora: list[bool]
    config: CompressConfig = field(default_factory=CompressConfig)

    def storage_bytes(self) -> int:
        """Pool floats (their dtype) + indices at int16 (pools ≤ 32767 shards) or int32 + alphas (fp64)."""
        total = sum(p.numel() * p.element_size() for p in self.pools.values())
        total += sum(i.numel() * torch.empty(0, dtype=_index_dtype(self.pools[k].shape[0])).element_size()
                     for k, i in self.index.items())
        return total + sum(a.numel() * a.element_size() for a in self.alphas.values())


def _kmeans(x: torch.Tensor, k: int, iters: int, restarts: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd k-means with k-means++ seeding: ``x: [M, s]`` -> ``(centroids [k, s], assign [M])``.

    Minimises ``Σ_m ||x_m - c_{assign_m}||²``; the best of ``restarts`` runs is kept. Empty
    clusters are re-seeded with the worst-fitted points.
    """
    best = None
    for _ in range(restarts):
        c = x[torch.randint(len(x), (1,), generator=g)]
        d2 = torch.cdist(x, c).squeeze(1) ** 2  # [M]
        for _ in range(1, k):  # k-means++: sample ∝ squared distance to the nearest centroid
            if d2.sum() <= 0:
                pick = torch.randint(len(x), (1,), generator=g)
            else:
                pick = torch.multinomial(d2, 1, generator=g)
            c = torch.cat([c, x[pick]])
            d2 = torch.minimum(d2, (torch.cdist(x, x[pick]).squeeze(1)) ** 2)
        for _ in range(iters):
            dist = torch.cdist(x, c)  # [M, k]
            assign = dist.argmin(1)
            counts = torch.bincount(assign, minlength=k)
            new = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp(min=1)[:, None]
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                worst = dist.gather(1, assign[:, None]).squeeze(1).topk(len(empty)).indices
                new[empty] = x[worst]
            if torch.equal(new, c):
                break
            c = new
        assign = torch.cdist(x, c).argmin(1)
        err = ((x - c[assign]) ** 2).sum()
        if best is None or err < best[0]:
            best = (err, c, assign)
    return best[1], best[2]


def _check_same_layout(adapters: Sequence[LoraAdapter]) -> int:
    if not adapters:
        raise ValueError("compress needs at least one adapter")
    first = adapters[0]
    ranks = {m.rank for a in adapters for m in a.modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"compress needs one rank across all adapters and modules, got ranks {sorted(ranks)}")
    for a in adapters[1:]:
        if set(a.modules) != set(first.modules):
            diff = sorted(set(a.modules) ^ set(first.modules))
            raise ValueError(f"adapter {a.name!r} adapts different modules than {first.name!r}: {diff[:5]}")
        if a.base_model != first.base_model:
            raise ValueError(f"adapter {a.name!r} is for base model {a.base_model.id!r}, "
                             f"{first.name!r} for {first.base_model.id!r}")
        for p, m in a.modules.items():
            if m.A.shape != first.modules[p].A.shape or m.B.shape != first.modules[p].B.shape:
                raise ValueError(f"adapter {a.name!r}, {p}: factor shapes differ from {first.name!r}")
    return ranks.pop()


def compress(adapters: Sequence[LoraAdapter], config: CompressConfig = CompressConfig()) -> tuple[MoSPools, dict]:
    """Compress K LoRA adapters (same modules, one rank) into shared shard pools per projection.

    For each projection type, every adapter's and layer's rank vectors are cut into ``l``
    shards: A's rows ``A[j] = [a_1 | … | a_l]`` and B's columns likewise. Then
      1. A pool ``P_A: [N, s]`` = k-means centroids of all A shards, ``Â`` = gathered centroids;
      2. (``least_squares``) B is refitted to the quantised A in factor space,
         ``B' = argmin_X ||B A - X Â||_F = B A Â^+`` (never forming ΔW);
      3. ``P_B`` = k-means centroids of all shards of ``B'``.
    Returns ``(pools, report)``: ``report["compression_ratio"]`` = original factor bytes /
    :meth:`MoSPools.storage_bytes`; ``report["adapters"][name]`` has the relative Frobenius
    errors ``delta_error = ||ΔW - ΔŴ|| / ||ΔW||`` (over all modules together), ``A_error`` and
    ``B_error`` (of the stacked factors).
    """
    r = _check_same_layout(adapters)
    first = adapters[0]
    shapes = {p: (m.B.shape[0], m.A.shape[1]) for p, m in first.modules.items()}
    groups = _group(shapes)
    g = torch.Generator().manual_seed(config.seed)
    K, l = len(adapters), config.shards_per_vector
    pools, index, alphas = {}, {}, {}
    for proj, paths in groups.items():
        d_out, d_in = shapes[paths[0]]
        for dim, what in ((d_in, "A (d_in)"), (d_out, "B (d_out)")):
            if dim % l:
                raise ValueError(f"{proj} {what}: shards_per_vector {l} does not divide dimension {dim}")
        L = len(paths)
        A = torch.stack([torch.stack([a.modules[p].A.float() for p in paths]) for a in adapters])  # [K, L, r, d_in]
        B = torch.stack([torch.stack([a.modules[p].B.float() for p in paths]) for a in adapters])  # [K, L, d_out, r]
        alphas[proj] = torch.tensor([[a.modules[p].alpha for p in paths] for a in adapters], dtype=torch.float64)
        M = K * L * r * l
        n = min(config.pool_size or max(1, round(config.budget * M)), M)
        pool_a, assign_a = _kmeans(A.reshape(M, d_in // l), n, config.iters, config.restarts, g)
        A_hat = pool_a[assign_a].reshape(K, L, r, d_in)
        if config.least_squares:  # B' = B A Â^+ = B (A Â^T)(Â Â^T)^+   [K, L, d_out, r]
            B = B @ (A @ A_hat.transpose(-1, -2)) @ torch.linalg.pinv(A_hat @ A_hat.transpose(-1, -2), hermitian=True)
        Bt = B.transpose(-1, -2)  # [K, L, r, d_out]
        pool_b, assign_b = _kmeans(Bt.reshape(M, d_out // l), n, config.iters, config.restarts, g)
        pools[(proj, "A")], pools[(proj, "B")] = pool_a, pool_b
        index[(proj, "A")] = assign_a.reshape(K, L, r, l)
        index[(proj, "B")] = assign_b.reshape(K, L, r, l)
    result = MoSPools(base_model=first.base_model, names=[a.name for a in adapters], paths=groups,
                      pools=pools, index=index, alphas=alphas, use_rslora=[a.use_rslora for a in adapters],
                      config=config)
    original = sum(a.num_parameters() * 4 for a in adapters)  # fp32 factors
    report = {"compression_ratio": original / result.storage_bytes(), "original_bytes": original,
              "pool_bytes": result.storage_bytes(),
              "pool_sizes": {f"{p}.{f}": t.shape[0] for (p, f), t in pools.items()},
              "adapters": {a.name: reconstruction_error(a, expand(result, i)) for i, a in enumerate(adapters)}}
    return result, report


def save_pools(lib, name: str, pools: MoSPools) -> int:
    """Store compressed pools as artifact ``("mos", name)`` (pools, int16/32 indices, alphas)."""
    tensors = {}
    for (proj, f), pool in pools.pools.items():
        tensors[f"pool.{proj}.{f}"] = pool
        tensors[f"index.{proj}.{f}"] = pools.index[(proj, f)].to(_index_dtype(pool.shape[0]))
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


def reconstruction_error(original: LoraAdapter, approx: LoraAdapter) -> dict[str, float]:
    """Relative Frobenius errors over all modules: ``||X - X̂|| / ||X||`` for ΔW, A and B."""
    num = {"delta": 0.0, "A": 0.0, "B": 0.0}
    den = dict(num)
    for p, m in original.modules.items():
        h = approx.modules[p]
        dw = original.delta(p)  # [d_out, d_in], one module at a time
        num["delta"] += float((dw - approx.delta(p)).square().sum())
        den["delta"] += float(dw.square().sum())
        for f, x, y in (("A", m.A, h.A), ("B", m.B, h.B)):
            num[f] += float((x.float() - y.float()).square().sum())
            den[f] += float(x.float().square().sum())
    return {f"{k}_error": math.sqrt(num[k] / den[k]) if den[k] else math.sqrt(num[k]) for k in num}


def expand(pools: MoSPools, i: int, name: str | None = None) -> LoraAdapter:
    """Adapter ``i`` back as dense factors: ``A_k = P_A[I_A[i, k]]`` rows, ``B_k^T = P_B[I_B[i, k]]``."""
    if not 0 <= i < len(pools.names):
        raise IndexError(f"adapter index {i} out of range for {len(pools.names)} compressed adapters")
    modules = {}
    for proj, paths in pools.paths.items():
        A = _assemble(pools.pools[(proj, "A")], pools.index[(proj, "A")][i])  # [L, r, d_in]
        Bt = _assemble(pools.pools[(proj, "B")], pools.index[(proj, "B")][i])  # [L, r, d_out]
        for k, path in enumerate(paths):
            modules[path] = LoraModule(A=A[k].clone(), B=Bt[k].T.contiguous(),
                                       alpha=float(pools.alphas[proj][i, k]))
    return LoraAdapter(name=name or pools.names[i], base_model=pools.base_model, modules=modules,
                       use_rslora=pools.use_rslora[i])
