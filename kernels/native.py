"""The native CPU backend: ``native_mixture.c`` compiled at first use, called through ctypes.

Four entry points: :func:`mixture_lora_native` (the mixture delta), :func:`linear_gate_native`
(a linear router's gate and top-k softmax, e.g. Arrow's), :func:`gate_mixture_native` (both, for
sibling modules that read one input, in one call) and :func:`mixture_siblings_native` (one
decision mixed into sibling modules, in one call). The gate of the second and third can be
screened, at decoding sizes by an int8 pass and at prefill sizes by a bfloat16 GEMM
(routing.base.GateScreen): the same decisions.

Why not a PyTorch extension: the kernel needs no PyTorch headers (raw float32 pointers and
strides), so a plain ``cc -O3 -march=native -fopenmp-simd -shared`` builds it in about a
second, with no ninja and no torch headers, and ctypes calls it without pybind. The shared
object goes to ``$QUIVER_CACHE/native/`` under a name that hashes the source, the flags and this
CPU's instruction-set flags (so a cache shared by different machines never loads a binary built
for another CPU); it is written to a temporary file and renamed into place, so concurrent first
uses never see half a file.

When it cannot be built (no C compiler, ``QUIVER_NATIVE=0``, a build error), the backend is
unavailable and the dispatcher uses the PyTorch paths; :func:`unavailable` says why (and the
reason is logged once). Float32 on the CPU only, without autograd (inference: the registry
declares ``autograd=False``, so a call that needs gradients never lands here).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch
from torch import Tensor

from .bank import LoraBank

log = logging.getLogger("quiver.kernels")
SOURCE = Path(__file__).with_name("native_mixture.c")
MAX_RANK = 1024  # QV_MAX_RANK in the C source
MAX_K = 64  # QV_MAX_K in the C source
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp-simd"], ["-O3", "-fopenmp-simd"], ["-O3"])

_state: dict = {}  # "fn" / "gate": the loaded functions, or "why": the reason there are none


def _cpu_signature() -> str:
    """What a binary built with -march=native depends on: the machine and its ISA flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    from quiver.library.base_model import default_cache_dir

    return default_cache_dir() / "native"


def _build(cc: str) -> Path:
    """The shared object for this source and CPU, compiled now unless already cached."""
    src = SOURCE.read_bytes()
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        tag = hashlib.sha256(src + repr(flags).encode() + _cpu_signature().encode()).hexdigest()[:16]
        target = out_dir / f"mixture-{tag}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-300:]}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise RuntimeError("; ".join(errors))


def _load():
    if "fn" in _state or "why" in _state:
        return _state.get("fn")
    why = None
    if os.environ.get("QUIVER_NATIVE", "1") == "0":
        why = "disabled by QUIVER_NATIVE=0"
    else:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            why = "no C compiler found (set CC, or install gcc or clang)"
        else:
            try:
                so = ctypes.CDLL(str(_build(cc)))
                fn, gate = so.quiver_mixture_f32, so.quiver_topk_softmax_f32
                fused, siblings = so.quiver_gate_mixture_f32, so.quiver_mixture_siblings_f32
                screened, screened_fused = so.quiver_screened_gate_f32, so.quiver_screened_gate_mixture_f32
                to_bf16, width, group = so.quiver_to_bf16, so.quiver_vector_width, so.quiver_i8_group
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                why = f"building {SOURCE.name} with {cc} failed: {e}"
    if why is not None:
        _state["why"] = why
        log.warning("native CPU mixture backend unavailable (%s); using the PyTorch paths", why)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64]
    fn.restype = i64
    gate.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, i64, ctypes.c_float, ptr, ptr]
    gate.restype = i64
    fused.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, ctypes.c_float, ptr, ptr, ptr]
    fused.restype = i64
    siblings.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr]
    siblings.restype = i64
    f32 = ctypes.c_float
    screen_args = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, f32, i64, i64, ptr, i64, i64, f32]
    screened.argtypes = screen_args + [ptr, ptr, ptr]
    screened.restype = i64
    screened_fused.argtypes = screen_args + [ptr, ptr, ptr, ptr]
    screened_fused.restype = i64
    to_bf16.argtypes, to_bf16.restype = [ptr, i64, i64, i64, ptr, ptr], None
    width.argtypes, width.restype = [], i64
    group.argtypes, group.restype = [], i64
    _state.update(fn=fn, gate=gate, fused=fused, siblings=siblings, screened=screened, screened_fused=screened_fused,
                  to_bf16=to_bf16, width=width(), i8_group=group())
    return fn


