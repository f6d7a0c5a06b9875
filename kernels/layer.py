"""Triton kernels for the B/D layer's elementwise work around the filter (issue 4).

The layer's short convolutions and its gated output norm are a few elementwise passes each,
but written as PyTorch ops they cost more than the filter: on an H100, a 340M D block spent
about 30 ms of its 72 ms forward+backward in the three q/k/v convolutions (fp32 upcasts,
the depthwise convolution and its backward, the SiLU and L2-norm chains) and 10 ms in the
gated norm. Each function here is one or two passes over its tensors. They implement the
formulas of titan_bayes/models/recompute.py, which keeps the PyTorch versions (CPU, fp64)
and the autograd Functions that call these on CUDA; tests compare the two.

    short_conv_forward   y = silu(z), z[t] = Σ_j w[:, W-1-j] · x[t-j]   (lags j < W that stay
                         in the token's document), then optionally y / sqrt(|y|² + eps) per
                         group of norm_dim channels (the L2 norm of q and k heads)
    short_conv_backward  (dx, dw) of the above, recomputing z from x, in one persistent kernel
    gated_norm_forward   y = o · rstd · w · silu(gate), rstd = (mean(o²) + eps)^(-1/2) per row
    gated_norm_backward  (do, dgate, dw) of the above
    rope                 rotate-half RoPE of attention's q and k, [B, T, H, D] rows: pair (i, i + D/2)
                         of token t turns by t·inv_freq[i]; inverse=True turns back (its backward)

All math is fp32 in registers; inputs and outputs keep their dtype (bf16 in training).
Weight gradients are per-program partial sums, added up afterwards in PyTorch (deterministic,
no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titan_bayes.models.recompute import L2_EPS

# Tokens per program of the convolution's forward. A program reads W shifted [BT, BC] tiles of
# x; all but the first W-1 rows of each are cache hits.
CONV_BT = 32
# The convolution backward (_short_conv_bwd_kernel): tokens per tile, programs per SM, and warps
# by channel block (BC / CONV_BWD_CHANNELS_PER_WARP, which keeps its [W, BT, BC] dw sums at 64
# registers per thread). On an H100 at 8 × 4096 tokens, bf16, against the two kernels before it
# (dz through an fp32 buffer, then dx): 1.17 → 0.74 ms at 3072 channels, 0.65 → 0.48 at 1536 with
# the L2 norm of 256-wide heads. 16 or 32 tokens, or half the warps, were slower at both widths
# (twice the warps too, at 3072 channels).
CONV_BWD_BT, CONV_BWD_PER_SM, CONV_BWD_CHANNELS_PER_WARP = 8, 4, 64
# Rows per program of the gated norm (each row is one head's V values).
NORM_ROWS = 16
# Rows (heads of tokens) per program of the RoPE kernel.
ROPE_ROWS = 32
# FLOAT_ARGUMENTS: the model's autograd Functions call these kernels, so under torch.compile
# inductor launches them itself, and it types Python float arguments fp64. Every kernel that
# takes one (eps) casts it to fp32 first: without the cast its math ran in fp64, and the
# short-conv backward's fp32 dw sums failed to compile (their loop-carried type changed).


@triton.jit
def _silu_and_slope(z):
    """silu(z) and d silu / dz = σ(z)(1 + z(1 − σ(z)))."""
    sig = tl.sigmoid(z)
    return z * sig, sig * (1 + z * (1 - sig))


@triton.jit
def _conv_tile(x_ptr, w_ptr, pos_ptr, b, t, c, T, C, W: tl.constexpr, HAS_POS: tl.constexpr):
    """z [BT, BC] fp32 for tokens t and channels c of row b: Σ_j w[c, W-1-j] x[t-j, c] over the
    lags j that reach no further back than the token's document start (pos[t] >= j)."""
    in_t, in_c = t < T, c < C
    if HAS_POS:
        pos = tl.load(pos_ptr + b * T + t, mask=in_t, other=0)
    else:
        pos = t  # one document per row
    z = tl.zeros((t.shape[0], c.shape[0]), dtype=tl.float32)
    for j in tl.static_range(W):
        keep = (in_t & (pos >= j))[:, None] & in_c[None, :]
        xj = tl.load(x_ptr + (b * T + t - j)[:, None] * C + c[None, :], mask=keep, other=0.0)
        wj = tl.load(w_ptr + c * W + (W - 1 - j), mask=in_c, other=0.0)
        z += xj.to(tl.float32) * wj[None, :]
    return z


