"""The chunked filter as torch custom ops, so torch.compile(fullgraph=True), FSDP2 and DTensor
paths see one forward op and one backward op instead of Triton launches and Python loops.

    titan_bayes::chunk_fwd  → (o, variance, S_final, P_final, factors, writes, status)
    titan_bayes::chunk_bwd  → (dq, dk, dv, dg, dbeta, dnoise, dS0, dP0)

Empty tensors stand for absent outputs (variance without output_variance, P outside bayes): a
custom op's outputs are always tensors. The backward saves the op's inputs (as Gated
DeltaNet's kernels do) and each chunk's factors, one fp32 C × C block per chunk ([B·T, H, C]):
for bayes L, L⁻¹ and the gains packed into it (L below the diagonal, L⁻¹ᵀ above it, the gains
on it), for reset the inverse L⁻¹ of its delta-rule system (as fla saves its solve_tril);
bayes also saves its write directions Ũ = diag(√w) U ([B·T, H, K], fp16 for 16-bit keys:
chunk_fwd.write_dtype) and its pivot check `status`, which the backward reads before it
returns when the forward left it to it (defer_check: pivot_check.py). It reruns the first two
forward passes for the chunk-boundary states and covariances: some extra time for a saved
memory of the inputs, C floats per token and head, and for bayes K halves. The saved factors
spare the rerun reset's triangular inverse of every chunk, and with Ũ bayes replays its
covariances in parallel over P's tiles instead of sweeping every chunk's LDLᵀ again.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backward import chunk_backward
from .chunk_fwd import chunk_forward, plan_for, write_dtype
from .pivot_check import check_pending


@torch.library.custom_op("titan_bayes::chunk_fwd", mutates_args=())
def chunk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              noise: torch.Tensor, S0: torch.Tensor, P0: Optional[torch.Tensor],
              cu_seqlens: Optional[torch.Tensor], mode: str, scale: float, output_variance: bool,
              chunk_size: int, n_slots: int,
              defer_check: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    B, T = q.shape[:2]
    plan = plan_for(B, T, cu_seqlens, chunk_size, q.device)
    assert plan.n_slots == n_slots, "n_slots must match the chunk plan"
    o, variance, S_final, P_final, factors, writes, status = chunk_forward(
        mode, q, k, v, g, beta, noise, S0, P0, plan, scale, output_variance, chunk_size, defer_check)

    def empty(dtype=torch.float32):  # a fresh one each time: a custom op's outputs may not alias each other
        return q.new_empty(0, dtype=dtype)

    return (o, variance if variance is not None else empty(), S_final,
            P_final if P_final is not None else empty(), factors, writes if writes is not None else empty(),
            status if status is not None else empty(torch.int32))


@chunk_fwd.register_fake
def _chunk_fwd_fake(q, k, v, g, beta, noise, S0, P0, cu_seqlens, mode, scale, output_variance,
                    chunk_size, n_slots, defer_check):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = S0.shape[0]
    f32 = dict(dtype=torch.float32, device=q.device)
    bayes = mode == "bayes"
    variance = q.new_empty(B, T, H, dtype=v.dtype) if output_variance else q.new_empty(0, **f32)
    factors = q.new_empty(B * T, H, chunk_size, **f32)
    writes = q.new_empty(B * T, H, K, dtype=write_dtype(k)) if bayes else q.new_empty(0, **f32)
    status = q.new_empty(1 if bayes else 0, dtype=torch.int32)
    return (torch.empty_like(v), variance, q.new_empty(N, H, K, V, **f32),
            q.new_empty(N, H, K, K, **f32) if bayes else q.new_empty(0, **f32), factors, writes, status)


@torch.library.custom_op("titan_bayes::chunk_bwd", mutates_args=())
def chunk_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              noise: torch.Tensor, S0: torch.Tensor, P0: Optional[torch.Tensor],
              cu_seqlens: Optional[torch.Tensor], factors: torch.Tensor, writes: torch.Tensor, status: torch.Tensor,
              d_out: torch.Tensor, d_var: torch.Tensor, dS: torch.Tensor, dP: torch.Tensor, mode: str,
              scale: float, output_variance: bool,
              chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T = q.shape[:2]
    plan = plan_for(B, T, cu_seqlens, chunk_size, q.device)
    grads = (d_out, d_var if d_var.numel() else None, dS, dP if dP.numel() else None)
    out = chunk_backward(mode, (q, k, v, g, beta, noise), S0, P0, plan, cu_seqlens, grads, scale,
                         output_variance, chunk_size, factors, writes if writes.numel() else None)
    if mode == "bayes":
        # After the launches, so the GPU has the backward queued while the host waits for the
        # flag's copy; before returning, so a failed forward's NaN gradients never reach anyone.
        check_pending(status, writes)
    dP0 = out[7] if out[7] is not None else q.new_empty(0, dtype=torch.float32)
    return (*out[:7], dP0)


@chunk_bwd.register_fake
def _chunk_bwd_fake(q, k, v, g, beta, noise, S0, P0, cu_seqlens, factors, writes, status, d_out, d_var, dS,
                    dP, mode, scale, output_variance, chunk_size):
    N, H, K, V = dS.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    dP0 = q.new_empty(N, H, K, K, **f32) if mode == "bayes" else q.new_empty(0, **f32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), torch.empty_like(noise), q.new_empty(N, H, K, V, **f32), dP0)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, noise, S0, P0, cu_seqlens, mode, scale, output_variance, chunk_size, n_slots, _ = inputs
    ctx.save_for_backward(q, k, v, g, beta, noise, S0, P0, cu_seqlens, output[4], output[5], output[6])
    ctx.args = (mode, scale, output_variance, chunk_size)


def _backward(ctx, d_out, d_var, dS, dP, _d_factors, _d_writes, _d_status):
    """The factors, write directions and pivot check (outputs 4–6) are intermediates for this
    backward only: no gradient flows through them."""
    q, k, v, g, beta, noise, S0, P0, cu_seqlens, factors, writes, status = ctx.saved_tensors
    mode, scale, output_variance, chunk_size = ctx.args
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    f32 = dict(dtype=torch.float32, device=q.device)
    d_out = torch.zeros_like(v) if d_out is None else d_out
    d_var = q.new_empty(0, **f32) if d_var is None or not output_variance else d_var
    if dS is None:
        dS = torch.zeros(S0.shape[0], H, K, V, **f32)
    if dP is None or mode != "bayes":
        dP = q.new_empty(0, **f32)
    dq, dk, dv, dg, dbeta, dnoise, dS0, dP0 = chunk_bwd(
        q, k, v, g, beta, noise, S0, P0, cu_seqlens, factors, writes, status, d_out, d_var, dS, dP, mode, scale,
        output_variance, chunk_size)
    return (dq, dk, dv, dg, dbeta, dnoise, dS0, dP0 if mode == "bayes" else None, None, None, None,
            None, None, None, None)


chunk_fwd.register_autograd(_backward, setup_context=_setup_context)