def available() -> bool:
    """Whether the native kernel is built and loaded (building it on the first call)."""
    return _load() is not None


def unavailable() -> str | None:
    """Why the native backend cannot run here, or None when it can."""
    _load()
    return _state.get("why")


def mixture_lora_native(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor,
                        out: Tensor | None = None) -> Tensor:
    """``out += delta`` (or a new ``delta: [T, d_out]`` when ``out`` is None), float32 on the CPU:
    the semantics of :func:`quiver.kernels.torch_ref.mixture_lora_reference`, in one C call.
    An index outside ``[-1, E)`` raises ``ValueError`` before anything is written."""
    # x: [T, d_in], indices / weights: [T, k], out: [T, d_out]
    fn = _load()
    if fn is None:
        raise RuntimeError(f"the native mixture backend is unavailable: {_state['why']}")
    if bank.max_rank > MAX_RANK:  # the kernel's per-slot buffer is MAX_RANK floats: rare, so the gather path
        from .torch_ref import mixture_lora_gather

        return mixture_lora_gather(x, bank, indices, weights, out=out)
    T, k = indices.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    idx = indices if indices.dtype == torch.int64 and indices.is_contiguous() else indices.to(torch.int64).contiguous()
    w = weights if weights.dtype == torch.float32 and weights.is_contiguous() else weights.float().contiguous()
    A = bank.A if bank.A.stride(-1) == 1 else bank.A.contiguous()
    B, ranks = bank.B, bank.ranks if bank.ranks.is_contiguous() else bank.ranks.contiguous()
    if out is None:
        out = torch.zeros(T, bank.d_out, dtype=torch.float32)
    elif out.stride(-1) != 1:
        raise ValueError("the native backend adds into an output whose last dimension is contiguous")
    rc = fn(x.data_ptr(), T, bank.d_in, x.stride(0), idx.data_ptr(), w.data_ptr(), k,
            A.data_ptr(), A.stride(0), A.stride(1),
            B.data_ptr(), B.stride(0), B.stride(1), B.stride(2),
            ranks.data_ptr(), bank.num_adapters, out.data_ptr(), bank.d_out, out.stride(0))
    if rc == -1:
        raise MemoryError(f"the native mixture could not allocate its sort buffers ({T * k} slots, "
                          f"{bank.num_adapters} adapters)")
    if rc:
        bad = int(idx.reshape(-1)[rc - 1])
        raise ValueError(f"routing index {bad} outside [-1, {bank.num_adapters})")
    return out


# A gate with a screen (routing.base.GateScreen) decides T tokens over E adapters per module from
# a first pass in fewer bits, then the float32 logits of the columns its bound keeps (C source,
# quiver_screened_gate_f32): the float32 decision either way.
# - int8, for T <= SCREEN_I8_MAX_TOKENS (decoding steps): a decoding step's gates stream the
#   prototypes from memory once per step (E=256 at SmolLM2's shapes: 153 MB in float32), and the
#   int8 pass streams about a third of that. Arrow's gates of a whole SmolLM2 step, one thread
#   (bench/runtime.py --gate-screen), float32 GEMM → int8 pass: E=256 1 token 14.4 → 8.0 ms,
#   8 tokens 26.2 → 15.6, 16 tokens 30.0 → 26.5; E=128 16 tokens 14.7 → 16.6 (a loss); from 64
#   tokens the int8 pass takes twice the GEMM's time.
# - bfloat16, when T·E >= SCREEN_MIN_WORK on CPUs with bfloat16 matrix units (AMX): one bfloat16
#   GEMM. Below that its fixed cost (rounding x, the GEMM's set-up, the kept columns) exceeds what
#   it saves. Float32 GEMM → screened, E=256: 1,024 tokens 641 → 318 ms, 256 tokens 187 → 126,
#   128 tokens 92 → 85, 64 tokens 54 → 59; E=128 1,024 tokens 335 → 229, 256 tokens 97 → 88,
#   128 tokens 54 → 63; E=64 1,024 tokens 201 → 199.
# Between the two, and without a vector unit, the float32 GEMM decides.
SCREEN_MIN_WORK = 32768
SCREEN_I8_MAX_TOKENS = 8
SCREEN = True  # False: every gate takes the float32 GEMM (benchmarks compare the two)
_BF16_U = 2.0**-8  # bfloat16's unit roundoff (round to nearest even): the GEMM output's relative rounding
_EXACT = ctypes.c_int64(0)  # the candidates computed in float32, summed by the C side
_screen_counts = {"calls": 0, "columns": 0, "i8": 0}


