"""The MoS parametrisation: a config, the index tensors of the four differentiation strategies,
and :class:`MoSAdapter`, whose LoRA factors are gathers from shard pools (the formulas are in
:mod:`quiver.merging.mos`). Trained by ``quiver.training.train_mos``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from quiver.library.adapter import BaseModelRef, LoraAdapter, LoraModule
from quiver.library.base_model import fingerprint, linear_shapes, model_id_of
from torch import nn

FACTORS = ("A", "B")


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


def group_by_projection(modules: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
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


def assemble(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
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
        self.groups = group_by_projection(self.shapes)
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
        A = assemble(self.pools[f"{proj}_A"], self.index(proj, "A")[k])  # [r, d_in]
        Bt = assemble(self.pools[f"{proj}_B"], self.index(proj, "B")[k])  # [r, d_out]
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


def index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
