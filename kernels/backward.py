"""Backward of the chunked filter: Triton kernels for everything that touches values (V) and
for the key side of reset; autograd only for the key side of bayes (its covariance graph).

1. The forward's first two passes rerun (chunk_fwd.chunk_states) and give the chunk-boundary
   states, the write directions U, gains w, L⁻¹ and innovations E; the forward saves only
   its inputs.
2. chunk_bwd.py: the adjoint of the mean runs backwards over the chunks (`_dstate_kernel`),
   then chunk-parallel kernels form every sum over V: dV and the adjoints of the chunk's
   key-side products (A diag(w), L, diag(Λ_C· w) U, diag(Γ) Q, K̃, Γ_C; see that module).
3. Those products are functions of (q, k, g, beta) alone for reset: `_reset_keys_kernel`
   differentiates them by hand. For bayes they also depend on the process noise and the
   chunk's start covariance P_i: filter_math rebuilds them for all chunks at once under
   autograd, and vector-Jacobian products turn their adjoints into input gradients.
4. bayes also carries the covariance adjoint across chunks. With Kalman-optimal gains the
   first-order change of the gains drops out of the covariance update
   (d(P̄ − P̄kkᵀP̄/s) = (I − ukᵀ/s) dP̄ (I − ukᵀ/s)ᵀ), so P_{i+1} moves by Φ_i dP_i Φ_iᵀ, with
   Φ_i = Γ_C I − Uᵀ diag(Λ_C· w) L⁻¹ K̃ the chunk's closed-loop transition (the same Φ that
   carries the mean: S_{i+1} = Φ_i S_i + terms free of S_i). Hence
       dP_i = Φ_iᵀ dP_{i+1} Φ_i + (the chunk's own terms in P_i),
   a sweep that needs each chunk's own terms first: one extra VJP, before the full one.
"""

from __future__ import annotations

import torch
import triton

from titan_bayes.ops import filter_math as fm
from titan_bayes.ops.api import _Layout

from .chunk_bwd import _cov_sweep_kernel, _dstate_kernel, _local_kernel, _readout_map_kernel, _reset_keys_kernel, _square_kernel
from .chunk_fwd import _block_v, chunk_states

# Launch setting of the reverse state sweep (a module constant so a tuning script can try others).
DSTATE_WARPS = 4


def _key_block(K):
    """Width of the K blocks the chunk-parallel backward kernels loop over."""
    return min(max(16, triton.next_power_of_2(K)), 64)


def _boundary_states(slots, plan):
    """[n_slots, H, ...] → [N, n_max + 1, H, ...]: chunk i's start state for every document;
    past a document's last chunk (padding) its final state, which padding leaves unchanged."""
    i = torch.arange(plan.max_chunks + 1, device=slots.device)
    index = plan.slot0.long()[:, None] + torch.minimum(i[None, :], plan.per_doc[:, None])
    return slots[index]


def chunk_backward(mode, inputs, S0, P0, plan, cu_seqlens, grads, scale, output_variance, chunk_size):
    """inputs: (q, k, v, g, beta, noise) as given to the forward, [B, T, H, ...] contiguous;
    grads: (dO, dvar or None, dS_final or None, dP_final or None).
    Returns (dq, dk, dv, dg, dbeta, dnoise, dS0, dP0) in the inputs' layouts (dP0 None for reset)."""
    q, k, v, g, beta, noise = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    d_out, d_var, dS_final, dP_final = grads
    mid = chunk_states(mode, q, k, v, g, beta, noise, S0, P0, plan, False, C)
    sums = _value_sums(q, k, g, d_out.contiguous(), mid, plan, dS_final, scale, C)
    dv = sums["dR"].view(B, T, H, V).to(v.dtype)
    dS0 = sums["dh_slots"][plan.slot0.long()].contiguous()
    if mode == "reset":
        dq, dk, dg, dbeta = _reset_keys(q, k, g, beta, sums, plan, C)
        return dq, dk, dv, dg, dbeta, torch.zeros_like(noise), dS0, None
    d_var = d_var if output_variance else None
    dq, dk, dg, dbeta, dnoise, dP0 = _bayes_keys(inputs, mid, sums, plan, cu_seqlens, d_var, dP_final, scale, C)
    return dq, dk, dv, dg, dbeta, dnoise, dS0, dP0