def screen_stats() -> dict:
    """Screened gate calls (``i8`` of them by the int8 pass), the columns they decided over and
    how many of those were computed in float32, since the process started (diagnostics:
    benchmarks print the fraction)."""
    return {**_screen_counts, "exact": _EXACT.value}


def _bf16_gemm_fast() -> bool:
    """Whether PyTorch's bfloat16 GEMM runs on matrix units here (AMX tiles)."""
    if "amx" not in _state:
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        _state["amx"] = bool(probe and probe())
    return _state["amx"]


def _check_screen(screen, d: int, N: int) -> None:
    """Raise unless ``screen`` (routing.base.GateScreen) is laid out as the C side reads it, for a
    gate weight of ``[d, N]``. The native backend must be loaded (the int8 group size is its)."""
    if (screen.rows.shape != (N, d) or screen.q.shape != (N, d) or not screen.rows.is_contiguous()
            or screen.rows.dtype != torch.float32 or screen.q.dtype != torch.int8 or not screen.q.is_contiguous()
            or screen.qscale.shape != (N, -(-d // _state["i8_group"])) or screen.qerr.shape != (N,)
            or (screen.low is not None and (screen.low.shape != (N, d) or screen.err.shape != (N,)
                                            or screen.norm.shape != (N,)))):
        raise ValueError(f"a gate screen of {tuple(screen.rows.shape)} rows for a weight of {(d, N)}")


def _screen_args(x: Tensor, weight: Tensor, screen, modules: int, checked: bool = False) -> tuple | None:
    """The C arguments of the screened decision for ``x`` from the first pass this step takes
    (``low_sim``, its row stride, ``q``, ``qscale``, ``rows``, ``err``, ``norm``, ``dx``, ``rel``;
    the tensors behind the pointers last, to keep them alive), or None where the float32 GEMM
    decides: no screen, ``SCREEN`` off, or a size neither pass is for here (see above). ``x``:
    float32 with contiguous rows; ``checked``: the caller has already checked the screen against
    this weight (a prepared call does it once, not at every step)."""
    T, d = x.shape
    N = weight.shape[1]
    if screen is None or not SCREEN or _load() is None:
        return None
    bf16 = T * (N // modules) >= SCREEN_MIN_WORK and screen.low is not None and _bf16_gemm_fast()
    if not bf16 and not (T <= SCREEN_I8_MAX_TOKENS and _state["width"] > 0):
        return None
    if not checked:
        _check_screen(screen, d, N)
    _screen_counts["calls"] += 1
    _screen_counts["columns"] += T * N
    if not bf16:
        _screen_counts["i8"] += 1
        return (None, 0, screen.q.data_ptr(), screen.qscale.data_ptr(), screen.rows.data_ptr(),
                screen.qerr.data_ptr(), None, None, 0.0, ())
    xl, dx = torch.empty(T, d, dtype=torch.bfloat16), torch.empty(T, dtype=torch.float32)
    _state["to_bf16"](x.data_ptr(), T, d, x.stride(0), xl.data_ptr(), dx.data_ptr())  # and ||x_t - xl_t||
    sim = torch.mm(xl, screen.low.T)  # [T, N] bfloat16 (float32 accumulation, rounded once on output)
    return (sim.data_ptr(), sim.stride(0), None, None, screen.rows.data_ptr(), screen.err.data_ptr(),
            screen.norm.data_ptr(), dx.data_ptr(), _BF16_U / (1 - _BF16_U), (sim, dx))


def linear_gate_native(x: Tensor, weight: Tensor, present: Tensor | None, modules: int, absolute: bool,
                       top_k: int, temperature: float, screen=None) -> tuple[Tensor, Tensor]:
    """A linear router's decision at ``modules`` modules reading ``x: [T, d_in]``, float32 on
    the CPU: the semantics of :meth:`quiver.routing.base.LinearGate.route` (``weight: [d_in, M·E]``,
    ``present: bool [M, E]`` or None): the logits by one PyTorch GEMM, then abs, mask, top-k and
    softmax in one C call; or, for a gate with a ``screen`` (routing.base.GateScreen) at the sizes
    its passes are for, the same decision from an int8 pass or a bfloat16 GEMM screened by a bound
    (:func:`_screen_args`).
    Returns ``indices int64 [M, T, k']`` and ``weights float32 [M, T, k']`` with
    ``k' = min(top_k, E)``."""
    if _load() is None:
        raise RuntimeError(f"the native backend is unavailable: {_state['why']}")
    T = x.shape[0]
    N = weight.shape[1]
    E = N // modules
    k = min(top_k, E)
    if not 1 <= k <= MAX_K or N != modules * E or weight.shape[0] != x.shape[1]:
        raise ValueError(f"linear_gate_native: top_k {top_k} outside [1, {MAX_K}] or gate weight "
                         f"{tuple(weight.shape)} not [{x.shape[1]}, {modules} modules × E]")
    pres = None if present is None else present.bool().contiguous()  # one byte per element, as the C side reads it
    idx = torch.empty(modules, T, k, dtype=torch.int64)
    w = torch.empty(modules, T, k, dtype=torch.float32)
    if screen is not None and x.stride(-1) != 1:
        x = x.contiguous()  # the screened path reads rows of x
    screened = _screen_args(x, weight, screen, modules)
    if screened is not None:
        rc = _state["screened"](x.data_ptr(), T, x.shape[1], x.stride(0), *screened[:9], modules, E,
                                None if pres is None else pres.data_ptr(), int(absolute), k, float(temperature),
                                idx.data_ptr(), w.data_ptr(), ctypes.byref(_EXACT))
        if rc == -1:
            raise MemoryError(f"linear_gate_native: no memory for the screen's buffers ({T} tokens)")
        if rc:
            raise RuntimeError(f"linear_gate_native: the screened decision returned {rc}")
        return idx, w
    sim = x @ weight  # [T, M·E]
    if T:
        _state["gate"](sim.data_ptr(), T, sim.stride(0), modules, E, None if pres is None else pres.data_ptr(),
                       int(absolute), k, float(temperature), idx.data_ptr(), w.data_ptr())
    return idx, w


_DESC = 10  # QV_DESC in the C source: the int64 fields per module
# bank -> its fields for the C side (empty when the kernel cannot take it). A LoraBank's tensors
# never change (the runtime makes a new object when its storage changes), so they are computed
# once per object; weak keys, so a dropped bank leaves nothing behind.
_FIELDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# tuple of bank ids -> (weak references to those banks, their ctypes desc array): the references
# tell a live entry from one whose ids were reused by new objects
_DESCS: dict[tuple[int, ...], tuple[list, object]] = {}


def supports_bank(b: LoraBank) -> bool:
    """Whether :func:`gate_mixture_native` takes this bank (float32 on the CPU, rows of A
    contiguous, int32 ranks, ranks up to MAX_RANK)."""
    return bool(_bank_fields(b))


def _bank_fields(b: LoraBank) -> list[int]:
    fields = _FIELDS.get(b)
    if fields is None:
        A, B, ranks = b.A, b.B, b.ranks
        ok = (b.max_rank <= MAX_RANK and A.dtype == B.dtype == torch.float32 and A.device.type == "cpu"
              and A.stride(-1) == 1 and ranks.is_contiguous() and ranks.dtype == torch.int32)
        fields = _FIELDS[b] = [A.data_ptr(), A.stride(0), A.stride(1), B.data_ptr(), B.stride(0), B.stride(1),
                               B.stride(2), ranks.data_ptr(), b.num_adapters, b.d_out] if ok else []
    return fields


def gate_mixture_native(x: Tensor, weight: Tensor, present: Tensor | None, absolute: bool, top_k: int,
                        temperature: float, slots: Tensor | None, banks: list[LoraBank], outs: list[Tensor],
                        screen=None) -> None:
    """``outs[m] += delta_m`` for M modules reading ``x: [T, d_in]``, each routed by a linear gate
    (``weight: [d_in, M·E]``, ``present``, ``absolute``, ``top_k``, ``temperature`` as in
    :func:`linear_gate_native`) and mixed as :func:`mixture_lora_native` mixes, from ``banks[m]``;
    ``slots: int64 [E]`` maps the gate's positions to bank slots (None: the same). Float32 on the
    CPU, one C call after the logits GEMM. ``outs[m]``: ``[T, d_out_m]`` with contiguous rows.
    Equal, module by module, to :func:`linear_gate_native` then :func:`mixture_lora_native`.
    (:class:`GateMixtureCall` is this call prepared once for repeated use.)"""
    GateMixtureCall(x.shape[1], weight, present, absolute, top_k, temperature, slots, banks, screen)(x, outs)


class GateMixtureCall:
    """:func:`gate_mixture_native` with everything but the input and the outputs checked and
    described once: the gate (``weight``, ``present``, ``absolute``, ``top_k``, ``temperature``),
    the slot map and the banks, for inputs of width ``d_in``. Calling it with ``x`` and ``outs``
    does the per-call work only (their checks, the logits GEMM, one C call): what a decoding step
    repeats at every group of sibling modules, where the Python around a ~10 µs C call was most of
    the cost. It holds its banks by weak reference (``banks``: one ``weakref.ref`` per module), so
    a call kept for later does not keep a replaced bank's storage alive; calling it after one of
    them was freed raises. The step planner keeps one per group of modules and reuses it while
    the step's banks, gate and slots are the very objects it was made from (runtime/plan.py)."""

    __slots__ = ("d_in", "weight", "present", "absolute", "top_k", "temperature", "slots", "banks", "desc",
                 "d_outs", "M", "E", "k", "_fn", "_ptrs", "screen")

    def __init__(self, d_in: int, weight: Tensor, present: Tensor | None, absolute: bool, top_k: int,
                 temperature: float, slots: Tensor | None, banks: list[LoraBank], screen=None):
        if _load() is None:
            raise RuntimeError(f"the native backend is unavailable: {_state['why']}")
        M, N = len(banks), weight.shape[1]
        E = N // M if M else 0
        k = min(top_k, E)
        if not M or not 1 <= k <= MAX_K or N != M * E or weight.shape[0] != d_in:
            raise ValueError(f"gate_mixture_native: top_k {top_k} outside [1, {MAX_K}], or gate weight "
                             f"{tuple(weight.shape)} not [{d_in}, {M} modules × E]")
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"gate_mixture_native: a float32 CPU gate wanted, got {weight.dtype} on {weight.device}")
        self.d_in, self.M, self.E, self.k = d_in, M, E, k
        self.weight, self.absolute, self.top_k, self.temperature = weight, bool(absolute), top_k, float(temperature)
        self.present, self.slots = _as(present, torch.bool), _as(slots, torch.int64)
        self.screen = screen  # routing.base.GateScreen or None (_screen_args)
        if screen is not None:
            _check_screen(screen, d_in, N)
        if self.slots is not None and self.slots.numel() != E:
            raise ValueError(f"gate_mixture_native: {self.slots.numel()} slots for a gate over {E} adapters")
        self.desc = _desc(banks, d_in, "gate_mixture_native")
        self.banks = tuple(weakref.ref(b) for b in banks)
        self.d_outs = tuple(b.d_out for b in banks)
        self._fn, self._ptrs = _state["fused"], ctypes.c_void_p * M

    def __call__(self, x: Tensor, outs: list[Tensor]) -> None:
        T = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.d_in or x.dtype != torch.float32 or len(outs) != self.M:
            raise ValueError(f"gate_mixture_native: x {tuple(x.shape)} {x.dtype} for a call prepared for float32 "
                             f"rows of width {self.d_in}, or {len(outs)} outputs for {self.M} modules")
        _check_outs(T, self.d_outs, outs, "gate_mixture_native")
        if any(r() is None for r in self.banks):
            raise RuntimeError("gate_mixture_native: a bank of this prepared call no longer exists")
        if not T:
            return
        x = x if x.stride(-1) == 1 else x.contiguous()
        pres, sl = self.present, self.slots
        screened = _screen_args(x, self.weight, self.screen, self.M, checked=True)
        if screened is not None:
            rc = _state["screened_fused"](
                x.data_ptr(), T, self.d_in, x.stride(0), *screened[:9], self.M, self.E,
                None if pres is None else pres.data_ptr(), int(self.absolute), self.k, self.temperature,
                None if sl is None else sl.data_ptr(), self.desc, self._ptrs(*[o.data_ptr() for o in outs]),
                ctypes.byref(_EXACT))
        else:
            sim = torch.mm(x, self.weight)  # [T, M·E]
            rc = self._fn(x.data_ptr(), T, self.d_in, x.stride(0), sim.data_ptr(), sim.stride(0), self.M, self.E,
                          None if pres is None else pres.data_ptr(), int(self.absolute), self.k, self.temperature,
                          None if sl is None else sl.data_ptr(), self.desc, self._ptrs(*[o.data_ptr() for o in outs]))
        if rc:
            _check(rc, T * self.k, [r() for r in self.banks])


def mixture_siblings_native(x: Tensor, indices: Tensor, weights: Tensor, banks: list[LoraBank],
                            outs: list[Tensor]) -> None:
    """``outs[m] += delta_m`` for M modules reading ``x: [T, d_in]``, in one C call: equal,
    module by module, to :func:`mixture_lora_native` into ``outs[m]``. ``indices`` (bank slots)
    and ``weights``: ``[T, k]``, one decision for every module, or ``[M, T, k]``, one each."""
    if _load() is None:
        raise RuntimeError(f"the native backend is unavailable: {_state['why']}")
    M = len(banks)
    per_module = indices.dim() == 3
    if len(outs) != M or indices.shape != weights.shape or indices.dim() not in (2, 3) or (
            per_module and indices.shape[0] != M):
        raise ValueError(f"mixture_siblings_native: {M} banks, {len(outs)} outputs, indices "
                         f"{tuple(indices.shape)} and weights {tuple(weights.shape)} ([T, k] or [{M}, T, k] wanted)")
    T, k = indices.shape[-2:]
    if T != x.shape[0]:
        raise ValueError(f"mixture_siblings_native: decisions for {T} tokens, x has {x.shape[0]}")
    desc = _describe(x, banks, outs, "mixture_siblings_native")
    if not T:
        return
    x = x if x.stride(-1) == 1 else x.contiguous()
    idx, w = _as(indices, torch.int64), _as(weights, torch.float32)
    rc = _state["siblings"](x.data_ptr(), T, x.shape[1], x.stride(0), idx.data_ptr(), w.data_ptr(), k,
                            T * k if per_module else 0, M, desc, _pointers(outs))
    _check(rc, T * k, banks)


def _describe(x: Tensor, banks: list[LoraBank], outs: list[Tensor], what: str):
    """The C side's ``desc`` for ``banks`` after checking each output against its bank."""
    _check_outs(x.shape[0], tuple(b.d_out for b in banks), outs, what)
    return _desc(banks, x.shape[1], what)


def _check_outs(T: int, d_outs: tuple[int, ...], outs: list[Tensor], what: str) -> None:
    """Each output ``[T, d_out]`` float32 with contiguous rows: what the C side writes through."""
    for d, o in zip(d_outs, outs):
        if o.shape != (T, d) or o.dtype != torch.float32 or o.stride(-1) != 1 or (T > 1 and o.stride(0) != d):
            raise ValueError(f"{what}: output {tuple(o.shape)} for a bank of d_out {d} ({o.dtype}; rows of "
                             "contiguous float32 wanted)")


def _desc(banks, d_in: int, what: str):
    """The C side's ``desc`` for ``banks`` (QV_DESC int64 per module; one array per group of
    banks, kept while they live)."""
    key = tuple(map(id, banks))
    hit = _DESCS.get(key)
    if hit is None or not all(r() is b for r, b in zip(hit[0], banks)):
        bad = [b for b in banks if b.d_in != d_in or not _bank_fields(b)]
        if bad:
            raise ValueError(f"{what}: a bank (rank {bad[0].max_rank}, d_in {bad[0].d_in}, {bad[0].dtype}) this "
                             f"kernel cannot take for x of width {d_in}")
        fields = [f for b in banks for f in _bank_fields(b)]
        hit = ([weakref.ref(b) for b in banks], (ctypes.c_int64 * len(fields))(*fields))
        if len(_DESCS) >= 4096:  # groups of banks no longer used: start afresh
            _DESCS.clear()
        _DESCS[key] = hit
    elif banks[0].d_in != d_in:
        raise ValueError(f"{what}: x of width {d_in} for banks of d_in {banks[0].d_in}")
    return hit[1]


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``, contiguous (itself when it already is)."""
    return t if t is None or (t.dtype == dtype and t.is_contiguous()) else t.to(dtype).contiguous()


def _pointers(outs: list[Tensor]):
    return (ctypes.c_void_p * len(outs))(*[o.data_ptr() for o in outs])


def _check(rc: int, P: int, banks: list[LoraBank]) -> None:
    """Raise for a C return code: -1 (allocation), another negative one (arguments the Python
    side rules out) or 1 + m·P + p (a bad slot p of module m)."""
    if rc == -1:
        raise MemoryError(f"the native mixture could not allocate its buffers ({P} slots per module)")
    if rc < 0:
        raise RuntimeError(f"the native call returned {rc}")
    if rc:
        m, p = divmod(rc - 1, P)
        raise ValueError(f"module {m} of the call, slot {p}: a bank slot outside [-1, {banks[m].num_adapters}) "
                         "or of too high a rank")
