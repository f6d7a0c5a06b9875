"""`bayes_filter`: the single entry point of the design-model filter (issue "filter op").

    o, state = bayes_filter(q, k, v, g, beta, *, mode="bayes", process_noise=None,
                            prior_scale=1.0, scale=None, initial_state=None,
                            output_final_state=False, cu_seqlens=None,
                            output_variance=False, backend="auto", chunk_size=None)

Shapes follow fla: q, k [B, T, H, K], v [B, T, H, V], g and beta [B, T, H]; the state is
(M [N, H, K, V], P [N, H, K, K]) with N = B, or the number of sequences of `cu_seqlens`.
This module checks the arguments, brings them to the internal head-major layout (padding
variable-length documents into a batch), and dispatches to a backend.
"""

from __future__ import annotations

import torch

from . import filter_math as fm
from .chunk import chunked_filter
from .naive import sequential_filter

BACKENDS = ("auto", "sequential", "chunked", "triton")
# chunk_size=None picks the fastest chunk length of the Triton kernels for the design model
# (the result does not depend on it: the chunked algorithm is exact). On an H100, fwd+bwd at
# (8, 4096, 8, 128, 128): bayes 27.6 ms at C = 64, 18.7 at 32, 22.5 at 16 (its C × C factor
# algebra spills registers at 64); reset 4.1 ms at 64 against 4.4 at 32.
DEFAULT_CHUNK_SIZES = {"bayes": 32, "reset": 64, "additive": 64}


def bayes_filter(q, k, v, g, beta, *, mode="bayes", process_noise=None, prior_scale=1.0,
                 scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                 output_variance=False, backend="auto", chunk_size=None, check_inputs=True):
    """Run the filter of `mode` ("bayes", "reset" or "additive") over a batch of sequences.

    Returns `(o, state)`, or `(o, state, variance)` with `output_variance=True`; `state` is
    `(M, P)` (P None outside "bayes") when `output_final_state`, else None. `check_inputs=False`
    skips the value checks that read tensors back to the host (beta range, g ≤ 0, positive
    definite initial P): for callers that guarantee them, e.g. a model's own parametrisation.
    `chunk_size=None` takes DEFAULT_CHUNK_SIZES[mode].
    """
    _check_arguments(q, k, v, g, beta, mode, process_noise, prior_scale, initial_state,
                     cu_seqlens, backend, chunk_size, check_inputs)
    chunk_size = DEFAULT_CHUNK_SIZES[mode] if chunk_size is None else chunk_size
    if backend == "auto":
        backend = _auto_backend(q, v, mode, chunk_size)
    if backend == "triton":
        from titan_bayes.kernels import triton_bayes_filter  # raises if unavailable

        return triton_bayes_filter(
            q, k, v, g, beta, mode=mode, process_noise=process_noise, prior_scale=prior_scale,
            scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, output_variance=output_variance, chunk_size=chunk_size)

    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    # Covariance math in fp32 at least (float64 stays float64); outputs in the input dtype.
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    if process_noise is None:
        noise = fm.stationary_process_noise(g.to(compute_dtype)) if mode == "bayes" else torch.zeros_like(g, dtype=compute_dtype)
    else:
        noise = process_noise
    tensors = [x.to(compute_dtype) for x in (q, k, v, g, beta, noise)]
    S0, P0 = _initial_belief(initial_state, mode, cu_seqlens, B, H, K, v.shape[-1], prior_scale,
                             compute_dtype, q.device)

    pad_to = chunk_size if backend == "chunked" else 1
    layout = _Layout(cu_seqlens, T, pad_to)
    q_, k_, v_, g_, beta_, noise_ = layout.pack(*tensors)
    if backend == "chunked":
        o, S, P, variance, info = chunked_filter(mode, q_, k_, v_, g_, beta_, noise_, S0, P0, scale,
                                                 output_variance, chunk_size)
        if info is not None and bool((info != 0).any()):
            raise ValueError(
                "bayes_filter: the innovation covariance of a chunk is not positive definite. "
                "This happens when beta is too close to 1 for repeated keys, or when the prior or "
                "initial P is not positive definite; keep beta <= 0.999 or raise prior_scale.")
    else:
        o, S, P, variance = sequential_filter(mode, q_, k_, v_, g_, beta_, noise_, S0, P0, scale,
                                              output_variance)
    o = layout.unpack(o).to(v.dtype)
    state = (S, P) if output_final_state else None
    if output_variance:
        variance = layout.unpack(variance[..., None])[..., 0].to(v.dtype)
        return o, state, variance
    return o, state


