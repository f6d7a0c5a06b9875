"""Autograd Functions of the block that keep only their inputs for backward (issue 4).

Written as plain PyTorch formulas, the block's normalisations and gates make autograd keep
an fp32 upcast of their input plus the result of nearly every elementwise step: about 135 KB
per token per 340M layer, 41 KB of it fp32, where fla's GDN layer keeps about 65 KB. Each
Function here saves its inputs in their own dtype (bf16 in training), plus at most a per-row
fp32 statistic, and recomputes the elementwise math in backward. The math is the formulas'
own, in at least fp32 (fp64 stays fp64, so gradcheck applies), rounded once at the end: the
outputs equal the formulas' to float rounding.

No Function holds a matmul (those stay nn.Linear modules, which tensor parallelism and FSDP
hook into), so what is recomputed is a few elementwise passes. On CUDA (bf16, fp16, fp32) the
short convolution and the gated norm run as fused Triton kernels (kernels/layer.py, the same
formulas); the PyTorch code below serves every other device and dtype and is their oracle.

    rms_norm(x, weight, eps)               x · rsqrt(mean(x²) + eps) · weight
    gated_rms_norm(o, gate, weight, eps)   rms_norm(o) · weight · silu(gate)
    short_conv_silu(x, weight, doc_pos, norm_dim)
                                           silu(causal depthwise conv), optionally
                                           L2-normalised per group of norm_dim channels
    swiglu(gate, up)                       silu(gate) · up
    rope(x, inv_freq)                      rotate-half RoPE of x [B, T, H, D] at positions 0..T-1
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd import Function

L2_EPS = 1e-6  # fla's l2norm: x / sqrt(|x|² + 1e-6)
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _on_kernels(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels of kernels/layer.py take these tensors (CUDA, not fp64)."""
    return all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: bf16/fp16 are upcast, fp64 stays fp64 (for the exactness tests)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the plain formula would return: the inputs' promoted dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    """d silu(z) / dz = σ(z) (1 + z (1 − σ(z)))."""
    sig = torch.sigmoid(z)
    return sig * (1 + z * (1 - sig))


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the last (a weight's gradient); elementwise, no matmul."""
    return x.reshape(-1, x.shape[-1]).sum(0)


def _rms_backward(n: torch.Tensor, rstd: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
    """Gradient through n = x · rstd(x), rstd = (mean(x²) + eps)^(-1/2), over the last dim:
    dx = rstd (dn − n · mean(n · dn))."""
    return rstd * (dn - n * (n * dn).mean(-1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# RMSNorm (the block's pre-norms and the final norm)

class _RMSNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        cd = _compute_dtype(x, weight)
        x32 = x.to(cd)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)  # x in its own dtype, rstd one number per row
        return (x32 * rstd * weight.to(cd)).to(_out_dtype(x, weight))

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        cd = rstd.dtype
        n, dy = x.to(cd) * rstd, dy.to(cd)
        dx = _rms_backward(n, rstd, dy * weight.to(cd))
        dw = _sum_rows(dy * n).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (D,), weight, eps) saving x (not an fp32 copy of it) and 1/rms per row."""
    return _RMSNorm.apply(x, weight, eps)


# ---------------------------------------------------------------------------------------------
# The B/D layer's output norm: per-head RMSNorm gated by SiLU

class _GatedRMSNorm(Function):
    @staticmethod
    def forward(ctx, o, gate, weight, eps):
        if _on_kernels(o, gate, weight):
            from titan_bayes.kernels.layer import gated_norm_forward
            y, rstd = gated_norm_forward(o, gate, weight, eps, _out_dtype(o, gate, weight))
            ctx.save_for_backward(o, gate, weight, rstd)
            return y
        cd = _compute_dtype(o, gate, weight)
        o32 = o.to(cd)
        rstd = torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(o, gate, weight, rstd)
        y = o32 * rstd * weight.to(cd) * F.silu(gate.to(cd))
        return y.to(_out_dtype(o, gate, weight))

    @staticmethod
    def backward(ctx, dy):
        o, gate, weight, rstd = ctx.saved_tensors
        if _on_kernels(o, gate, weight):
            from titan_bayes.kernels.layer import gated_norm_backward
            do, dgate, dw = gated_norm_backward(o, gate, weight, rstd, dy)
            return do, dgate, dw.to(weight.dtype) if ctx.needs_input_grad[2] else None, None
        cd = rstd.dtype
        n, g, w, dy = o.to(cd) * rstd, gate.to(cd), weight.to(cd), dy.to(cd)
        s = F.silu(g)
        do = _rms_backward(n, rstd, dy * w * s)
        dgate = dy * n * w * _silu_grad(g)
        dw = _sum_rows(dy * n * s).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return do.to(o.dtype), dgate.to(gate.dtype), dw, None


def gated_rms_norm(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(o) · weight · silu(gate) over the last dim (fla's FusedRMSNormGated), saving
    o, gate and 1/rms per row instead of an fp32 copy of o and four intermediate products."""
    return _GatedRMSNorm.apply(o, gate, weight, eps)


# ---------------------------------------------------------------------------------------------
# Short convolution + SiLU (+ the L2 norm of q and k)

def doc_positions(doc_starts: torch.Tensor) -> torch.Tensor:
    """[B, T] bool document starts → each token's position in its document (rows start one)."""
    T = doc_starts.shape[1]
    t = torch.arange(T, device=doc_starts.device).expand_as(doc_starts)
    last_start = torch.where(doc_starts, t, torch.zeros_like(t)).cummax(1).values
    return t - last_start


def _no_autocast(x: torch.Tensor):
    """Autocast would run the convolution in bf16; the Function's math is fp32 by design.
    (Devices without autocast, e.g. meta, have nothing to turn off.)"""
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def _causal_conv(x: torch.Tensor, w: torch.Tensor, doc_pos: torch.Tensor | None) -> torch.Tensor:
    """z[t] = Σ_j w[:, 0, W-1-j] · x[t-j] over lags j < W, x [B, T, C], w [C, 1, W].

    A lag that reaches before the row (or, with doc_pos, before the token's document start:
    doc_pos[t] < j) contributes nothing, so a document never sees its predecessor."""
    T, C, W = x.shape[1], x.shape[2], w.shape[-1]
    with _no_autocast(x):
        if doc_pos is None:  # one document per row: one (fast) depthwise convolution
            return F.conv1d(x.transpose(1, 2), w, padding=W - 1, groups=C)[..., :T].transpose(1, 2)
        z = x * w[:, 0, W - 1]
        for lag in range(1, min(W, T)):
            keep = (doc_pos[:, lag:, None] >= lag).to(x.dtype)
            z[:, lag:] += x[:, :-lag] * keep * w[:, 0, W - 1 - lag]
        return z


def _causal_conv_backward(x, w, dz, doc_pos):
    """(dx, dw) of _causal_conv for the output gradient dz."""
    T, C, W = x.shape[1], x.shape[2], w.shape[-1]
    if doc_pos is None:
        # The forward's output is the first T of T + W − 1 padded-conv outputs.
        dz_full = F.pad(dz.transpose(1, 2), (0, W - 1))
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dz_full, x.transpose(1, 2), w, None, [1], [W - 1], [1], False, [0], C, [True, True, False])
        return dx.transpose(1, 2), dw
    dx = dz * w[:, 0, W - 1]
    dw = torch.zeros_like(w)
    dw[:, 0, W - 1] = _sum_rows(dz * x)
    for lag in range(1, min(W, T)):
        d = dz[:, lag:] * (doc_pos[:, lag:, None] >= lag).to(dz.dtype)
        dx[:, :-lag] += d * w[:, 0, W - 1 - lag]
        dw[:, 0, W - 1 - lag] = _sum_rows(d * x[:, :-lag])
    return dx, dw


def _l2_normalize(u: torch.Tensor, norm_dim: int) -> torch.Tensor:
    """u / sqrt(|u|² + eps) over groups of norm_dim channels (the heads of q or k)."""
    u = u.unflatten(-1, (-1, norm_dim))
    return (u * torch.rsqrt(u.pow(2).sum(-1, keepdim=True) + L2_EPS)).flatten(-2)


def _l2_backward(u: torch.Tensor, norm_dim: int, dy: torch.Tensor) -> torch.Tensor:
    """Gradient through y = u · r, r = (|u|² + eps)^(-1/2) per group: du = r (dy − y (y · dy))."""
    u, dy = u.unflatten(-1, (-1, norm_dim)), dy.unflatten(-1, (-1, norm_dim))
    r = torch.rsqrt(u.pow(2).sum(-1, keepdim=True) + L2_EPS)
    y = u * r
    return (r * (dy - y * (y * dy).sum(-1, keepdim=True))).flatten(-2)


class _ShortConvSiLU(Function):
    @staticmethod
    def forward(ctx, x, weight, doc_pos, norm_dim):
        ctx.save_for_backward(x, weight, doc_pos)
        ctx.norm_dim = norm_dim
        if _on_kernels(x, weight):
            from titan_bayes.kernels.layer import short_conv_forward
            return short_conv_forward(x, weight, doc_pos, norm_dim)
        cd = _compute_dtype(x, weight)
        y = F.silu(_causal_conv(x.to(cd), weight.to(cd), doc_pos))
        if norm_dim:
            y = _l2_normalize(y, norm_dim)
        # Contiguous: the filter takes contiguous q, k, v (a strided output would be copied,
        # and the copy kept, there).
        return y.to(x.dtype).contiguous()

    @staticmethod
    def backward(ctx, dy):
        x, weight, doc_pos = ctx.saved_tensors
        if _on_kernels(x, weight):
            from titan_bayes.kernels.layer import short_conv_backward
            dx, dw = short_conv_backward(x, weight, doc_pos, ctx.norm_dim, dy)
            return dx, dw.to(weight.dtype), None, None
        cd = _compute_dtype(x, weight)
        x32, w32 = x.to(cd), weight.to(cd)
        z = _causal_conv(x32, w32, doc_pos)
        du = dy.to(cd)
        if ctx.norm_dim:
            du = _l2_backward(F.silu(z), ctx.norm_dim, du)
        dx, dw = _causal_conv_backward(x32, w32, du * _silu_grad(z), doc_pos)
        return dx.to(x.dtype), dw.to(weight.dtype), None, None


def short_conv_silu(x: torch.Tensor, weight: torch.Tensor, doc_pos: torch.Tensor | None = None,
                    norm_dim: int = 0) -> torch.Tensor:
    """silu(causal depthwise conv1d(x)) for x [B, T, C], weight [C, 1, W] (nn.Conv1d's layout),
    in x's dtype; with norm_dim, then L2-normalised per group of norm_dim channels.

    doc_pos [B, T] (doc_positions): lags never reach into the previous document; None: one
    document per row. Saves x only: the convolution input is what backward needs anyway,
    while the formulas kept the SiLU input and output, and an fp32 copy for the L2 norm."""
    return _ShortConvSiLU.apply(x, weight, doc_pos, norm_dim)


# ---------------------------------------------------------------------------------------------
# SwiGLU gate

class _SwiGLU(Function):
    # In the inputs' dtype, as the plain formula: F.silu computes in fp32 inside and rounds
    # once; upcasting both [T, hidden] operands to fp32 costs three more passes over them
    # (measured on an H100, together with model.RMSNorm on F.rms_norm: a 340M transformer_lm step
    # took 0.47 s with both upcasting, 0.31 s without).
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(dy * up, gate), dy * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, saving gate and up (the formula also kept silu(gate))."""
    return _SwiGLU.apply(gate, up)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding

def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin: channel pair (i, i + D/2) turns by angles[..., i]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rope_angles(T: int, inv_freq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, 1, D/2] angles t·inv_freq (broadcast over the heads of [B, T, H, D/2])."""
    positions = torch.arange(T, device=inv_freq.device, dtype=dtype)
    return (positions[:, None] * inv_freq.to(dtype))[:, None, :]


def _rope_on_kernels(x: torch.Tensor) -> bool:
    """The kernel takes head widths that are powers of two (every flavor's 64)."""
    D = x.shape[-1]
    return _on_kernels(x) and D >= 2 and D & (D - 1) == 0


class _RoPE(Function):
    # A rotation: its backward is the rotation by the opposite angles, so nothing but the
    # frequencies is saved. As written with cat and products, autograd kept the rotated
    # halves and ran eight elementwise passes per tensor; on CUDA this is one kernel each way.
    @staticmethod
    def forward(ctx, x, inv_freq):
        ctx.save_for_backward(inv_freq)
        if _rope_on_kernels(x):
            from titan_bayes.kernels.layer import rope
            return rope(x, inv_freq)
        cd = _compute_dtype(x, inv_freq)
        return _rotate_pairs(x.to(cd), _rope_angles(x.shape[1], inv_freq, cd)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        (inv_freq,) = ctx.saved_tensors
        if _rope_on_kernels(dy):
            from titan_bayes.kernels.layer import rope
            return rope(dy, inv_freq, inverse=True), None
        cd = _compute_dtype(dy, inv_freq)
        return _rotate_pairs(dy.to(cd), -_rope_angles(dy.shape[1], inv_freq, cd)).to(dy.dtype), None


def rope(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, T, H, D] (token t at position t), in x's dtype: channel pair
    (i, i + D/2) turns by t·inv_freq[i], computed in at least fp32 and rounded once."""
    return _RoPE.apply(x, inv_freq)
