"""Where a step's adapters come from: a library (held in an AdapterBank) or trainable skills.

Index legend: S = skills / sources, H = head views per source, r = rank.

The step plan asks an adapter source for four things, the same for inference and training:
``bind(router)`` (the router picks its adapters among the source's), ``slots(router)`` (bank
slots for the router's sources, pinned for the step, or None when they cannot all be resident:
the router then loads what it selects, :meth:`load_selected`), ``bank(path)`` (one module's
:class:`~quiver.kernels.LoraBank` for this step) and ``dropout(x)`` (identity at inference).

Head views (MHR's head splitting, see routing/mhr.py): for a router with ``head_splits = H``
the step routes over H·S views, view (h, s) being source s with A's columns outside block h of
d_in and B's rows outside block h of d_out zeroed (:func:`head_view`). A library source loads
them into the bank as adapters of their own (key ``"{key}#head{h}of{H}"``); trainable skills
compute them from the parameters in every step, so gradients flow to the skills.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quiver.kernels import LoraBank
from quiver.library import Library, LoraAdapter, LoraModule
from quiver.routing import AdapterSource, Router

from .bank import AdapterBank


def head_view(adapter: LoraAdapter, h: int, H: int) -> LoraAdapter:
    """Head view (h of H) of ``adapter``: block h of d_in in A and of d_out in B, zeros elsewhere."""
    modules = {}
    for path, m in adapter.modules.items():
        a, b = m.A.shape[1] // H, m.B.shape[0] // H
        A, B = torch.zeros_like(m.A), torch.zeros_like(m.B)
        A[:, h * a:(h + 1) * a] = m.A[:, h * a:(h + 1) * a]  # block h of d_in
        B[h * b:(h + 1) * b] = m.B[h * b:(h + 1) * b]  # block h of d_out
        modules[path] = LoraModule(A=A, B=B, alpha=m.alpha)
    return LoraAdapter(name=f"{adapter.name}-head{h}of{H}", base_model=adapter.base_model, modules=modules,
                       use_rslora=adapter.use_rslora, rank=adapter.rank, alpha=adapter.alpha)


def _view_loader(source: AdapterSource, h: int, H: int):
    return lambda: head_view(source.load(), h, H)


def view_sources(router: Router) -> list[AdapterSource]:
    """What the bank must hold for ``router``: its sources, or their H·S head views (h-major)."""
    H = router.head_splits
    if H == 1:
        return list(router.sources)
    return [AdapterSource(f"{s.key}#head{h}of{H}", _view_loader(s, h, H)) for h in range(H) for s in router.sources]


class LibrarySource:
    """A library's adapters (the RoutedModel's universe), loaded on demand into an AdapterBank."""

    def __init__(self, library: Library, universe: list[str], bank: AdapterBank):
        self.library, self.universe, self.bank = library, universe, bank
        self._bound: dict[int, list[AdapterSource]] = {}  # id(router) -> what the bank must hold for it

    def bind(self, router: Router) -> None:
        """Bind ``router`` to the universe once. The entry is held weakly: a router nobody uses
        any more (say, evicted from the server's router cache) is freed, and its entry is removed
        by its finaliser, which runs before its id can be given to a new object."""
        key = id(router)
        if key not in self._bound:
            router.bind(self.library, self.universe)
            self._bound[key] = view_sources(router)
            weakref.finalize(router, self._bound.pop, key, None)

    def begin_step(self) -> None:
        self.bank.begin_step()

    def end_step(self) -> None:
        self.bank.end_step()

    def slots(self, router: Router) -> tuple[Tensor | None, bool]:
        """Bank slots of the router's sources (pinned), and whether they are 0, 1, 2, ...;
        (None, False) when they cannot all be resident beside the step's other adapters."""
        needed = self._bound[id(router)]
        cap = self.bank.capacity
        if cap is not None and len({s.key for s in needed} | self.bank.pinned) > cap:
            return None, False  # the router loads what it selects
        slots = self.bank.ensure(needed)
        return slots, self.bank.slot_list(needed) == list(range(len(needed)))

    def load_selected(self, router: Router, local: Tensor) -> Tensor:
        """Slots for the router's sources it selected in ``local`` (-1 elsewhere), loaded and
        pinned for the rest of the step (:class:`~quiver.runtime.bank.CapacityError` if the
        step cannot hold them)."""
        needed = self._bound[id(router)]
        chosen = sorted(set(local[local >= 0].tolist()))
        table = torch.full((len(needed),), -1, dtype=torch.int64, device=self.bank.device)
        if chosen:
            table[chosen] = self.bank.ensure([needed[c] for c in chosen])
        return table

    @property
    def num_slots(self) -> int:
        return self.bank.num_slots

    def out_features(self, path: str) -> int:
        return self.bank.shapes[path][0]

    @property
    def keys(self) -> list[str | None]:
        return self.bank.keys

    def bank_of(self, path: str) -> LoraBank:
        return self.bank.banks[path]

    def dropout(self, x: Tensor) -> Tensor:
        return x


class TrainableSource(nn.Module):
    """Skills whose factors are tensors that train: the bank of a training step.

    Subclasses set ``names`` (the skills), ``paths`` (the wrapped linears), ``rank`` and
    implement :meth:`factors`; routers bind to the skills by name (this object answers the two
    library calls binding makes, ``require`` and ``get``). Every slot of the step's bank is a
    skill, then (for a router with ``head_splits = H > 1``) H·S head views at S + h·S + s.
    """

    names: list[str]
    paths: list[str]

    def factors(self, path: str) -> tuple[Tensor, Tensor]:
        """``A: [S, r, d_in]`` and ``B: [S, d_out, r]`` with the scaling folded into B."""
        raise NotImplementedError

    def snapshot(self, name: str) -> LoraAdapter:
        """Skill ``name`` as a LoraAdapter (detached copies)."""
        raise NotImplementedError

    def dropout(self, x: Tensor) -> Tensor:
        return x

    # -- what binding a router needs -------------------------------------------------------------
    def require(self, names: Sequence[str]) -> list[str]:
        missing = [n for n in names if n not in self.names]
        if missing:
            raise LookupError(f"no trainable skill named {missing}; skills: {self.names}")
        return list(names)

    def get(self, name: str) -> LoraAdapter:
        self.require([name])
        return self.snapshot(name)

    def bind(self, router: Router) -> None:
        if router.sources and all(s.key in self.names for s in router.sources):
            return
        router.bind(self, self.names)

    # -- the step --------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self.__dict__["_heads"] = 1

    def end_step(self) -> None:
        pass

    def slots(self, router: Router) -> tuple[Tensor, bool]:
        pos = [self.names.index(s.key) for s in router.sources]
        H = router.head_splits
        if H > 1:
            if self.__dict__.get("_heads", 1) not in (1, H):
                raise ValueError("one training step cannot mix routers of different head splits")
            self.__dict__["_heads"] = H
            S = len(self.names)
            pos = [S + h * S + p for h in range(H) for p in pos]
        device = next(self.parameters()).device
        return torch.tensor(pos, dtype=torch.int64, device=device), pos == list(range(len(pos)))

    def load_selected(self, router: Router, local: Tensor) -> Tensor:
        raise AssertionError("trainable skills are always resident")

    def out_features(self, path: str) -> int:
        return self.factors(path)[1].shape[1]

    @property
    def num_slots(self) -> int:
        S, H = len(self.names), self.__dict__.get("_heads", 1)
        return S if H == 1 else S + H * S

    @property
    def keys(self) -> list[str]:
        H = self.__dict__.get("_heads", 1)
        views = [f"{n}#head{h}of{H}" for h in range(H) for n in self.names] if H > 1 else []
        return list(self.names) + views

    def bank_of(self, path: str) -> LoraBank:
        A, B = self.factors(path)  # [S, r, d_in], [S, d_out, r]
        H = self.__dict__.get("_heads", 1)
        if H > 1:
            S, r, d_in = A.shape
            d_out = B.shape[1]
            m_in = torch.block_diag(*[torch.ones(1, d_in // H)] * H).to(A)  # [H, d_in]
            m_out = torch.block_diag(*[torch.ones(1, d_out // H)] * H).to(B)  # [H, d_out]
            A = torch.cat([A, (A[None] * m_in[:, None, None, :]).reshape(H * S, r, d_in)])
            B = torch.cat([B, (B[None] * m_out[:, None, :, None]).reshape(H * S, d_out, r)])
        ranks = torch.full((A.shape[0],), A.shape[1], dtype=torch.int32, device=A.device)
        return LoraBank(A, B, ranks)