def _value_sums(q, k, g, d_out, mid, plan, dS_final, scale, C):
    """Run the value kernels of chunk_bwd.py. Returns token-major fp32 adjoints (see that
    module): Gs, dL [B·T, H, C], dQS, EdS, dKt [B·T, H, K], dR [B·T, H, V] (= dV), dgc
    [n_chunks, H] (of Γ_C) and dh_slots (the state adjoints at every chunk boundary)."""
    B, T, H, K = q.shape
    V = d_out.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    n_tok, N = B * T, plan.n_docs
    BK = max(16, triton.next_power_of_2(K))
    BKB = _key_block(K)
    BV = _block_v(K, V)
    BVL = min(64, max(16, triton.next_power_of_2(V)))
    grid_cc = (plan.n_chunks, H)
    dS_final = torch.zeros(N, H, K, V, **f32) if dS_final is None else dS_final.float().contiguous()
    mo = torch.empty(n_tok, H, C, **f32)
    _readout_map_kernel[grid_cc](q, mid.u, g, mid.w, mid.linv, plan.chunks, plan.cu, mo, scale, H,
                                 K=K, BKB=BKB, C=C, num_warps=4)
    dh_slots = torch.empty_like(mid.h_slots)
    dR = torch.empty(n_tok, H, V, **f32)
    _dstate_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, g, mid.u, mid.w, mid.linv, mo, d_out, dS_final, plan.cu, plan.slot0, dh_slots, dR, scale, H,
        K=K, V=V, BK=BK, BV=BV, C=C, U_IS_K=mid.u is k, num_warps=DSTATE_WARPS, num_stages=1)
    n_kb = triton.cdiv(K, BKB)
    dQS, EdS, dKt = (torch.empty(n_tok, H, K, **f32) for _ in range(3))
    dgc_blocks = torch.empty(n_kb, plan.n_chunks, H, **f32)
    _local_kernel[(n_kb, plan.n_chunks, H)](
        mid.e, d_out, dR, mid.h_slots, dh_slots, plan.chunks, plan.cu, plan.slot0,
        dQS, EdS, dKt, dgc_blocks, scale, H, plan.n_chunks, K=K, V=V, BKB=BKB, BV=BVL, C=C, num_warps=4)
    Gs, dL = torch.empty(n_tok, H, C, **f32), torch.empty(n_tok, H, C, **f32)
    _square_kernel[grid_cc](mid.e, d_out, dR, plan.chunks, plan.cu, Gs, dL, scale, H, V=V, BV=BVL, C=C,
                            num_warps=4)
    return dict(Gs=Gs, dL=dL, dQS=dQS, EdS=EdS, dKt=dKt, dR=dR, dgc=dgc_blocks.sum(0), dh_slots=dh_slots)


def _reset_keys(q, k, g, beta, sums, plan, C):
    """dq, dk, dg, dbeta of reset: one chunk-parallel kernel (chunk_bwd._reset_keys_kernel)."""
    H, K = q.shape[2], q.shape[3]
    dq, dk, dg, dbeta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g), torch.empty_like(beta)
    BKB = _key_block(K)
    _reset_keys_kernel[(plan.n_chunks, H)](
        q, k, g, beta, sums["Gs"], sums["dL"], sums["dQS"], sums["EdS"], sums["dKt"], sums["dgc"],
        plan.chunks, plan.cu, dq, dk, dg, dbeta, H, K=K, BKB=BKB, C=C, num_warps=4)
    return dq, dk, dg, dbeta


