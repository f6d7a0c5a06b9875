"""Triton kernels of the backward pass: the mean (value) part, shared by bayes and reset.

Per chunk the forward reads out (filter_math.chunk_readout, with W = diag(w) E the weighted
innovations and E = L⁻¹ R, R = V − K̃ S0 the residuals):
    O   = scale · [diag(Γ) Q S0 + A W],   A = tril(Q Uᵀ) ∘ Λ
    S_C = Γ_C S0 + Uᵀ diag(Λ_C·) W.
Given dO and the adjoint dS_C of the chunk's end state, the chain rule gives
    dW  = scale · Aᵀ dO + diag(Λ_C·) U dS_C,     dE = diag(w) dW,     dR = L⁻ᵀ dE = dV,
    dS0 = Γ_C dS_C + scale · (diag(Γ) Q)ᵀ dO − K̃ᵀ dR,
so the adjoint of the state runs backwards over the chunks exactly like the forward h-loop
(`_dstate_kernel`, one program per (document, head, V block)). Everything else is local to a
chunk and needs a sum over V, which `_local_kernel` (C × K results, per K block) and
`_square_kernel` (C × C results) form:
    dA = scale · dO Wᵀ,   dL = −dR Eᵀ (strictly lower: E = L⁻¹ R),   dw = rowsum(E ∘ dW),
    dQ_S = scale · dO S0ᵀ (→ Q through diag(Γ) Q),   dU_S = W dS_Cᵀ (→ U through diag(Λ_C·) U),
    dK̃ = −dR S0ᵀ,   dΓ_C = ⟨S0, dS_C⟩.
backward.py hands these to autograd on the small per-chunk graph that made A, L, w, U, K̃, Γ
from q, k, g, beta (and P for bayes), which turns them into input gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import _chunk_decays, _last_row


@triton.jit
def _dstate_kernel(q_ptr, k_ptr, g_ptr, u_ptr, w_ptr, linv_ptr, do_ptr, dsf_ptr, cu_ptr, slot_ptr,
                   dh_ptr, dw_ptr, dr_ptr, scale, H,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """Reverse h-loop. dh slot j receives the adjoint of the state at chunk boundary j (slot0 +
    i + 1: the end of chunk i; slot0: the initial state); also stores dW and dR per token."""
    pid_v, pid = tl.program_id(0), tl.program_id(1)
    n, h = pid // H, pid % H
    bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    slot0 = tl.load(slot_ptr + n)
    idx = tl.arange(0, C)
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    state_mask = (kk[:, None] < K) & (vv[None, :] < V)
    state_off = kk[:, None] * V + vv[None, :]
    dS = tl.load(dsf_ptr + pid.to(tl.int64) * K * V + state_off, mask=state_mask, other=0.0)
    n_chunks = tl.cdiv(eos - bos, C)
    for j in range(n_chunks):
        i = n_chunks - 1 - j
        tl.store(dh_ptr + ((slot0 + i + 1) * H + h).to(tl.int64) * K * V + state_off, dS, mask=state_mask)
        rows = bos + i * C + idx
        valid = rows < eos
        tok = rows * H + h
        kmask = valid[:, None] & (kk[None, :] < K)
        vmask = valid[:, None] & (vv[None, :] < V)
        qc = tl.load(q_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
        U = tl.load(u_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + tok, mask=valid, other=0.0).to(tl.float32)
        lg, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
        gamma = tl.exp(lg)
        last = _last_row(decay, C)
        gamma_C = tl.exp(tl.sum(tl.where(idx == C - 1, lg, 0.0), 0))
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        A = tl.dot(qc, tl.trans(U)) * decay                    # decay is 0 above the diagonal
        dW = scale * tl.dot(tl.trans(A), dO) + last[:, None] * tl.dot(U, dS)
        Linv = tl.load(linv_ptr + tok[:, None] * C + idx[None, :], mask=valid[:, None], other=0.0)
        dR = tl.dot(tl.trans(Linv), w[:, None] * dW)
        tl.store(dw_ptr + tok[:, None] * V + vv[None, :], dW, mask=vmask)
        tl.store(dr_ptr + tok[:, None] * V + vv[None, :], dR, mask=vmask)
        dS = (gamma_C * dS + scale * tl.dot(tl.trans(qc * gamma[:, None]), dO)
              - tl.dot(tl.trans(kc * gamma[:, None]), dR))
    tl.store(dh_ptr + (slot0 * H + h).to(tl.int64) * K * V + state_off, dS, mask=state_mask)


@triton.jit
def _local_kernel(w_ptr, e_ptr, do_ptr, dr_ptr, h_ptr, dh_ptr, chunk_ptr, cu_ptr, slot_ptr,
                  dqs_ptr, dus_ptr, dkt_ptr, dgc_ptr, scale, H, n_chunks,
                  K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """The C × K local terms for one K block of a chunk: dQ_S, dU_S, dK̃, and its part of dΓ_C."""
    pid_k, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i = tl.load(chunk_ptr + 2 * c), tl.load(chunk_ptr + 2 * c + 1)
    bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    slot = tl.load(slot_ptr + n) + i
    idx = tl.arange(0, C)
    kk = pid_k * BKB + tl.arange(0, BKB)
    rows = bos + i * C + idx
    valid = rows < eos
    tok = rows * H + h
    w = tl.load(w_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    start = h_ptr + (slot * H + h).to(tl.int64) * K * V
    end_adjoint = dh_ptr + ((slot + 1) * H + h).to(tl.int64) * K * V
    dQS = tl.zeros([C, BKB], dtype=tl.float32)
    dUS = tl.zeros([C, BKB], dtype=tl.float32)
    dKt = tl.zeros([C, BKB], dtype=tl.float32)
    dgc = tl.zeros([BKB], dtype=tl.float32)
    for vb in range(0, V, BV):
        vv = vb + tl.arange(0, BV)
        vmask = valid[:, None] & (vv[None, :] < V)
        smask = (kk[:, None] < K) & (vv[None, :] < V)
        S0 = tl.load(start + kk[:, None] * V + vv[None, :], mask=smask, other=0.0)
        dSC = tl.load(end_adjoint + kk[:, None] * V + vv[None, :], mask=smask, other=0.0)
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        E = tl.load(e_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        dR = tl.load(dr_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        dQS += tl.dot(dO, tl.trans(S0))
        dUS += tl.dot(E * w[:, None], tl.trans(dSC))
        dKt -= tl.dot(dR, tl.trans(S0))
        dgc += tl.sum(S0 * dSC, 1)
    kmask = valid[:, None] & (kk[None, :] < K)
    out = tok[:, None] * K + kk[None, :]
    tl.store(dqs_ptr + out, scale * dQS, mask=kmask)
    tl.store(dus_ptr + out, dUS, mask=kmask)
    tl.store(dkt_ptr + out, dKt, mask=kmask)
    tl.store(dgc_ptr + (pid_k * n_chunks + c) * H + h, tl.sum(dgc, 0))


@triton.jit
def _square_kernel(w_ptr, e_ptr, do_ptr, dr_ptr, dw_ptr, chunk_ptr, cu_ptr, da_ptr, dl_ptr, dgain_ptr,
                   scale, H, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """The C × C local terms of a chunk: dA (lower with the diagonal), dL (strictly lower), dw."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i = tl.load(chunk_ptr + 2 * c), tl.load(chunk_ptr + 2 * c + 1)
    bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    idx = tl.arange(0, C)
    rows = bos + i * C + idx
    valid = rows < eos
    tok = rows * H + h
    w = tl.load(w_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    dA = tl.zeros([C, C], dtype=tl.float32)
    dL = tl.zeros([C, C], dtype=tl.float32)
    dgain = tl.zeros([C], dtype=tl.float32)
    for vb in range(0, V, BV):
        vv = vb + tl.arange(0, BV)
        vmask = valid[:, None] & (vv[None, :] < V)
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        E = tl.load(e_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        dR = tl.load(dr_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        dW = tl.load(dw_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        dA += tl.dot(dO, tl.trans(E * w[:, None]))
        dL -= tl.dot(dR, tl.trans(E))
        dgain += tl.sum(E * dW, 1)
    out = tok[:, None] * C + idx[None, :]
    tl.store(da_ptr + out, tl.where(idx[:, None] >= idx[None, :], scale * dA, 0.0), mask=valid[:, None])
    tl.store(dl_ptr + out, tl.where(idx[:, None] > idx[None, :], dL, 0.0), mask=valid[:, None])
    tl.store(dgain_ptr + tok, dgain, mask=valid)