@triton.jit
def _short_conv_fwd_kernel(x_ptr, w_ptr, pos_ptr, y_ptr, T, C, eps, W: tl.constexpr, BT: tl.constexpr,
                           BC: tl.constexpr, NORM: tl.constexpr, HAS_POS: tl.constexpr):
    eps = tl.cast(eps, tl.float32)   # see FLOAT_ARGUMENTS
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    y, _ = _silu_and_slope(_conv_tile(x_ptr, w_ptr, pos_ptr, b, t, c, T, C, W, HAS_POS))
    if NORM:  # BC is the group (head) width: one program holds whole groups
        y = y * tl.rsqrt(tl.sum(y * y, 1) + eps)[:, None]
    mask = (t < T)[:, None] & (c < C)[None, :]
    tl.store(y_ptr + (b * T + t)[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_dz_tile(x_ptr, w_ptr, pos_ptr, dy_ptr, b, t, c, T, C, eps, W: tl.constexpr, NORM: tl.constexpr,
                  HAS_POS: tl.constexpr):
    """dz = dL/dz [BT, BC] fp32 at the convolution output (before SiLU) of tokens t, channels c."""
    mask = (t < T)[:, None] & (c < C)[None, :]
    s, slope = _silu_and_slope(_conv_tile(x_ptr, w_ptr, pos_ptr, b, t, c, T, C, W, HAS_POS))
    ds = tl.load(dy_ptr + (b * T + t)[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # y = s·r, r = (|s|² + eps)^(-1/2) per group: ds = r (dy − y (y · dy)).
        r = tl.rsqrt(tl.sum(s * s, 1) + eps)[:, None]
        y = s * r
        ds = r * (ds - y * tl.sum(y * ds, 1)[:, None])
    return ds * slope


@triton.jit
def _short_conv_bwd_kernel(x_ptr, w_ptr, pos_ptr, dy_ptr, dx_ptr, dw_part_ptr, scratch_ptr, T, C, eps,
                           n_t, n_c, n_tiles, W: tl.constexpr, WP: tl.constexpr, HALO: tl.constexpr,
                           BT: tl.constexpr, BC: tl.constexpr, NORM: tl.constexpr, HAS_POS: tl.constexpr):
    """(dx, dw) in one pass over x and dy: dx[t] = Σ_j w[c, W-1-j] dz[t+j] (where lag j of token
    t+j was kept) and dw[c, W-1-j] = Σ_t dz[t] x[t-j] (where lag j of token t was kept).

    Persistent: program p takes the [BT tokens, BC channels] tiles p, p + P, ... (P a multiple
    of the channel blocks, so its channels stay fixed). Per tile, dz of the BT tokens and of
    the HALO tokens after them (whose lags reach back into the tile) goes through the
    program's own scratch rows, which stay in L2 from tile to tile: dx reads dz shifted by j,
    which registers cannot do. dw is summed over the program's tiles elementwise, [W, BT, BC]
    in registers, and over tokens once at the end: a sum over a tile's tokens crosses warps,
    and doing it W times per tile had cost more than the rest of the kernel."""
    eps = tl.cast(eps, tl.float32)   # see FLOAT_ARGUMENTS
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    own = scratch_ptr + pid.to(tl.int64) * (BT + HALO) * BC
    r = tl.arange(0, BT)
    rh = tl.arange(0, HALO)
    cc = tl.arange(0, BC)
    lags = tl.arange(0, WP)
    c = (pid % n_c) * BC + cc
    in_c = c < C
    dw = tl.zeros((WP, BT, BC), dtype=tl.float32)            # dw[c, W-1-j] in row j
    for tile in range(pid, n_tiles, n_prog):
        pid_t, b = (tile // n_c) % n_t, tile // (n_c * n_t)
        t = pid_t * BT + r
        t_halo = pid_t * BT + BT + rh
        dz = _conv_dz_tile(x_ptr, w_ptr, pos_ptr, dy_ptr, b, t, c, T, C, eps, W, NORM, HAS_POS)
        dz_halo = _conv_dz_tile(x_ptr, w_ptr, pos_ptr, dy_ptr, b, t_halo, c, T, C, eps, W, NORM, HAS_POS)
        tl.store(own + r[:, None] * BC + cc[None, :], dz)
        tl.store(own + (BT + rh)[:, None] * BC + cc[None, :], dz_halo)
        tl.debug_barrier()                                    # dz rows read by other threads
        if HAS_POS:
            pos = tl.load(pos_ptr + b * T + t, mask=t < T, other=0)
        else:
            pos = t
        dx = tl.zeros((BT, BC), dtype=tl.float32)
        for j in tl.static_range(W):
            wj = tl.load(w_ptr + c * W + (W - 1 - j), mask=in_c, other=0.0)
            # Output token t + j used x[t] through lag j.
            tj = t + j
            if HAS_POS:
                pos_j = tl.load(pos_ptr + b * T + tj, mask=tj < T, other=0)
            else:
                pos_j = tj
            used = ((tj < T) & (pos_j >= j))[:, None]
            dx += tl.load(own + (r + j)[:, None] * BC + cc[None, :], mask=used, other=0.0) * wj[None, :]
            # Token t's lag j read x[t − j].
            kept = ((t < T) & (pos >= j))[:, None] & in_c[None, :]
            x_back = tl.load(x_ptr + (b * T + t - j)[:, None] * C + c[None, :], mask=kept, other=0.0)
            dw += tl.where(lags[:, None, None] == j, (dz * x_back.to(tl.float32))[None, :, :], 0.0)
        tl.store(dx_ptr + (b * T + t)[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & in_c[None, :])
        tl.debug_barrier()                                    # the next tile overwrites the scratch
    # Row pid // n_c of the partial sums [P / n_c, C, W].
    part = dw_part_ptr + ((pid // n_c) * C + c[None, :]) * W + (W - 1 - lags[:, None])
    tl.store(part, tl.sum(dw, 1), mask=(lags[:, None] < W) & in_c[None, :])


def _conv_launch(x, norm_dim):
    B, T, C = x.shape
    if norm_dim:
        if C % norm_dim:
            raise ValueError(f"short_conv: {C} channels do not split into groups of norm_dim = {norm_dim}")
        BC = triton.next_power_of_2(norm_dim)
        if BC != norm_dim:
            raise ValueError(f"short_conv kernel: norm_dim must be a power of two, got {norm_dim}")
    else:
        BC = min(128, triton.next_power_of_2(C))
    return (triton.cdiv(T, CONV_BT), triton.cdiv(C, BC), B), BC


def _positions(x, doc_pos):
    return (doc_pos.contiguous(), True) if doc_pos is not None else (x, False)


def short_conv_forward(x, weight, doc_pos, norm_dim):
    """x [B, T, C] (contiguous), weight [C, 1, W] (or [C, W]) fp32, doc_pos [B, T] int or None
    → y [B, T, C] in x's dtype."""
    x = x.contiguous()
    w = weight.reshape(weight.shape[0], -1).float().contiguous()
    grid, BC = _conv_launch(x, norm_dim)
    pos, has_pos = _positions(x, doc_pos)
    y = torch.empty_like(x)
    _short_conv_fwd_kernel[grid](x, w, pos, y, x.shape[1], x.shape[2], L2_EPS, W=w.shape[1], BT=CONV_BT,
                                 BC=BC, NORM=bool(norm_dim), HAS_POS=has_pos, num_warps=4)
    return y


def short_conv_backward(x, weight, doc_pos, norm_dim, dy):
    """(dx in x's dtype, dw fp32 shaped like weight) for the output gradient dy."""
    x, dy = x.contiguous(), dy.contiguous()
    w = weight.reshape(weight.shape[0], -1).float().contiguous()
    B, T, C = x.shape
    W = w.shape[1]
    (_, n_c, _), BC = _conv_launch(x, norm_dim)
    pos, has_pos = _positions(x, doc_pos)
    n_t = triton.cdiv(T, CONV_BWD_BT)
    n_tiles = B * n_t * n_c
    rounds = triton.cdiv(min(n_tiles, _resident_programs(x.device)), n_c)
    halo = triton.next_power_of_2(max(W - 1, 1))
    scratch = torch.empty(rounds * n_c, CONV_BWD_BT + halo, BC, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    dw_part = torch.empty(rounds, C, W, dtype=torch.float32, device=x.device)
    _short_conv_bwd_kernel[(rounds * n_c,)](
        x, w, pos, dy, dx, dw_part, scratch, T, C, L2_EPS, n_t, n_c, n_tiles, W=W,
        WP=triton.next_power_of_2(W), HALO=halo, BT=CONV_BWD_BT, BC=BC, NORM=bool(norm_dim),
        HAS_POS=has_pos, num_warps=max(1, BC // CONV_BWD_CHANNELS_PER_WARP))
    return dx, dw_part.sum(0).reshape(weight.shape)


def _resident_programs(device):
    """Programs of the persistent convolution backward: a few per SM on a GPU; two under the
    interpreter, so that its tests run several tiles per program."""
    if device.type != "cuda":
        return 2
    return CONV_BWD_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _gated_norm_fwd_kernel(o_ptr, gate_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, V, eps, BR: tl.constexpr,
                           BV: tl.constexpr):
    eps = tl.cast(eps, tl.float32)   # see FLOAT_ARGUMENTS
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BV)
    mask = (rows < n_rows)[:, None] & (cols < V)[None, :]
    offs = rows[:, None] * V + cols[None, :]
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(o * o, 1) / V + eps)
    silu_gate, _ = _silu_and_slope(gate)
    y = o * rstd[:, None] * w[None, :] * silu_gate
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _gated_norm_bwd_kernel(o_ptr, gate_ptr, w_ptr, rstd_ptr, dy_ptr, do_ptr, dgate_ptr, dw_part_ptr,
                           n_rows, V, BR: tl.constexpr, BV: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BV)
    mask = (rows < n_rows)[:, None] & (cols < V)[None, :]
    offs = rows[:, None] * V + cols[None, :]
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
    n = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rstd    # the normalised row
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu_gate, slope = _silu_and_slope(gate)
    dn = dy * w * silu_gate
    # n = o·rstd(o): do = rstd (dn − n · mean(n · dn)).
    do = rstd * (dn - n * (tl.sum(n * dn, 1) / V)[:, None])
    tl.store(do_ptr + offs, do.to(do_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offs, (dy * n * w * slope).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + tl.program_id(0) * V + cols, tl.sum(dy * n * silu_gate, 0), mask=cols < V)


def _norm_launch(o):
    V = o.shape[-1]
    n_rows = o.numel() // V
    return n_rows, V, triton.cdiv(n_rows, NORM_ROWS), triton.next_power_of_2(V)


def gated_norm_forward(o, gate, weight, eps, out_dtype=None):
    """o, gate [..., V] (same shape), weight [V] → (y [..., V] in out_dtype (default o's),
    rstd [rows] fp32)."""
    o, gate = o.contiguous(), gate.contiguous()
    n_rows, V, n_prog, BV = _norm_launch(o)
    y = torch.empty(o.shape, dtype=out_dtype or o.dtype, device=o.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=o.device)
    _gated_norm_fwd_kernel[(n_prog,)](o, gate, weight.contiguous(), y, rstd, n_rows, V, eps, BR=NORM_ROWS,
                                      BV=BV, num_warps=4)
    return y, rstd


def gated_norm_backward(o, gate, weight, rstd, dy):
    """(do, dgate, dw fp32) for the output gradient dy."""
    o, gate, dy = o.contiguous(), gate.contiguous(), dy.contiguous()
    n_rows, V, n_prog, BV = _norm_launch(o)
    do, dgate = torch.empty_like(o), torch.empty_like(gate)
    dw_part = torch.empty(n_prog, V, dtype=torch.float32, device=o.device)
    _gated_norm_bwd_kernel[(n_prog,)](o, gate, weight.contiguous(), rstd, dy, do, dgate, dw_part, n_rows, V,
                                      BR=NORM_ROWS, BV=BV, num_warps=4)
    return do, dgate, dw_part.sum(0)


@triton.jit
def _rope_kernel(x_ptr, freq_ptr, y_ptr, n_rows, T, H, sign, D: tl.constexpr, BR: tl.constexpr):
    """y = x·cos + rotate_half(x)·sin·sign for BR rows (one head of one token each) of [B, T, H, D]."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    half = tl.arange(0, D // 2)
    in_rows = rows < n_rows
    angle = ((rows // H) % T).to(tl.float32)[:, None] * tl.load(freq_ptr + half)[None, :]
    cos, sin = tl.cos(angle), sign * tl.sin(angle)
    mask = in_rows[:, None]
    first = rows[:, None] * D + half[None, :]
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + D // 2, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + first, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + first + D // 2, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)


def rope(x, inv_freq, inverse=False):
    """x [B, T, H, D] → the same rotated (position t = the token's index), in x's dtype.
    inv_freq [D/2] fp32; inverse: rotate by −t·inv_freq (the adjoint, for the backward)."""
    x = x.contiguous()
    B, T, H, D = x.shape
    if D % 2 or D & (D - 1):
        raise ValueError(f"rope kernel: head_dim must be an even power of two, got {D}")
    y = torch.empty_like(x)
    n_rows = B * T * H
    _rope_kernel[(triton.cdiv(n_rows, ROPE_ROWS),)](x, inv_freq.float().contiguous(), y, n_rows, T, H,
                                                     -1.0 if inverse else 1.0, D=D, BR=ROPE_ROWS, num_warps=4)
    return y
