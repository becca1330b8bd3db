"""The stacked LoRA factors of one adapted module: what every kernel backend reads.

Index legend: E = adapters in the bank, R = max rank, r_e = rank of adapter e.

Layout decisions:
- PEFT orientation is kept (``A: [r, d_in]``, ``B: [d_out, r]``), stacked on a leading adapter
  axis and zero padded to the largest rank R. Padding is storage only: every backend reads
  adapter e through its first ``ranks[e]`` rows of A / columns of B, so padded entries are never
  part of the result, whatever they hold.
- The adapter scaling (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA) is folded into B when the
  bank is built, so a bank entry is exactly ``ΔW_e = B_e @ A_e``.
- A bank is immutable: a runtime that loads or evicts adapters builds a new bank (or writes
  new factors into the same storage *and* keeps the ranks), which keeps the cached host-side
  views below valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class LoraBank:
    """E LoRA adapters of one module, stacked and rank-padded.

    ``ΔW_e = B[e, :, :r_e] @ A[e, :r_e, :]`` with ``r_e = ranks[e]`` (scaling already in B).
    """

    A: Tensor  # [E, R, d_in]
    B: Tensor  # [E, d_out, R]
    ranks: Tensor  # int32 [E], 0 <= ranks[e] <= R
    host_ranks: tuple[int, ...] | None = field(default=None, compare=False, repr=False)  # ranks, if the
    # caller knows them on the host: then reading them needs no device sync

    def __post_init__(self) -> None:
        A, B, ranks = self.A, self.B, self.ranks
        if A.dim() != 3 or B.dim() != 3 or ranks.dim() != 1:
            raise ValueError(f"LoraBank wants A [E, R, d_in], B [E, d_out, R], ranks [E]; got "
                             f"A {tuple(A.shape)}, B {tuple(B.shape)}, ranks {tuple(ranks.shape)}")
        if not (A.shape[0] == B.shape[0] == ranks.shape[0]) or A.shape[1] != B.shape[2]:
            raise ValueError(f"LoraBank shapes disagree: A {tuple(A.shape)}, B {tuple(B.shape)}, "
                             f"ranks {tuple(ranks.shape)} (want A [E, R, d_in], B [E, d_out, R])")
        if A.dtype != B.dtype or not A.dtype.is_floating_point:
            raise ValueError(f"LoraBank factors need one floating dtype; got A {A.dtype}, B {B.dtype}")
        if ranks.dtype != torch.int32:
            raise ValueError(f"LoraBank ranks must be int32; got {ranks.dtype}")
        if not (A.device == B.device == ranks.device):
            raise ValueError(f"LoraBank tensors on different devices: A {A.device}, B {B.device}, "
                             f"ranks {ranks.device}")
        bad = [r for r in self.rank_list if not 0 <= r <= self.max_rank]
        if bad:
            raise ValueError(f"LoraBank ranks must lie in [0, {self.max_rank}]; got {bad[:5]}")

    @classmethod
    def from_factors(
        cls,
        factors: Sequence[tuple[Tensor, Tensor]],
        scalings: Sequence[float] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> LoraBank:
        """Stack ``(A_i [r_i, d_in], B_i [d_out, r_i])`` pairs into a bank.

        ``B`` is stored as ``scalings[i] * B_i`` (scaling 1 when ``scalings`` is None); the
        product is taken in float32 and then cast to ``dtype``.
        """
        if not factors:
            raise ValueError("LoraBank.from_factors needs at least one (A, B) pair")
        if scalings is not None and len(scalings) != len(factors):
            raise ValueError(f"{len(scalings)} scalings for {len(factors)} adapters")
        d_in, d_out = factors[0][0].shape[1], factors[0][1].shape[0]
        for i, (a, b) in enumerate(factors):
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] \
                    or a.shape[1] != d_in or b.shape[0] != d_out:
                raise ValueError(f"adapter {i}: want A [r, {d_in}] and B [{d_out}, r]; got "
                                 f"A {tuple(a.shape)}, B {tuple(b.shape)}")
        ranks = [a.shape[0] for a, _ in factors]
        E, R = len(factors), max(ranks)
        A = torch.zeros(E, R, d_in, dtype=dtype, device=device)  # [E, R, d_in]
        B = torch.zeros(E, d_out, R, dtype=dtype, device=device)  # [E, d_out, R]
        for e, (a, b) in enumerate(factors):
            scale = 1.0 if scalings is None else float(scalings[e])
            A[e, : ranks[e]] = a.to(device=device, dtype=dtype)
            B[e, :, : ranks[e]] = (b.to(device=device, dtype=torch.float32) * scale).to(dtype)
        return cls(A, B, torch.tensor(ranks, dtype=torch.int32, device=device))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraBank:
        """The same bank on another device and/or with factors in another floating dtype."""
        return LoraBank(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype),
                        self.ranks.to(device=device), self.host_ranks)

    @property
    def num_adapters(self) -> int:
        return self.A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.A.shape[1]

    @property
    def d_in(self) -> int:
        return self.A.shape[2]

    @property
    def d_out(self) -> int:
        return self.B.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    @cached_property
    def rank_list(self) -> tuple[int, ...]:
        """``ranks`` on the host (``host_ranks``, or one device sync, once per bank)."""
        return self.host_ranks if self.host_ranks is not None else tuple(self.ranks.tolist())

    @cached_property
    def padded(self) -> bool:
        """Some adapter's rank is below R (its padding must be masked)."""
        return min(self.rank_list, default=0) < self.max_rank

    @cached_property
    def rank_views(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """Per adapter e, the views ``(A_e^T [d_in, r_e], B_e^T [r_e, d_out])``, no copies.

        Built once per bank for the grouped path, whose loop would otherwise spend more time
        slicing than multiplying when most adapters receive a handful of tokens.
        """
        return tuple((a[:r].t(), b[:, :r].t())
                     for a, b, r in zip(self.A.unbind(0), self.B.unbind(0), self.rank_list))
