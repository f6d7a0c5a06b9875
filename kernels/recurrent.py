"""Fused one-token step of the filter, for decoding: advances the belief (M, P) in place.

    o = bayes_filter_step(q, k, v, g, beta, (M, P), mode="bayes")

q, k [B, H, K]; v [B, H, V]; g, beta [B, H] (one token per sequence); M [B, H, K, V] and
P [B, H, K, K] fp32 in the state layout of bayes_filter (its final state continues here).
The step is memory bound, so it is spread over many programs: a first kernel forms the write
direction u = P̄ k (one read of P, parallel over row blocks), a second updates P by column
blocks and M by value blocks (one read and one write of each). Inference only: no autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from titan_bayes.ops import filter_math as fm


@triton.jit
def _step_direction_kernel(k_ptr, g_ptr, noise_ptr, p_ptr, u_ptr,
                           K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """u = P̄ k = a² P k + q k for one block of rows: the first read of P, parallel over rows."""
    rb, pid = tl.program_id(0), tl.program_id(1)
    rows = rb * BR + tl.arange(0, BR)
    kk = tl.arange(0, BK)
    rmask, kmask = rows < K, kk < K
    a = tl.exp(tl.load(g_ptr + pid).to(tl.float32))
    noise = tl.load(noise_ptr + pid).to(tl.float32)
    k = tl.load(k_ptr + pid * K + kk, mask=kmask, other=0.0).to(tl.float32)
    k_rows = tl.load(k_ptr + pid * K + rows, mask=rmask, other=0.0).to(tl.float32)
    P = tl.load(p_ptr + pid.to(tl.int64) * K * K + rows[:, None] * K + kk[None, :],
                mask=rmask[:, None] & kmask[None, :], other=0.0)
    tl.store(u_ptr + pid * K + rows, a * a * tl.sum(P * k[None, :], 1) + noise * k_rows, mask=rmask)


@triton.jit
def _step_update_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, noise_ptr, u_ptr, m_ptr, p_ptr, o_ptr,
                        qpq_ptr, scale, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                        BJ: tl.constexpr, BV: tl.constexpr, R_MIN: tl.constexpr, BAYES: tl.constexpr,
                        WITH_VARIANCE: tl.constexpr):
    """One block of the update: P's column block j (bayes), or M's column block of values.

    P ← P̄ − u u_jᵀ / s and M ← a M + u (v − a Mᵀk)ᵀ / s, o = scale · Mᵀ q; every program
    recomputes the scalar s = r + kᵀu from u (K numbers) instead of waiting for one another.
    """
    blk, pid = tl.program_id(0), tl.program_id(1)
    kk = tl.arange(0, BK)
    kmask = kk < K
    q = tl.load(q_ptr + pid * K + kk, mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pid * K + kk, mask=kmask, other=0.0).to(tl.float32)
    a = tl.exp(tl.load(g_ptr + pid).to(tl.float32))
    beta = tl.load(beta_ptr + pid).to(tl.float32)
    if BAYES:
        u = tl.load(u_ptr + pid * K + kk, mask=kmask, other=0.0)
        gain = 1.0 / (tl.maximum((1.0 - beta) / beta, R_MIN) + tl.sum(k * u, 0))    # 1 / s
        n_pblocks = tl.cdiv(K, BJ)
    else:
        u = k                                   # reset: write along the key with gain beta
        gain = beta
        n_pblocks = 0
    if blk < n_pblocks:
        noise = tl.load(noise_ptr + pid).to(tl.float32)
        jj = blk * BJ + tl.arange(0, BJ)
        jmask = jj < K
        tile_mask = kmask[:, None] & jmask[None, :]
        p_off = pid.to(tl.int64) * K * K + kk[:, None] * K + jj[None, :]
        P = a * a * tl.load(p_ptr + p_off, mask=tile_mask, other=0.0)
        P += tl.where(kk[:, None] == jj[None, :], noise, 0.0)
        u_j = tl.load(u_ptr + pid * K + jj, mask=jmask, other=0.0)
        P = P - gain * u[:, None] * u_j[None, :]
        tl.store(p_ptr + p_off, P, mask=tile_mask)
        if WITH_VARIANCE:
            q_j = tl.load(q_ptr + pid * K + jj, mask=jmask, other=0.0).to(tl.float32)
            tl.atomic_add(qpq_ptr + pid, tl.sum(tl.sum(P * q[:, None], 0) * q_j, 0))
    else:
        vv = (blk - n_pblocks) * BV + tl.arange(0, BV)
        vmask = vv < V
        tile_mask = kmask[:, None] & vmask[None, :]
        m_off = pid.to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]
        M = a * tl.load(m_ptr + m_off, mask=tile_mask, other=0.0)
        v = tl.load(v_ptr + pid * V + vv, mask=vmask, other=0.0).to(tl.float32)
        innovation = v - tl.sum(M * k[:, None], 0)
        M = M + gain * u[:, None] * innovation[None, :]
        tl.store(m_ptr + m_off, M, mask=tile_mask)
        tl.store(o_ptr + pid * V + vv, (scale * tl.sum(M * q[:, None], 0)).to(o_ptr.dtype.element_ty), mask=vmask)


@torch.library.custom_op("titan_bayes::filter_step", mutates_args=("M", "P"))
def filter_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   noise: torch.Tensor, M: torch.Tensor, P: Optional[torch.Tensor], scale: float,
                   output_variance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, K = q.shape
    V = v.shape[-1]
    bayes = P is not None
    o = torch.empty_like(v)
    BK = max(16, triton.next_power_of_2(K))
    BJ = BR = 16 if K > 128 else 32            # blocks of P columns / rows: [K, 16] or [K, 32] tiles
    BV = 16 if K > 128 else 32
    u = torch.empty(B, H, K, dtype=torch.float32, device=q.device)
    q_P_q = torch.zeros(B, H, dtype=torch.float32, device=q.device)
    if bayes:
        _step_direction_kernel[(triton.cdiv(K, BR), B * H)](k, g, noise, P, u, K=K, BK=BK, BR=BR, num_warps=4)
    n_blocks = (triton.cdiv(K, BJ) if bayes else 0) + triton.cdiv(V, BV)
    _step_update_kernel[(n_blocks, B * H)](
        q, k, v, g, beta, noise, u, M, P if bayes else M, o, q_P_q, scale,
        K=K, V=V, BK=BK, BJ=BJ, BV=BV, R_MIN=fm.R_MIN, BAYES=bayes,
        WITH_VARIANCE=output_variance and bayes, num_warps=4)
    variance = (scale * scale * q_P_q).to(v.dtype)   # zeros outside bayes
    return o, variance


@filter_step_op.register_fake
def _filter_step_fake(q, k, v, g, beta, noise, M, P, scale, output_variance):
    return torch.empty_like(v), v.new_empty(q.shape[:2])


def bayes_filter_step(q, k, v, g, beta, state, *, mode="bayes", process_noise=None, scale=None,
                      output_variance=False):
    """Advance `state` = (M, P) (P None for reset) by one token, in place; returns o [B, H, V]
    (and the predictive variance [B, H] with output_variance)."""
    if mode not in ("bayes", "reset"):
        raise ValueError(f"bayes_filter_step: mode must be 'bayes' or 'reset', got {mode!r}")
    M, P = state
    B, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:2] != (B, H) or g.shape != (B, H) or beta.shape != (B, H):
        raise ValueError("bayes_filter_step: q, k must be [B, H, K], v [B, H, V], g and beta [B, H]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
                         f"beta {tuple(beta.shape)}")
    if K > 256 or V > 512:
        raise ValueError(f"bayes_filter_step: K <= 256 and V <= 512, got K = {K} (q), V = {V} (v)")
    if M.shape != (B, H, K, V) or M.dtype != torch.float32 or not M.is_contiguous():
        raise ValueError(f"bayes_filter_step: state M must be a contiguous fp32 [B, H, K, V] = {(B, H, K, V)}")
    if mode == "bayes" and (P is None or P.shape != (B, H, K, K) or P.dtype != torch.float32
                            or not P.is_contiguous()):
        raise ValueError(f"bayes_filter_step: state P must be a contiguous fp32 [B, H, K, K] = {(B, H, K, K)}")
    scale = K ** -0.5 if scale is None else float(scale)
    if mode == "bayes":
        noise = fm.stationary_process_noise(g.float()) if process_noise is None else process_noise.float()
    else:
        noise, P = g.new_zeros(B, H, dtype=torch.float32), None
    o, variance = filter_step_op(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                 beta.contiguous(), noise.contiguous(), M, P, scale, output_variance)
    return (o, variance) if output_variance else o
