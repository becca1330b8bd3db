"""The step plan: everything a forward needs to route, built once before any layer runs.

Index legend: Bt = batch rows, S = sequence length, T = tokens of the step, R = requests,
k = slots per token, G = router groups.

The path of a request through the engine::

    requests ──► Engine.begin (pre-hook of the model's forward) ──► StepPlan
      routers per request,        token → request map [T] (left-padded rows or packed
      packed request_ids          sequences), requests grouped by router, bank slots
                                  resolved and pinned for the step
    layers ──► MixtureLinear: y = base(x) + plan.delta(x, path)
                 └─ per group: router.route(x[tokens], site) → local decision → bank slots
                    (siblings: router.route_siblings for this module and the later siblings)
                 └─ kernels.mixture_lora(x, bank, indices, weights, mode=...) per mixing mode
    tokens ◄── logits; Engine.end (post-hook) unpins the bank

Layers only read the plan. The bank is read-only during the step: every adapter a decision of
the step may point at was pinned when the plan was built, or (a router whose adapters cannot
all be resident) is loaded and pinned when the router selects it; a step that needs more than
the bank holds fails with :class:`~quiver.runtime.bank.CapacityError`.

Siblings: modules whose forward receives the same input tensor (q/k/v read the same hidden
states, gate/up the same normed ones) are consecutive calls with one ``x`` object; the plan
observes these runs and the engine keeps them (``Engine.siblings``, learned from the first
step). In later steps a router that ``fuses_siblings`` routes the first module of a run together
with the later ones, and the plan keeps their decisions until those modules run. A kept
decision is used only by the module it was made for, in the same step and group, and only when
that module receives the very tensor it was computed from (the same object, unmodified: its
version counter unchanged); anything else routes afresh. So fusing never changes which input a
decision is computed from, only how many calls compute it. Small steps (decoding: the gather
path, no gradient, one router) go further: the first sibling also computes the later siblings'
deltas in one fused gather (one shrink for all, see ``mixture_lora_gather_siblings``), kept
under the same rule and added into their outputs when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from quiver.kernels import build_meta, mixture_lora, native
from quiver.kernels.dispatch import BACKENDS, MODES, SMALL_SLOTS, needs_grad, resolve_backend, sync_free
from quiver.kernels.torch_ref import mixture_lora_gather_siblings
from quiver.routing import Router, RoutingDecision, RoutingSite


@dataclass
class Group:
    """The requests one router serves in this step."""

    index: int
    router: Router
    tokens: Tensor | None  # int64 [T_g]: the flat tokens of its requests; None = every token
    request_ids: Tensor  # int64 [T_g]: the request of each of those tokens
    slots: Tensor | None  # int64 [n]: router-local index -> bank slot; None = loads what it selects
    identity: bool = field(default=False)  # slots == arange: no translation needed

    @property
    def mode(self) -> str:
        return self.router.mode


class StepPlan:
    """One forward's routing (see the module docstring)."""

    def __init__(self, source, groups: list[Group], num_tokens: int, backend: str, trace=None,
                 siblings: dict[str, tuple[str, ...]] | None = None, native_calls: dict | None = None,
                 slot_maps: dict | None = None):
        self.source, self.groups, self.num_tokens = source, groups, num_tokens
        self.backend, self.trace = backend, trace
        self.siblings = siblings or {}  # path -> its run of modules sharing one input (learned)
        self._kept: dict[tuple[int, str], tuple[Tensor, int, RoutingDecision]] = {}  # (group, path) ->
        # (the input it was routed from, its version, the router-local decision)
        self._run: list[str] = []  # the current run of calls with one input object
        self._run_x: tuple[Tensor, int] | None = None
        self.runs: list[tuple[str, ...]] = []  # runs of >= 2 modules observed in this step
        self._kept_delta: dict[str, tuple[Tensor, int, Tensor]] = {}  # path -> (input, version, delta)
        self._static: dict[int, tuple[RoutingDecision, object]] = {}
        self._assembled: dict[tuple[int, ...], tuple[RoutingDecision, None]] = {}  # static groups' (see _assemble)
        self._orders: dict[tuple[int, ...], Tensor] = {}  # groups -> each token's row (_token_order)
        self._blocks: dict[tuple, tuple] = {}  # the static groups' stacked decisions (_static_block)
        self._modes = [m for m in MODES if any(g.mode == m for g in groups)]
        self._parts = {m: [g for g in groups if g.mode == m] for m in self._modes}  # groups per mixing mode
        self._impl: dict[tuple, object] = {}  # (mode, T·k, grad, dtype, device) -> backend function
        self._single = groups[0] if len(groups) == 1 and groups[0].tokens is None else None
        # prepared native calls kept across steps (see _native_gate_mixture), and the slot maps seen
        self.native_calls = native_calls if native_calls is not None else {}
        self.slot_maps = slot_maps if slot_maps is not None else {}
        self._slot_keys: dict[int, tuple] = {}  # group -> its slot map, this step
        self._native_step: bool | None = None  # the native kernel may serve this step (see _native_ok)

    def delta(self, x: Tensor, path: str, out: Tensor | None = None) -> Tensor:
        """The mixture's delta ``[T, d_out]`` for the module at ``path`` (x: ``[..., d_in]``).

        With ``out: [T, d_out]`` (the base layer's output, x's dtype) the delta is added into it
        in place and ``out`` returned — through a backend's accumulating form when it has one
        and no gradient is needed (see kernels/dispatch.py)."""
        flat = x.reshape(-1, x.shape[-1])  # [T, d_in]
        if flat.shape[0] != self.num_tokens:
            raise RuntimeError(f"{path} received {flat.shape[0]} tokens, the step plan has {self.num_tokens}")
        src = self._observe(x, path)
        xin = self.source.dropout(flat)
        if out is not None and src is not None and xin is flat and self._sibling_mixture(flat, path, src, out):
            return out
        total = out
        for mode in self._modes:
            if self._single is not None:
                decision, meta = self._decide(self._single, flat, path, src)
            else:
                decision, meta = self._assemble(flat, path, self._parts[mode], src)
            if self.source.num_slots == 0:  # nothing loaded, even after routing: no adapter is used
                if total is None:
                    total = flat.new_zeros(flat.shape[0], self.source.out_features(path))
                continue
            bank = self.source.bank_of(path)  # after routing: a selective router may have loaded
            if self.trace is not None:
                self.trace.record(path, x.shape[:-1], decision, self.source.keys)
            xb = xin if xin.dtype == bank.dtype else xin.to(bank.dtype)
            w = decision.weights if decision.weights.dtype == bank.dtype else decision.weights.to(bank.dtype)
            key = (mode, decision.indices.numel(), needs_grad(xb, bank, w), xb.dtype, xb.device)
            impls = self._impl.get(key)
            if impls is None:  # the first module of the step validates and picks the backend
                name = resolve_backend(xb, bank, w, decision.indices.numel(), self.backend, mode)
                d = mixture_lora(xb, bank, decision.indices, w, meta=meta, backend=name, mode=mode)
                self._impl[key] = (BACKENDS[name].impls[mode], None if key[2] else BACKENDS[name].accumulate.get(mode))
            elif total is not None and impls[1] is not None and total.dtype == xb.dtype:
                impls[1](xb, bank, decision.indices, w, meta, total)  # total += delta, in place
                continue
            else:  # the others call it directly: same mode, shapes of the same kind, same decision size
                d = impls[0](xb, bank, decision.indices, w, meta)
            d = d if d.dtype == x.dtype else d.to(x.dtype)
            total = d if total is None else total.add_(d) if total is out else total + d
        if total is None:  # no mode at all (a plan without groups)
            total = flat.new_zeros(flat.shape[0], self.source.out_features(path))
        return total

    def _observe(self, x: Tensor, path: str) -> tuple[Tensor, int] | None:
        """Extend or close the run of calls sharing ``x``; returns ``(x, version)`` to key kept
        decisions by, or None when ``x`` cannot be tracked (an inference tensor has no version)."""
        if x.is_inference():
            self._close_run()
            return None
        src = (x, x._version)
        if self._run_x is not None and self._run_x[0] is x and self._run_x[1] == src[1]:
            self._run.append(path)
        else:
            self._close_run()
            self._run, self._run_x = [path], src
        return src

    def _close_run(self) -> None:
        if len(self._run) > 1:
            self.runs.append(tuple(self._run))
        self._run, self._run_x = [], None

    def finish(self) -> list[tuple[str, ...]]:
        """End of the step: the sibling runs observed, and nothing kept alive."""
        self._close_run()
        self._kept.clear()
        self._kept_delta.clear()
        return self.runs

    def _sibling_mixture(self, flat: Tensor, path: str, src: tuple[Tensor, int], out: Tensor) -> bool:
        """``out += delta`` for ``path`` in one call with its later siblings, when it applies: a
        kept delta computed from this very input, or routing and mixing this module and its
        later siblings now — natively (a linear gate and its mixture, or one step-wide decision
        mixed into every sibling; a module without siblings is a group of one), else by the
        fused gather at decoding sizes. False when it does not apply (decisions routed here are
        then kept for the per-module path). The caller checks that the source's dropout is the
        identity."""
        kept = self._kept_delta.pop(path, None)
        if kept is not None and kept[0] is src[0] and kept[1] == src[1]:
            out.add_(kept[2])
            return True
        g, run = self._single, self.siblings.get(path)
        if self.trace is not None or self.source.num_slots == 0:
            return False
        if g is None:
            return self._groups_mixture(flat, path, run, src, out)
        if g.mode != "merge-after":
            return False
        if not g.router.per_token:  # one decision for every module: mix the siblings in one call
            return run is not None and self._native_siblings(flat, run[run.index(path):], g, src, out)
        if g.slots is None:
            return False
        if not g.router.fuses_siblings:
            run = None
        later = run[run.index(path):] if run is not None else (path,)
        if self._native_gate_mixture(flat, later, g, src, out):
            return True
        if run is None or flat.shape[0] > SMALL_SLOTS:
            return False
        banks = [self.source.bank_of(p) for p in later]
        b0 = banks[0]
        if any(b.max_rank != b0.max_rank or b.d_in != flat.shape[1] or b.dtype != flat.dtype
               or b.device != flat.device for b in banks) or out.dtype != flat.dtype:
            return False
        key = ("siblings", flat.shape[0], flat.dtype)
        name = self._impl.get(key)
        if name is not None and name != "gather":  # per module (e.g. the native kernel): _route
            return False  # routes the run together and keeps the later siblings' decisions
        decisions = g.router.route_siblings(flat, [RoutingSite(p, g.request_ids) for p in later])
        idx = torch.stack([d.indices for d in decisions])  # [M, T, k], router-local
        w = torch.stack([d.weights for d in decisions])  # [M, T, k]
        if name is None:
            name = self._impl[key] = resolve_backend(flat, b0, w, idx.shape[1] * idx.shape[2], self.backend)
        if name != "gather" or idx.shape[1] * idx.shape[2] > SMALL_SLOTS:
            for p, d in zip(later, decisions):  # routed anyway: the per-module path uses them
                self._kept[(g.index, p)] = (src[0], src[1], d)
            return False
        if not g.identity:
            idx = torch.where(idx >= 0, g.slots[idx.clamp_min(0)], -1)
        outs = self._sibling_outputs(flat, out, banks)
        mixture_lora_gather_siblings(flat, banks, idx, w if w.dtype == flat.dtype else w.to(flat.dtype), outs)
        self._keep_deltas(later, src, outs)
        return True

    def _native_gate_mixture(self, flat: Tensor, later: tuple[str, ...], g: Group, src: tuple[Tensor, int],
                             out: Tensor) -> bool:
        """Route ``later`` (this module and its later siblings) by the router's linear gate and
        mix them, in one native call (kernels/native.py ``GateMixtureCall``): ``out +=`` this
        module's delta, the later siblings' deltas kept. Float32 CPU inference steps whose
        backend resolves to ``native``; the same decisions and arithmetic as the gate call and
        the per-module native calls it replaces (tested against the reference). False when it
        does not apply.

        The prepared call is kept across steps (the engine's ``native_calls``, one per group of
        modules and backend) and reused while it was made from the very objects this step has:
        the gate (the same LinearGate, or one of the same weight, present mask, top-k and
        temperature), each module's bank (the bank makes new objects whenever its storage
        changes) and the group's slot map (compared by value once per step). A decoding step
        then does a few identity checks and the call itself per group, instead of preparing it
        again."""
        if not self._native_ok(flat, out):
            return False
        gate = g.router.linear_gate(later, flat.device, flat.dtype)
        if gate is None or gate.top_k > native.MAX_K:
            return False
        banks = [self.source.bank_of(p) for p in later]
        if torch.is_grad_enabled() and (flat.requires_grad or gate.weight.requires_grad
                                        or any(b.A.requires_grad or b.B.requires_grad for b in banks)):
            return False  # the native kernel has no backward
        if not self._runs_native("gate-mixture", flat, banks[0], gate.weight, flat.shape[0] * gate.top_k):
            return False
        key, slots = (later, self.backend), self._slot_key(g)
        kept = self.native_calls.get(key)
        call = kept[0] if kept is not None else None
        if (call is None or kept[1] is not slots or any(r() is not b for r, b in zip(call.banks, banks))
                or (kept[2] is not gate and (call.weight is not gate.weight or call.present is not gate.present
                                             or call.top_k != gate.top_k or call.temperature != gate.temperature
                                             or call.absolute != gate.absolute or call.screen is not gate.screen))):
            if not all(native.supports_bank(b) for b in banks):
                return False
            call = native.GateMixtureCall(flat.shape[1], gate.weight, gate.present, gate.absolute, gate.top_k,
                                          gate.temperature, None if g.identity else g.slots, banks, gate.screen)
            self.native_calls[key] = (call, slots, gate)
        outs = self._sibling_outputs(flat, out, banks)
        call(flat, outs)
        self._keep_deltas(later, src, outs)
        return True

    def _groups_mixture(self, flat: Tensor, path: str, run: tuple[str, ...] | None, src: tuple[Tensor, int],
                        out: Tensor) -> bool:
        """A step whose requests have different routers (a served batch mixing routings): every
        group's decisions for this module and its later siblings, assembled into one ``[M, T, k]``
        decision and mixed in one native call (``mixture_siblings_native``): ``out +=`` this
        module's delta, the later siblings' deltas kept. Per-token groups must be linear gates
        that route siblings together (Arrow: one logits GEMM and one top-k call over the group's
        tokens for all M modules); groups that decide once per step (fixed weights, one
        adapter, none) reuse that decision at every module. The decisions, slots and arithmetic
        are those of the per-module path (a token's row is computed as it is alone). Float32 CPU
        steps without gradients whose backend resolves to ``native``, all groups merge-after.
        False when it does not apply."""
        if self._modes != ["merge-after"] or not self._native_ok(flat, out) or (
                torch.is_grad_enabled() and flat.requires_grad):
            return False
        later = run[run.index(path):] if run is not None else (path,)
        parts = self._parts["merge-after"]
        gates = []
        for g in parts:
            gate = None
            if g.router.per_token:
                if g.slots is None or (len(later) > 1 and not g.router.fuses_siblings):
                    return False
                gate = g.router.linear_gate(later, flat.device, flat.dtype)
                if gate is None or gate.top_k > native.MAX_K or (torch.is_grad_enabled() and gate.weight.requires_grad):
                    return False
            gates.append(gate)
        banks = [self.source.bank_of(p) for p in later]
        if torch.is_grad_enabled() and any(b.A.requires_grad or b.B.requires_grad for b in banks):
            return False
        k = max(min(gate.top_k, gate.weight.shape[1] // len(later)) if gate is not None
                else self._decide(g, flat, path, src)[0].indices.shape[1] for g, gate in zip(parts, gates))
        if not self._runs_native("groups", flat, banks[0], flat, flat.shape[0] * k) or not all(
                native.supports_bank(b) for b in banks):
            return False
        M, dyn = len(later), [(g, gate) for g, gate in zip(parts, gates) if gate is not None]
        if dyn:
            block, order = self._static_block(parts, [g for g, gate in zip(parts, gates) if gate is None], dyn, flat,
                                              k, path, src)
            idx_parts, w_parts = [], []
            for g, gate in dyn:
                i, w = native.linear_gate_native(flat if g.tokens is None else flat.index_select(0, g.tokens),
                                                 gate.weight, gate.present, M, gate.absolute, gate.top_k,
                                                 gate.temperature, gate.screen)  # [M, T_g, k_g], router-local
                if not g.identity:
                    i = torch.where(i >= 0, g.slots[i.clamp_min(0)], -1)
                idx_parts.append(_pad_slots(i, k, -1))
                w_parts.append(_pad_slots(w.to(flat.dtype), k, 0))
            idx = torch.cat(idx_parts + [block[0].expand(M, -1, -1)], dim=1).index_select(1, order)
            w = torch.cat(w_parts + [block[1].expand(M, -1, -1)], dim=1).index_select(1, order)
        else:  # every group decides once per step: the per-module path's decision, kept for the step
            decision = self._assemble(flat, path, parts, src)[0]
            idx, w = decision.indices, decision.weights
        outs = self._sibling_outputs(flat, out, banks)
        native.mixture_siblings_native(flat, idx, w, banks, outs)
        self._keep_deltas(later, src, outs)
        return True

    def _slot_key(self, g: Group) -> tuple:
        """The group's slot map as a value, one object per distinct map (so that a prepared call
        made in an earlier step compares by identity; ``("identity",)`` for 0, 1, 2, ...).
        Computed once per step and group (a host read of a CPU tensor: this serves the CPU
        kernel only)."""
        hit = self._slot_keys.get(g.index)
        if hit is None:
            value = ("identity",) if g.identity else tuple(g.slots.tolist())
            if len(self.slot_maps) >= 1024:  # maps no longer in use: start afresh (calls made under
                self.slot_maps.clear()  # them no longer match and are prepared again)
            hit = self._slot_keys[g.index] = self.slot_maps.setdefault(value, value)
        return hit

    def _native_ok(self, flat: Tensor, out: Tensor) -> bool:
        """A float32 CPU step the native kernel can serve, adding into ``out`` (rows contiguous)."""
        if self._native_step is None:  # the backend allows it and the kernel is built: once per step
            self._native_step = self.backend in ("auto", "native") and native.available()
        return (self._native_step and flat.dtype == torch.float32 and flat.is_cpu and out.dtype == torch.float32
                and out.stride(-1) == 1 and (flat.shape[0] <= 1 or out.stride(0) == out.shape[1]))

    def _native_backend(self, kind: str, flat: Tensor, banks, weights: Tensor, slots: int, grad: bool) -> bool:
        """Whether ``auto`` (or the named backend) runs this call natively; cached per step."""
        return not grad and self._runs_native(kind, flat, banks[0], weights, slots) and all(
            native.supports_bank(b) for b in banks)

    def _runs_native(self, kind: str, flat: Tensor, bank, weights: Tensor, slots: int) -> bool:
        """Whether the step's backend resolves to ``native`` for a no-gradient call of this kind
        and token count (resolved once per step)."""
        key = (kind, flat.shape[0], False)
        name = self._impl.get(key)
        if name is None:
            name = self._impl[key] = resolve_backend(flat, bank, weights, slots, self.backend)
        return name == "native"

    @staticmethod
    def _sibling_outputs(flat: Tensor, out: Tensor, banks) -> list[Tensor]:
        """Where a group call writes: this module's base output, then a zero delta per later sibling."""
        return [out] + [flat.new_zeros(flat.shape[0], b.d_out) for b in banks[1:]]

    def _keep_deltas(self, later: tuple[str, ...], src: tuple[Tensor, int], outs: list[Tensor]) -> None:
        for p, d in zip(later[1:], outs[1:]):
            self._kept_delta[p] = (src[0], src[1], d)

    def _native_siblings(self, flat: Tensor, later: tuple[str, ...], g: Group, src: tuple[Tensor, int],
                         out: Tensor) -> bool:
        """A router with one decision per step (not per token): this module and its later
        siblings mixed in one native call (``mixture_siblings_native``), the later deltas kept.
        The same decision and arithmetic as the per-module native calls. False when it does not
        apply."""
        if not self._native_ok(flat, out):
            return False
        decision, _ = self._decide(g, flat, later[0], src)  # bank slots; kept for the step
        banks = [self.source.bank_of(p) for p in later]
        grad = needs_grad(flat, banks[0], decision.weights)
        if not self._native_backend("siblings-native", flat, banks, decision.weights, decision.indices.numel(), grad):
            return False
        outs = self._sibling_outputs(flat, out, banks)
        native.mixture_siblings_native(flat, decision.indices, decision.weights, banks, outs)
        self._keep_deltas(later, src, outs)
        return True

    def _route(self, g: Group, x: Tensor, path: str, src: tuple[Tensor, int] | None) -> RoutingDecision:
        """The router-local decision at ``path``: kept from a sibling's call, or routed now
        (with the later siblings, whose decisions are kept, when the router fuses them)."""
        run = self.siblings.get(path) if src is not None and g.router.fuses_siblings else None
        if run is None:
            return self._route_now(g, x, (path,))[0]
        kept = self._kept.pop((g.index, path), None)
        if kept is not None and kept[0] is src[0] and kept[1] == src[1]:
            return kept[2]
        later = run[run.index(path):]
        decisions = self._route_now(g, x, later)
        for p, d in zip(later[1:], decisions[1:]):
            self._kept[(g.index, p)] = (src[0], src[1], d)
        return decisions[0]

    def _route_now(self, g: Group, x: Tensor, paths: tuple[str, ...]) -> list[RoutingDecision]:
        """The router's decisions at ``paths`` (modules that read ``x``). A router that is a
        linear gate (Arrow) has its logits GEMM done by PyTorch and its abs / mask / top-k /
        softmax by the native C kernel, on float32 CPU steps without gradients when the step's
        backend is ``auto`` or ``native`` (one call instead of ~6 PyTorch ops: 2–4 µs each at
        decode, a third of the gate's time at prefill; the same decision, tested against the
        router's own); anything else asks the router."""
        if (self.backend in ("auto", "native") and x.device.type == "cpu" and x.dtype == torch.float32
                and native.available()):
            gate = g.router.linear_gate(paths, x.device, x.dtype)
            if (gate is not None and gate.top_k <= native.MAX_K
                    and not (torch.is_grad_enabled() and (x.requires_grad or gate.weight.requires_grad))):
                idx, w = native.linear_gate_native(x, gate.weight, gate.present, gate.modules, gate.absolute,
                                                   gate.top_k, gate.temperature, gate.screen)
                return [RoutingDecision(idx[m], w[m]) for m in range(len(paths))]
        if len(paths) == 1:
            return [g.router.route(x, RoutingSite(paths[0], g.request_ids))]
        return g.router.route_siblings(x, [RoutingSite(p, g.request_ids) for p in paths])

    def _assemble(self, flat: Tensor, path: str, parts: list[Group], src):
        """One ``[T, k]`` decision from the groups of one mixing mode (-1 where a group has no
        slot or the token is another mode's).

        The groups' decisions are padded to ``k`` slots, stacked in group order with one more
        row of -1 / 0 for the tokens no group of this mode covers, and put in token order by one
        gather (``_token_order``: where each token's row is, computed once per step); when every
        group decides once per step (fixed weights, one adapter, no adapter) the assembled
        decision is the same at every module and is kept for the step."""
        if len(parts) == 1 and parts[0].tokens is None:
            return self._decide(parts[0], flat, path, src)
        key = tuple(g.index for g in parts)
        hit = self._assembled.get(key)
        if hit is not None:
            return hit
        decisions = [self._decide(g, flat, path, src)[0] for g in parts]
        idx, w = _stack_decisions(decisions, max(d.indices.shape[1] for d in decisions), flat)
        order = self._token_order(key, parts, flat.shape[0], flat.device)
        assembled = RoutingDecision(idx.index_select(0, order), w.index_select(0, order)), None
        if all(not g.router.per_token for g in parts):
            self._assembled[key] = assembled
        return assembled

    def _static_block(self, parts: list[Group], static: list[Group], dyn: list, flat: Tensor, k: int, path: str,
                      src):
        """For :meth:`_groups_mixture` in a step with per-token groups (``dyn``), once per step: the
        groups that decide once per step, their decisions (bank slots) padded to ``k`` and
        stacked, with one more row of -1 / 0 for tokens no group covers; and each token's row in
        ``[per-token groups' rows..., that block]``."""
        key = ("static", tuple(g.index for g in parts), k)
        hit = self._blocks.get(key)
        if hit is None:
            decisions = [self._decide(g, flat, path, src)[0] for g in static]  # _decide keeps them for the step
            idx, w = _stack_decisions(decisions, k, flat)
            order = self._token_order(tuple(g.index for g, _ in dyn) + tuple(g.index for g in static),
                                      [g for g, _ in dyn] + static, flat.shape[0], flat.device)
            hit = self._blocks[key] = ((idx, w), order)
        return hit

    def _token_order(self, key: tuple[int, ...], parts: list[Group], T: int, device) -> Tensor:
        """int64 ``[T]``: token t's row in the groups' stacked decisions (the last row, -1 / 0,
        for a token none of ``parts`` covers). Once per step and set of groups."""
        order = self._orders.get(key)
        if order is None:
            covered = torch.cat([g.tokens for g in parts])  # groups partition the step's tokens
            order = torch.full((T,), covered.numel(), dtype=torch.int64, device=device)
            order[covered] = torch.arange(covered.numel(), device=device)
            self._orders[key] = order
        return order

    def _decide(self, g: Group, flat: Tensor, path: str, src=None):
        static = not g.router.per_token  # one decision per step, reused by every module
        if static and g.index in self._static:
            return self._static[g.index]
        x = flat if g.tokens is None else flat[g.tokens]
        local = self._route(g, x, path, src)
        if g.identity:
            decision = local
        else:
            table = g.slots if g.slots is not None else self.source.load_selected(g.router, local.indices)
            decision = RoutingDecision(torch.where(local.indices >= 0, table[local.indices.clamp_min(0)], -1),
                                       local.weights)
        meta = None
        if static and g.tokens is None and decision.indices.numel() > SMALL_SLOTS:
            # exact on the CPU (host loops); on CUDA bounds, so the step reads nothing back
            meta = build_meta(decision.indices, decision.weights, self.source.num_slots,
                              exact=not sync_free(decision.indices.device))
        if static:
            self._static[g.index] = (decision, meta)
        return decision, meta


def _pad_slots(t: Tensor, k: int, value) -> Tensor:
    """``t: [..., k_g]`` (a decision's indices or weights) widened to ``k`` slots with ``value``."""
    return t if t.shape[-1] == k else torch.cat([t, t.new_full((*t.shape[:-1], k - t.shape[-1]), value)], dim=-1)


def _stack_decisions(decisions: list[RoutingDecision], k: int, flat: Tensor) -> tuple[Tensor, Tensor]:
    """Groups' decisions padded to ``k`` slots and stacked (indices int64, weights in ``flat``'s
    dtype), with one more row of -1 / 0 for the tokens no group covers: ``[Σ T_g + 1, k]``."""
    idx = torch.cat([_pad_slots(d.indices, k, -1) for d in decisions]
                    + [torch.full((1, k), -1, dtype=torch.int64, device=flat.device)])
    w = torch.cat([_pad_slots(d.weights.to(flat.dtype), k, 0) for d in decisions] + [flat.new_zeros(1, k)])
    return idx, w


class Engine:
    """What a wrapped model's layers share: the adapter source, the default router, the
    current plan. The RoutedModel's forward pre-hook calls :meth:`begin`, its post-hook
    :meth:`end`."""

    def __init__(self, source, router: Router, backend: str = "auto"):
        self.source, self.router, self.backend = source, router, backend
        self.plan: StepPlan | None = None
        self.trace = None
        self.requests: list[Router | None] | None = None  # router per request (None: default)
        self.request_ids: Tensor | None = None  # packed sequences: the request of each token
        self.siblings: dict[str, tuple[str, ...]] = {}  # path -> modules that read the same input
        self.native_calls: dict = {}  # prepared native group calls, kept across steps (StepPlan)
        self.slot_maps: dict[tuple, tuple] = {}  # one object per slot map seen (their identity keys those calls)

    def begin(self, shape: tuple[int, ...], device) -> StepPlan:
        """Build the plan for an input of ``shape`` ``[Bt, S]`` (ids) or ``[Bt, S, d]``."""
        Bt, S = shape[0], shape[1] if len(shape) > 1 else 1
        T = Bt * S
        routers = self.requests
        if self.request_ids is not None:
            rid = self.request_ids.reshape(-1).to(device)
            if rid.numel() != T:
                raise ValueError(f"request_ids covers {rid.numel()} tokens, the input holds {T}")
            n_req = len(routers) if routers is not None else int(rid.max()) + 1 if T else 0
            if T and (int(rid.min()) < 0 or int(rid.max()) >= n_req):
                raise ValueError(f"request_ids must lie in [0, {n_req}); got [{int(rid.min())}, {int(rid.max())}]")
        else:
            n_req = len(routers) if routers is not None else Bt
            if n_req == 0 or Bt % n_req:
                raise ValueError(f"{n_req} routers for a batch of {Bt} rows")
            per = Bt // n_req  # beams / return sequences are contiguous rows of one request
            rid = (torch.arange(Bt, device=device) // per).repeat_interleave(S)  # [T]
        chosen = [self.router] * max(n_req, 1) if routers is None else [r or self.router for r in routers]
        order: dict[int, int] = {}
        for r in chosen:
            order.setdefault(id(r), len(order))
        unique = list({id(r): r for r in chosen}.values())
        self.source.begin_step()
        try:
            groups = []
            if len(unique) > 1:
                of_token = torch.tensor([order[id(r)] for r in chosen], device=device)[rid]  # [T]: group
            for gi, router in enumerate(unique):
                self.source.bind(router)
                if len(unique) == 1:
                    tokens, g_rid = None, rid
                else:
                    tokens = torch.nonzero(of_token == gi).squeeze(1)  # [T_g]
                    g_rid = rid[tokens]
                groups.append(Group(gi, router, tokens, g_rid, None))
            for g in groups:  # resolve (and pin) after binding, in request order
                g.slots, g.identity = self.source.slots(g.router)
        except BaseException:
            self.source.end_step()
            raise
        self.plan = StepPlan(self.source, groups, T, self.backend, self.trace, self.siblings,
                             self.native_calls, self.slot_maps)
        return self.plan

    def end(self) -> None:
        if self.plan is not None:
            for run in self.plan.finish():  # siblings seen in this step: fused from the next one
                if any(self.siblings.get(p) != run for p in run):
                    self.siblings.update(dict.fromkeys(run, run))
        self.plan = None
        self.source.end_step()
