"""Fused Triton kernels for the filter, installed as `titan_bayes.kernels` (see pyproject.toml).

`triton_bayes_filter` is what `bayes_filter(..., backend="triton")` runs: the chunked forward
kernels of chunk_fwd.py and the reverse-sweep backward of backward.py, wrapped as the custom
ops of ops.py. Modes "bayes" and "reset" have kernels; "additive" raises (use "chunked").
On CPU tensors the kernels run only in Triton's interpreter (TRITON_INTERPRET=1, for tests).

Decoding: `titan_bayes.kernels.recurrent.bayes_filter_step` advances the final state of
bayes_filter, (M, P), by one token in place (fused step kernels, recurrent.py).
"""

from __future__ import annotations

import os

import torch

KERNEL_MODES = ("bayes", "reset")
MAX_K, MAX_V = 256, 512
CHUNK_SIZES = (16, 32, 64)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_supports(mode, q, v=None, chunk_size=64) -> bool:
    """Whether a Triton kernel exists for this mode, these tensors and this chunk size
    (backend="auto" takes the kernels exactly when this holds, else the chunked PyTorch path)."""
    return (mode in KERNEL_MODES and q.is_cuda and q.dtype in DTYPES and q.shape[-1] <= MAX_K
            and (v is None or v.shape[-1] <= MAX_V) and chunk_size in CHUNK_SIZES)


def _check_supported(mode, q, v, chunk_size):
    if mode not in KERNEL_MODES:
        raise ValueError(f"bayes_filter: backend='triton' has kernels for modes {KERNEL_MODES}, not "
                         f"mode={mode!r}; use backend='chunked'")
    if q.shape[-1] > MAX_K:
        raise ValueError(f"bayes_filter: backend='triton' supports K <= {MAX_K}, got K = {q.shape[-1]} (q)")
    if v.shape[-1] > MAX_V:
        raise ValueError(f"bayes_filter: backend='triton' supports V <= {MAX_V}, got V = {v.shape[-1]} (v)")
    if q.dtype not in DTYPES:
        raise ValueError(f"bayes_filter: backend='triton' takes q, k, v in {DTYPES}, got {q.dtype} (q)")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"bayes_filter: backend='triton' supports chunk_size in {CHUNK_SIZES}, "
                         f"got {chunk_size}")
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"bayes_filter: backend='triton' needs CUDA tensors (q is on {q.device}); "
                         "on CPU set TRITON_INTERPRET=1 before importing triton, or use backend='chunked'")


def _n_slots(B, T, cu_seqlens, C):
    """Chunk-boundary state slots: every document's chunks plus its final state."""
    if cu_seqlens is None:
        return B * (-(-T // C) + 1)
    bounds = cu_seqlens.tolist()
    return sum(-(-(b - a) // C) + 1 for a, b in zip(bounds[:-1], bounds[1:]))


def triton_bayes_filter(q, k, v, g, beta, *, mode, process_noise, prior_scale, scale, initial_state,
                        output_final_state, cu_seqlens, output_variance, chunk_size):
    """The Triton backend of titan_bayes.ops.bayes_filter (same arguments and returns; the
    arguments were validated there)."""
    from titan_bayes.ops import filter_math as fm
    from titan_bayes.ops.api import _initial_belief

    from . import ops  # noqa: F401  (registers torch.ops.titan_bayes.*)

    _check_supported(mode, q, v, chunk_size)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    if mode == "bayes":
        noise = fm.stationary_process_noise(g.float()) if process_noise is None else process_noise.float()
    else:
        noise = torch.zeros(B, T, H, dtype=torch.float32, device=q.device)
    S0, P0 = _initial_belief(initial_state, mode, cu_seqlens, B, H, K, V, prior_scale, torch.float32, q.device)
    # With a backward to come, bayes' pivot check is read there, not here (pivot_check.py)
    differentiable = (q, k, v, g, beta, noise, S0) + ((P0,) if P0 is not None else ())
    defer_check = torch.is_grad_enabled() and any(x.requires_grad for x in differentiable)
    o, variance, S, P, *_factors = torch.ops.titan_bayes.chunk_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
        noise.contiguous(), S0.contiguous(), P0.contiguous() if P0 is not None else None, cu_seqlens,
        mode, scale, output_variance, chunk_size, _n_slots(B, T, cu_seqlens, chunk_size), defer_check)
    state = (S, P if mode == "bayes" else None) if output_final_state else None
    if output_variance:
        if mode != "bayes":
            variance = torch.zeros(B, T, H, dtype=v.dtype, device=v.device)
        return o, state, variance
    return o, state