def _bayes_keys(inputs, mid, sums, plan, cu_seqlens, d_var, dP_final, scale, C):
    """dq, dk, dg, dbeta, dnoise and dP0 of bayes: filter_math rebuilds the key-side quantities
    of every chunk ([N, H, n, C, ...]) under autograd from the chunked inputs and their start
    covariances; one VJP gives each chunk's own terms in P_i for the covariance sweep, a
    second one everything."""
    q, k, v, g, beta, noise = inputs
    B, T, H, K = q.shape
    N = plan.n_docs
    layout = _Layout(cu_seqlens, T, C)
    n = layout.padded // C

    def chunked(x, fill=0.0):  # token-major [B, T, H, ...] → [N, H, n, C, ...] fp32
        x = layout._pack_one(x.float(), fill)
        return x.reshape(x.shape[0], H, n, C, *x.shape[3:])

    leaves = [chunked(x, fill).requires_grad_() for x, fill in zip((q, k, g, beta, noise), (0.0, 0.0, 0.0, 0.5, 0.0))]
    adj = {name: chunked(sums[name].view(B, T, H, -1)) for name in ("Gs", "dL", "dQS", "EdS", "dKt")}
    dgc = torch.zeros(N, plan.max_chunks, H, dtype=torch.float32, device=q.device)
    chunks = plan.chunks.long()
    dgc[chunks[:, 0], chunks[:, 1]] = sums["dgc"]
    P_i = _boundary_states(mid.p_slots, plan)[:, :n].transpose(1, 2).contiguous().requires_grad_()
    dP_final = P_i.new_zeros(N, H, K, K) if dP_final is None else dP_final.float()
    with torch.enable_grad():
        qc, kc, gc, bc, nc = leaves
        log_gamma, decay = fm.chunk_decays(gc)
        gamma = log_gamma.exp()
        d = fm.accumulated_noise(decay, nc)
        L, w, U, P_C, _ = fm.chunk_covariance(kc, P_i, log_gamma, decay, d, fm.observation_noise(bc))
        last = decay[..., -1, :]                                   # Λ_C,s
        outs = [(qc @ U.transpose(-1, -2)) * decay * w[..., None, :], L, (last * w)[..., None] * U,
                gamma[..., None] * qc, gamma[..., None] * kc, gamma[..., -1]]
        adjs = [adj["Gs"], adj["dL"], adj["EdS"], adj["dQS"], adj["dKt"], dgc.transpose(1, 2)]
        if d_var is not None:
            outs.append(fm.chunk_variance(qc, P_i, log_gamma, decay, d, U, w, scale))
            adjs.append(chunked(d_var.view(B, T, H)))
        (own_P,) = torch.autograd.grad(outs, [P_i], adjs, retain_graph=True)
        transition = (U.detach(), L.detach(), w.detach(), gamma.detach(), last.detach(), kc.detach())
        dP_ends, dP0 = _covariance_sweep(transition, own_P, dP_final)
        got = torch.autograd.grad(outs + [P_C], leaves, adjs + [dP_ends])

    def unchunked(gr, like):
        gr = gr.reshape(gr.shape[0], H, n * C, *gr.shape[4:])
        gr = layout.unpack(gr if gr.dim() == 4 else gr[..., None])
        return (gr if like.dim() == 4 else gr[..., 0]).to(like.dtype).contiguous()

    return (*(unchunked(gr, x) for gr, x in zip(got, (q, k, g, beta, noise))), dP0)


@torch.no_grad()
def _covariance_sweep(transition, own_P, dP_final):
    """dP_i = Φ_iᵀ dP_{i+1} Φ_i + own_i for i = n−1 … 0, from dP_n = dP_final, all symmetrised
    (P is symmetrised in the forward, so only sym(dP) acts on it).

    Φ = Γ_C I − Uᵀ B with B = diag(Λ_C· w) L⁻¹ K̃ [C, K]: a rank-C change of a multiple of I,
    so Φᵀ dP Φ costs a few [C, K] × [K, K] products (chunk_bwd._cov_sweep_kernel).
    Returns (the adjoints of every chunk's end covariance [N, H, n, K, K], dP_0)."""
    U, L, w, gamma, last, k = transition
    N, H, n, C, K = U.shape
    B = (last * w)[..., None] * torch.linalg.solve_triangular(L, gamma[..., None] * k, upper=False,
                                                              unitriangular=True)
    d = (0.5 * (dP_final + dP_final.transpose(-1, -2))).contiguous()
    own = (0.5 * (own_P + own_P.transpose(-1, -2))).contiguous()
    ends = torch.empty_like(own)
    z = torch.empty(N * H, C, K, dtype=torch.float32, device=U.device)
    BP = _key_block(K)
    _cov_sweep_kernel[(N * H,)](U.contiguous(), B.contiguous(), gamma[..., -1].contiguous(), own, d, ends, z, n,
                                K=K, BP=BP, C=C, num_warps=8, num_stages=1)
    return ends, d
