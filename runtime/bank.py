"""AdapterBank: the active adapters' factors for every adapted module, on the model's device.

Index legend: C = slots (capacity), R = largest rank held, E = slots in use.

An adapter occupies one *slot* across all modules (slot s of module m's bank is that adapter's
factors at m, rank 0 where it does not adapt m). Per module the storage is ``A: [C, R, d_in]``
and ``B: [C, d_out, R]`` with the adapter's scaling folded into B, as the kernels expect; B is
held as the transposed view of a contiguous ``[C, R, d_out]`` tensor, so that gathering a few
adapters' B (the decode path) copies contiguous rows, and the grouped path's ``B_e^T`` views
are contiguous.
Adapters are loaded on demand (by key, from an :class:`AdapterSource`); with a ``capacity`` the
least recently used adapter that is not **pinned** is evicted when the bank is full. Without
one the bank grows (doubling its slots) as adapters arrive.

Pinning makes the bank read-only for a step: between :meth:`begin_step` and :meth:`end_step`
every adapter loaded or touched with ``ensure`` stays resident, so no decision of the step can
point at a slot that was reused. When a step needs more adapters at once than the capacity,
``ensure`` raises :class:`CapacityError` naming the numbers — never a silent wrong result. With
a capacity, the slot storage is allocated at the full capacity on the first load, so the
number of slots (E in the kernels' metadata) does not change within a step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from quiver.kernels import LoraBank
from quiver.routing import AdapterSource


class CapacityError(RuntimeError):
    """One step needs more adapters resident at once than the bank's capacity."""


class AdapterBank:
    def __init__(self, modules: dict[str, tuple[int, int]], *, capacity: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if capacity is not None and capacity < 1:
            raise ValueError(f"bank capacity must be >= 1, got {capacity}")
        self.shapes = dict(modules)  # path -> (d_out, d_in)
        self.capacity, self.device, self.dtype = capacity, torch.device(device), dtype
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recent first
        self._free: list[int] = []
        self._slots = 0  # C
        self._rank = 0  # R
        self._A: dict[str, Tensor] = {}
        self._B: dict[str, Tensor] = {}
        self._ranks: dict[str, Tensor] = {}
        self._host_ranks: dict[str, list[int]] = {}  # the same ranks on the host (no device reads)
        self.banks: dict[str, LoraBank] = {}
        self.loads = 0  # adapters loaded so far (evictions make this exceed the slot count)
        self._pinned: set[str] | None = None  # keys held for the current step (None: no step)

    def __contains__(self, key: str) -> bool:
        return key in self._slot_of

    @property
    def num_slots(self) -> int:
        """Slots allocated (E of the kernels' banks), free ones included."""
        return self._slots

    @property
    def keys(self) -> list[str | None]:
        """Slot -> key (None for a free slot)."""
        out: list[str | None] = [None] * self._slots
        for key, slot in self._slot_of.items():
            out[slot] = key
        return out

    def slot_list(self, sources: Sequence[AdapterSource]) -> list[int]:
        """The slots of resident ``sources``, on the host."""
        return [self._slot_of[s.key] for s in sources]

    def begin_step(self) -> None:
        """Start pinning: everything ``ensure`` returns stays resident until :meth:`end_step`."""
        self._pinned = set()

    def end_step(self) -> None:
        self._pinned = None

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned or ())

    def ensure(self, sources: Sequence[AdapterSource]) -> Tensor:
        """Load whatever is missing; returns int64 ``[len(sources)]`` slots on the device.

        Inside a step the sources are pinned until it ends; what cannot be held together with
        the step's other pinned adapters raises :class:`CapacityError`.
        """
        keys = list(dict.fromkeys(s.key for s in sources))
        held = set(keys) | (self._pinned or set())
        if self.capacity is not None and len(held) > self.capacity:
            new = [k for k in keys if k not in (self._pinned or set())]
            raise CapacityError(
                f"this step needs {len(held)} adapters resident at once, more than the bank capacity "
                f"{self.capacity} ({len(self._pinned or ())} already held for the step, {len(new)} more "
                f"requested: {', '.join(new[:6])}{' ...' if len(new) > 6 else ''}); raise the capacity "
                "or split the batch")
        loaded = False
        for s in sources:
            if s.key in self._slot_of:
                self._slot_of.move_to_end(s.key)
            else:
                self._load(s, held)
                loaded = True
        if self._pinned is not None:
            self._pinned.update(keys)
        if loaded:
            self._rebuild()  # once per call, not per adapter: it builds one view per module
        return torch.tensor(self.slot_list(sources), dtype=torch.int64, device=self.device)

    def _load(self, source: AdapterSource, pinned: set[str]) -> None:
        adapter = source.load()
        extra = sorted(set(adapter.modules) - set(self.shapes))
        if extra:
            raise ValueError(f"adapter {source.key!r} adapts modules this model was not wrapped for "
                             f"(e.g. {extra[:3]}); include it in the RoutedModel's adapters")
        rank = max(m.rank for m in adapter.modules.values())
        slot = self._take_slot(pinned)
        if rank > self._rank:
            self._resize(self._slots, rank)
        for path in self.shapes:
            m = adapter.modules.get(path)
            if m is None:
                self._ranks[path][slot] = 0
                self._host_ranks[path][slot] = 0
                continue
            r = m.rank
            self._A[path][slot, :r] = m.A.to(self.device, self.dtype)
            self._B[path][slot, :, :r] = (m.B.to(self.device, torch.float32) * adapter.scaling(path)).to(self.dtype)
            self._ranks[path][slot] = r
            self._host_ranks[path][slot] = r
        self._slot_of[source.key] = slot
        self.loads += 1

    def _take_slot(self, pinned: set[str]) -> int:
        if self._free:
            return self._free.pop()
        if self.capacity is None or self._slots < self.capacity:
            new = max(1, self._slots * 2) if self.capacity is None else self.capacity
            first = self._slots
            self._resize(new, max(self._rank, 1))
            self._free = list(range(new - 1, first, -1))
            return first
        for key in self._slot_of:  # least recently used first
            if key not in pinned:
                return self._slot_of.pop(key)
        raise CapacityError(f"all {self.capacity} bank slots hold adapters this step needs")

    def _resize(self, slots: int, rank: int) -> None:
        """Grow storage to ``slots`` × ``rank``, keeping what is stored."""
        for path, (d_out, d_in) in self.shapes.items():
            A = torch.zeros(slots, rank, d_in, device=self.device, dtype=self.dtype)
            B = torch.zeros(slots, rank, d_out, device=self.device, dtype=self.dtype).transpose(1, 2)
            ranks = torch.zeros(slots, dtype=torch.int32, device=self.device)
            if self._slots:
                A[: self._slots, : self._rank] = self._A[path]
                B[: self._slots, :, : self._rank] = self._B[path]
                ranks[: self._slots] = self._ranks[path]
            self._A[path], self._B[path], self._ranks[path] = A, B, ranks
            self._host_ranks[path] = self._host_ranks.get(path, []) + [0] * (slots - self._slots)
        self._slots, self._rank = slots, rank

    def _rebuild(self) -> None:
        # New LoraBank views over the same storage (their cached host-side rank lists are
        # per object, so a fresh object sees the new ranks).
        self.banks = {p: LoraBank(self._A[p], self._B[p], self._ranks[p].clone(), tuple(self._host_ranks[p]))
                      for p in self.shapes}

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._A, self._B) for t in d.values())