def _auto_backend(q, v, mode, chunk_size):
    if q.is_cuda:
        from titan_bayes.kernels import kernel_supports

        if kernel_supports(mode, q, v=v, chunk_size=chunk_size):
            return "triton"
    return "chunked"


def _initial_belief(initial_state, mode, cu_seqlens, B, H, K, V, prior_scale, dtype, device):
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        S0, P0 = None, None
    elif isinstance(initial_state, torch.Tensor):
        S0, P0 = initial_state, None
    else:
        S0, P0 = initial_state
    S0 = torch.zeros(N, H, K, V, dtype=dtype, device=device) if S0 is None else S0.to(dtype)
    if mode != "bayes":
        return S0, None
    if P0 is None:
        P0 = prior_scale * torch.eye(K, dtype=dtype, device=device).expand(N, H, K, K)
    # The filter reads P through symmetric products only; symmetrising makes every backend
    # (and its gradient) see the same matrix.
    P0 = P0.to(dtype)
    return S0, 0.5 * (P0 + P0.transpose(-1, -2))


class _Layout:
    """From the user's [B, T, H, ...] to the internal [N, H, T', ...] and back.

    With cu_seqlens (B == 1) each document becomes one row of the batch, so every document
    starts from its own initial belief. Rows are padded at the end to a common length that
    is a multiple of `pad_to` with tokens that leave the belief unchanged: k = 0 (no write),
    g = 0 and no process noise (no decay), beta = 1/2 (a finite, harmless pivot).
    """

    def __init__(self, cu_seqlens, T, pad_to):
        if cu_seqlens is None:
            self.lengths = None
            longest = T
        else:
            bounds = cu_seqlens.tolist()
            self.lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
            self.starts = bounds[:-1]
            longest = max(self.lengths)
        self.padded = -(-max(longest, 1) // pad_to) * pad_to
        self.T = T

    def pack(self, q, k, v, g, beta, noise):
        fills = (0.0, 0.0, 0.0, 0.0, 0.5, 0.0)
        return [self._pack_one(x, fill) for x, fill in zip((q, k, v, g, beta, noise), fills)]

    def _pack_one(self, x, fill):
        if self.lengths is None:
            rows = x
        else:
            rows = torch.full((len(self.lengths), self.padded, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
            pieces = [x[0, s:s + n] for s, n in zip(self.starts, self.lengths)]
            rows = torch.stack([torch.cat([p, rows[i, n:]]) for i, (p, n) in enumerate(zip(pieces, self.lengths))])
        extra = self.padded - rows.shape[1]
        if extra:
            tail = torch.full((rows.shape[0], extra, *rows.shape[2:]), fill, dtype=rows.dtype, device=rows.device)
            rows = torch.cat([rows, tail], dim=1)
        return rows.transpose(1, 2)  # [N, H, T', ...]

    def unpack(self, y):
        y = y.transpose(1, 2)  # [N, T', H, ...]
        if self.lengths is None:
            return y[:, :self.T]
        return torch.cat([y[i, :n] for i, n in enumerate(self.lengths)])[None]


def _check_arguments(q, k, v, g, beta, mode, process_noise, prior_scale, initial_state, cu_seqlens,
                     backend, chunk_size, check_values):
    if mode not in fm.MODES:
        raise ValueError(f"bayes_filter: mode must be one of {fm.MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"bayes_filter: backend must be one of {BACKENDS}, got {backend!r}")
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"bayes_filter: {name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"bayes_filter: q, k must be [B, T, H, K] and v [B, T, H, V]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"bayes_filter: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"bayes_filter: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    for name in ("g", "beta"):
        if named[name].shape != (B, T, H):
            raise ValueError(f"bayes_filter: {name} must be [B, T, H] = {(B, T, H)}, got {tuple(named[name].shape)}")
    if process_noise is not None:
        if mode != "bayes":
            raise ValueError(f"bayes_filter: process_noise only applies to mode='bayes' (got mode={mode!r}); "
                             "leave it None")
        if not isinstance(process_noise, torch.Tensor) or process_noise.shape != (B, T, H):
            raise ValueError(f"bayes_filter: process_noise must be None (stationary) or a tensor [B, T, H] = "
                             f"{(B, T, H)}, got {getattr(process_noise, 'shape', process_noise)}")
        named["process_noise"] = process_noise
    devices = {name: x.device for name, x in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"bayes_filter: all inputs must be on one device, got {devices}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"bayes_filter: chunk_size must be a positive int, or None for the mode's default "
                         f"{DEFAULT_CHUNK_SIZES}, got {chunk_size!r}")
    if not prior_scale > 0:
        raise ValueError(f"bayes_filter: prior_scale must be > 0, got {prior_scale!r}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"bayes_filter: with cu_seqlens the documents are packed into one row, so B must be 1; "
                             f"got B = {B}. Flatten the batch to [1, B*T, ...] and give its boundaries.")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.dtype.is_floating_point:
            raise ValueError("bayes_filter: cu_seqlens must be a 1-D integer tensor [0, ..., T] of document "
                             f"boundaries, got {cu_seqlens!r}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"bayes_filter: cu_seqlens must start at 0, end at T = {T} and strictly increase; "
                             f"got {bounds}")
        N = len(bounds) - 1
    if initial_state is not None:
        _check_initial_state(initial_state, mode, N, H, K, v.shape[-1], q.device, check_values)
    if check_values:
        if not bool(((beta > 0) & (beta <= 1)).all()):
            raise ValueError(f"bayes_filter: beta must lie in (0, 1]; got values in "
                             f"[{beta.min().item():.4g}, {beta.max().item():.4g}]")
        if not bool((g <= 0).all()):
            raise ValueError(f"bayes_filter: g is the log decay and must be <= 0 (a_t = exp(g_t) <= 1); "
                             f"largest value {g.max().item():.4g}")
        if process_noise is not None and not bool((process_noise >= 0).all()):
            raise ValueError("bayes_filter: process_noise must be >= 0 (it is a variance)")


def _check_initial_state(initial_state, mode, N, H, K, V, device, check_values):
    if isinstance(initial_state, torch.Tensor):
        M, P = initial_state, None
    elif isinstance(initial_state, (tuple, list)) and len(initial_state) == 2:
        M, P = initial_state
    else:
        raise ValueError("bayes_filter: initial_state must be M [N, H, K, V] or a pair (M, P) with "
                         f"P [N, H, K, K] (or None); got {type(initial_state).__name__}")
    if M is not None and (M.shape != (N, H, K, V) or M.device != device):
        raise ValueError(f"bayes_filter: initial_state M must be [N, H, K, V] = {(N, H, K, V)} on {device}, "
                         f"got {tuple(M.shape)} on {M.device}")
    if P is None:
        return
    if mode != "bayes":
        raise ValueError(f"bayes_filter: initial_state P only applies to mode='bayes' (got mode={mode!r})")
    if P.shape != (N, H, K, K) or P.device != device:
        raise ValueError(f"bayes_filter: initial_state P must be [N, H, K, K] = {(N, H, K, K)} on {device}, "
                         f"got {tuple(P.shape)} on {P.device}")
    if check_values:
        P64 = P.detach().double()
        if not torch.allclose(P64, P64.transpose(-1, -2), rtol=1e-4, atol=1e-6):
            raise ValueError("bayes_filter: initial_state P must be symmetric (it is a covariance)")
        if bool((torch.linalg.cholesky_ex(P64)[1] != 0).any()):
            raise ValueError("bayes_filter: initial_state P must be positive definite (it is a covariance)")
