"""Fused one-token step of the filter, for decoding: advances the belief (M, P) in place.

    o = bayes_filter_step(q, k, v, g, beta, (M, P), mode="bayes")

q, k [B, H, K]; v [B, H, V]; g, beta [B, H] (one token per sequence); M [B, H, K, V] and
P [B, H, K, K] fp32 in the state layout of bayes_filter (its final state continues here).
The step is memory bound: one program per (sequence, head) reads and writes M and P once
(P is read twice: a first sweep forms u = P̄ k, a second updates it; the second read mostly
hits L2). Inference only: no autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from titan_bayes.ops import filter_math as fm


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, noise_ptr, m_ptr, p_ptr, o_ptr, var_ptr, scale,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, BV: tl.constexpr,
                 R_MIN: tl.constexpr, BAYES: tl.constexpr, WITH_VARIANCE: tl.constexpr):
    pid = tl.program_id(0)                      # (sequence, head)
    kk = tl.arange(0, BK)
    kmask = kk < K
    q = tl.load(q_ptr + pid * K + kk, mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pid * K + kk, mask=kmask, other=0.0).to(tl.float32)
    a = tl.exp(tl.load(g_ptr + pid).to(tl.float32))
    beta = tl.load(beta_ptr + pid).to(tl.float32)
    if BAYES:
        noise = tl.load(noise_ptr + pid).to(tl.float32)
        p_base = p_ptr + pid.to(tl.int64) * K * K
        # u = P̄ k = a² P k + q k, one column block of P at a time (P symmetric).
        u = noise * k
        for jb in range(0, K, BJ):
            jj = jb + tl.arange(0, BJ)
            jmask = jj < K
            P_blk = tl.load(p_base + kk[:, None] * K + jj[None, :], mask=kmask[:, None] & jmask[None, :], other=0.0)
            k_j = tl.load(k_ptr + pid * K + jj, mask=jmask, other=0.0).to(tl.float32)
            u += a * a * tl.sum(P_blk * k_j[None, :], 1)
        gain = 1.0 / (tl.maximum((1.0 - beta) / beta, R_MIN) + tl.sum(k * u, 0))   # 1 / s
        # P ← P̄ − u uᵀ / s; u's block j is column block j of P̄ applied to k (symmetry).
        q_P_q = 0.0
        for jb in range(0, K, BJ):
            jj = jb + tl.arange(0, BJ)
            jmask = jj < K
            tile_mask = kmask[:, None] & jmask[None, :]
            P_blk = tl.load(p_base + kk[:, None] * K + jj[None, :], mask=tile_mask, other=0.0)
            P_blk = a * a * P_blk + tl.where(kk[:, None] == jj[None, :], noise, 0.0)
            u_j = tl.sum(P_blk * k[:, None], 0)
            P_blk = P_blk - gain * u[:, None] * u_j[None, :]
            tl.store(p_base + kk[:, None] * K + jj[None, :], P_blk, mask=tile_mask)
            if WITH_VARIANCE:
                q_j = tl.load(q_ptr + pid * K + jj, mask=jmask, other=0.0).to(tl.float32)
                q_P_q += tl.sum(tl.sum(P_blk * q[:, None], 0) * q_j, 0)
        if WITH_VARIANCE:
            tl.store(var_ptr + pid, (scale * scale * q_P_q).to(var_ptr.dtype.element_ty))
    else:
        u = k                                   # reset: write along the key with gain beta
        gain = beta
    # M ← a M + u (v − a Mᵀk)ᵀ / s, and o = scale · Mᵀ q, one V block at a time.
    m_base = m_ptr + pid.to(tl.int64) * K * V
    for vb in range(0, V, BV):
        vv = vb + tl.arange(0, BV)
        vmask = vv < V
        tile_mask = kmask[:, None] & vmask[None, :]
        M = a * tl.load(m_base + kk[:, None] * V + vv[None, :], mask=tile_mask, other=0.0)
        v = tl.load(v_ptr + pid * V + vv, mask=vmask, other=0.0).to(tl.float32)
        innovation = v - tl.sum(M * k[:, None], 0)
        M = M + gain * u[:, None] * innovation[None, :]
        tl.store(m_base + kk[:, None] * V + vv[None, :], M, mask=tile_mask)
        o = scale * tl.sum(M * q[:, None], 0)
        tl.store(o_ptr + pid * V + vv, o.to(o_ptr.dtype.element_ty), mask=vmask)


@torch.library.custom_op("titan_bayes::filter_step", mutates_args=("M", "P"))
def filter_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   noise: torch.Tensor, M: torch.Tensor, P: Optional[torch.Tensor], scale: float,
                   output_variance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, K = q.shape
    V = v.shape[-1]
    bayes = P is not None
    o = torch.empty_like(v)
    variance = torch.empty(B, H, dtype=v.dtype, device=v.device) if output_variance and bayes \
        else torch.zeros(B, H, dtype=v.dtype, device=v.device)
    BK = max(16, triton.next_power_of_2(K))
    _step_kernel[(B * H,)](
        q, k, v, g, beta, noise, M, P if bayes else M, o, variance, scale,
        K=K, V=V, BK=BK, BJ=min(BK, 32 if K > 128 else 64), BV=min(max(16, triton.next_power_of_2(V)), 64),
        R_MIN=fm.R_MIN, BAYES=bayes, WITH_VARIANCE=output_variance and bayes, num_warps=4)
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
