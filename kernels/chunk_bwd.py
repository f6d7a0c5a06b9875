"""Triton kernels of the backward pass: the mean (value) part, shared by bayes and reset, and
the key side of reset.

Per chunk the forward reads out (filter_math.chunk_readout, with E = L⁻¹ R the innovations,
R = V − K̃ S0 the residuals, w the gains):
    O   = scale · [diag(Γ) Q S0 + A diag(w) E],   A = tril(Q Uᵀ) ∘ Λ
    S_C = Γ_C S0 + (diag(Λ_C· w) U)ᵀ E.
Given dO and the adjoint dS_C of the chunk's end state, the chain rule gives the adjoint of
the innovations and of the residuals,
    dE  = diag(w) [scale · Aᵀ dO + diag(Λ_C·) U dS_C] = Ma dO + diag(w Λ_C·) U dS_C,
    dR  = L⁻ᵀ dE = dV,
    dS0 = Γ_C dS_C + scale · (diag(Γ) Q)ᵀ dO − K̃ᵀ dR = Γ_C dS_C + scale · (diag(Γ) Q)ᵀ dO − Wᵀ dE,
with W = L⁻¹ K̃ the forward's whitened keys. So the adjoint of the state runs backwards over
the chunks like the forward h-loop (`_dstate_kernel`, one program per (document, head,
V block)) with three products per chunk. The part Ma dO of dE, with the C × C map
Ma = scale · diag(w) Aᵀ, needs no state: it is formed before the sweep, parallel over chunks
(`_local_de_kernel`), as fla forms its local dv, so the sweep's serial chain is one product
shorter; dR = L⁻ᵀ dE after it, parallel over chunks (`_square_kernel`). Everything else is local to a chunk and needs a sum over V, which
`_square_kernel` (C × C results) and `_local_terms` (C × K results, per K block) form: the
adjoints of the chunk's key-side products
    A diag(w) ← Gs = scale · dO Eᵀ,    L ← dL = −dR Eᵀ (strictly lower: E = L⁻¹ R),
    diag(Λ_C· w) U ← E dS_Cᵀ,   diag(Γ) Q ← scale · dO S0ᵀ,   K̃ ← −dR S0ᵀ,   Γ_C ← ⟨S0, dS_C⟩.
For reset `_reset_local_keys_kernel` turns these into dq, dk, dg, dbeta as it forms them,
K block by K block (the formulas are in it; the C × K terms never reach memory); for bayes
`_local_kernel` stores them and the kernels of bayes_keys.py differentiate through the chunk's
LDLᵀ factorisation and its covariance.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import _chunk_decays, _chunk_end, _chunk_tokens


@triton.jit
def _local_de_kernel(q_ptr, u_ptr, g_ptr, w_ptr, do_ptr, chunk_ptr, cu_ptr, de_ptr, scale, H,
                     K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """Ma dO, the part of dE that needs no state, with the readout map Ma = scale · diag(w) Aᵀ
    of one chunk, A = tril(Q Uᵀ) ∘ Λ: stored in de for the reverse sweep to complete."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    QU = tl.zeros([C, C], dtype=tl.float32)
    for kb in range(0, K, BKB):
        cols = kb + tl.arange(0, BKB)
        kmask = valid[:, None] & (cols[None, :] < K)
        qc = tl.load(q_ptr + tok[:, None] * K + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
        U = tl.load(u_ptr + tok[:, None] * K + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
        QU += tl.dot(qc, tl.trans(U))
    _, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    w = tl.load(w_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    Ma = scale * tl.trans(QU * decay) * w[:, None]
    for vb in range(0, V, BV):
        vv = vb + tl.arange(0, BV)
        vmask = valid[:, None] & (vv[None, :] < V)
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        tl.store(de_ptr + tok[:, None] * V + vv[None, :], tl.dot(Ma, dO), mask=vmask)


@triton.jit
def _dstate_kernel(q_ptr, g_ptr, u_ptr, w_ptr, wk_ptr, do_ptr, dsf_ptr, cu_ptr, slot_ptr,
                   dh_ptr, ds0_ptr, de_ptr, scale, H,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                   KEY_DOTS: tl.constexpr, UPDATE_16: tl.constexpr):
    """Reverse h-loop. dh slot slot0 + i + 1 receives the adjoint of the state at the end of
    chunk i, in the slots' dtype (bf16 with 16-bit keys, like the forward's h slots), ds0 the
    initial state's adjoint in fp32 (slot0 stays unused); also completes dE per token (de
    holds Ma dO on entry, from _local_de_kernel). The loop carries dS in fp32."""
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
        tl.store(dh_ptr + ((slot0 + i + 1) * H + h).to(tl.int64) * K * V + state_off,
                 dS.to(dh_ptr.dtype.element_ty), mask=state_mask)
        rows = bos + i * C + idx
        valid = rows < eos
        tok = rows * H + h
        kmask = valid[:, None] & (kk[None, :] < K)
        vmask = valid[:, None] & (vv[None, :] < V)
        U = tl.load(u_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0)
        w = tl.load(w_ptr + tok, mask=valid, other=0.0).to(tl.float32)
        gamma, gamma_C, last = _chunk_end(g_ptr, tok, valid, C)
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        # U·dS takes U as stored (bf16 in training: reset's keys, bayes' copy) and dS rounded
        # to it: bf16 tensor-core products, as the forward rounds S in W·S (_mean_kernel). On
        # an H100 at K = 256: 5.9 → 3.6 ms for this kernel, 6e-4 relative change in dR. The transposed
        # products below take bf16 only with UPDATE_16, their operands read transposed from
        # memory: bf16 register transposes made Triton 3.6 on Hopper produce illegal memory
        # accesses, and so did UPDATE_16 itself at K = 128 (backward.DSTATE_UPDATE_16).
        if KEY_DOTS:
            UdS = tl.dot(U, dS.to(U.dtype))
        else:
            UdS = tl.dot(U.to(tl.float32), dS)
        dE = tl.load(de_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0) + (w * last)[:, None] * UdS
        tl.store(de_ptr + tok[:, None] * V + vv[None, :], dE, mask=vmask)
        if UPDATE_16:
            # (ΓQ)ᵀ and Wᵀ read transposed from memory ([K, C]) and the bf16 products with dO
            # and dE rounded to bf16, as the forward's update (chunk_fwd.bf16_dots). Both
            # products accumulate into dS itself (tl.dot's acc, the second with −dE): their
            # difference would hold another [K, BV] fp32 result in registers.
            kmask_t = (kk[:, None] < K) & valid[None, :]
            qt = tl.load(q_ptr + tok[None, :] * K + kk[:, None], mask=kmask_t, other=0.0)
            Wt = tl.load(wk_ptr + tok[None, :] * K + kk[:, None], mask=kmask_t, other=0.0)
            qt = (qt * (scale * gamma)[None, :]).to(Wt.dtype)
            dS = tl.dot(qt, dO.to(Wt.dtype), gamma_C * dS)
            dS = tl.dot(Wt, (-dE).to(Wt.dtype), dS)
        else:
            qc = tl.load(q_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
            Wk = tl.load(wk_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
            dS = tl.dot(tl.trans(qc * (scale * gamma)[:, None]), dO.to(tl.float32), gamma_C * dS)
            dS = tl.dot(tl.trans(Wk), -dE, dS)
    tl.store(ds0_ptr + pid.to(tl.int64) * K * V + state_off, dS, mask=state_mask)


@triton.jit
def _local_terms(e_ptr, do_ptr, dr_ptr, start, end_adjoint, tok, valid, kk, K: tl.constexpr, V: tl.constexpr,
                 BKB: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SLOT_DOTS: tl.constexpr):
    """The sums over V of one K block of a chunk (kk its columns; start, end_adjoint: the
    chunk's start state and end-state adjoint slots): dO S0ᵀ, E dS_Cᵀ, −dR S0ᵀ and the
    block's per-column part of ⟨S0, dS_C⟩."""
    dQS = tl.zeros([C, BKB], dtype=tl.float32)
    EdS = tl.zeros([C, BKB], dtype=tl.float32)
    dKt = tl.zeros([C, BKB], dtype=tl.float32)
    dgc = tl.zeros([BKB], dtype=tl.float32)
    for vb in range(0, V, BV):
        vv = vb + tl.arange(0, BV)
        vmask = valid[:, None] & (vv[None, :] < V)
        smask = (kk[:, None] < K) & (vv[None, :] < V)
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        E = tl.load(e_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        dR = tl.load(dr_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        if SLOT_DOTS:
            # bf16 slots read transposed from memory ([BV, BKB], no register transpose), the
            # fp32 rows rounded to bf16: the products on bf16 tensor cores.
            smask_t = (vv[:, None] < V) & (kk[None, :] < K)
            S0t = tl.load(start + kk[None, :] * V + vv[:, None], mask=smask_t, other=0.0)
            dSCt = tl.load(end_adjoint + kk[None, :] * V + vv[:, None], mask=smask_t, other=0.0)
            dQS += tl.dot(dO.to(S0t.dtype), S0t)
            EdS += tl.dot(E.to(S0t.dtype), dSCt)
            dKt -= tl.dot(dR.to(S0t.dtype), S0t)
            dgc += tl.sum(S0t.to(tl.float32) * dSCt.to(tl.float32), 0)
        else:
            # fp32 products (bf16 transposed register operands are where Triton 3.6
            # miscompiles on Hopper, see _dstate_kernel).
            S0 = tl.load(start + kk[:, None] * V + vv[None, :], mask=smask, other=0.0).to(tl.float32)
            dSC = tl.load(end_adjoint + kk[:, None] * V + vv[None, :], mask=smask, other=0.0).to(tl.float32)
            dQS += tl.dot(dO.to(tl.float32), tl.trans(S0))
            EdS += tl.dot(E, tl.trans(dSC))
            dKt -= tl.dot(dR.to(tl.float32), tl.trans(S0))
            dgc += tl.sum(S0 * dSC, 1)
    return dQS, EdS, dKt, dgc


@triton.jit
def _slots_of_chunk(h_ptr, dh_ptr, slot_ptr, n, i, h, H, K: tl.constexpr, V: tl.constexpr):
    """The chunk's start state slot and its end state's adjoint slot."""
    slot = tl.load(slot_ptr + n) + i
    return (h_ptr + (slot * H + h).to(tl.int64) * K * V,
            dh_ptr + ((slot + 1) * H + h).to(tl.int64) * K * V)


@triton.jit
def _local_kernel(e_ptr, do_ptr, dr_ptr, h_ptr, dh_ptr, chunk_ptr, cu_ptr, slot_ptr,
                  dqs_ptr, eds_ptr, dkt_ptr, dgc_ptr, scale, H, n_chunks,
                  K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                  SLOT_DOTS: tl.constexpr):
    """bayes: the C × K local terms for one K block of a chunk, stored for bayes_keys.py:
    scale·dO S0ᵀ, E dS_Cᵀ, −dR S0ᵀ, and this block's part of ⟨S0, dS_C⟩."""
    pid_k, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    start, end_adjoint = _slots_of_chunk(h_ptr, dh_ptr, slot_ptr, n, i, h, H, K, V)
    kk = pid_k * BKB + tl.arange(0, BKB)
    dQS, EdS, dKt, dgc = _local_terms(e_ptr, do_ptr, dr_ptr, start, end_adjoint, tok, valid, kk,
                                      K, V, BKB, BV, C, SLOT_DOTS)
    kmask = valid[:, None] & (kk[None, :] < K)
    out = tok[:, None] * K + kk[None, :]
    tl.store(dqs_ptr + out, scale * dQS, mask=kmask)
    tl.store(eds_ptr + out, EdS, mask=kmask)
    tl.store(dkt_ptr + out, dKt, mask=kmask)
    tl.store(dgc_ptr + (pid_k * n_chunks + c) * H + h, tl.sum(dgc, 0))


@triton.jit
def _square_kernel(e_ptr, do_ptr, de_ptr, linv_ptr, chunk_ptr, cu_ptr, dr_ptr, gs_ptr, dl_ptr, scale, H,
                   q_ptr, k_ptr, g_ptr, beta_ptr, dg_part_ptr, dbeta_part_ptr, part0,
                   K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                   RESET: tl.constexpr):
    """dR = L⁻ᵀ dE (stored in dr's dtype: it is dV), and the C × C local terms of a chunk:
    Gs = scale·dO Eᵀ (lower with the diagonal) and dL = −dR Eᵀ (strictly lower), stored in gs and
    dl. RESET: these go on into reset's C × C adjoints (_reset_cc_adjoints), stored instead:
    X in gs, Y + Yᵀ in dl, and the chunk's dg and dbeta parts from them at part row part0."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    idx = tl.arange(0, C)
    Linv = tl.load(linv_ptr + tok[:, None] * C + idx[None, :], mask=valid[:, None], other=0.0)
    G = tl.zeros([C, C], dtype=tl.float32)
    dL = tl.zeros([C, C], dtype=tl.float32)
    for vb in range(0, V, BV):
        vv = vb + tl.arange(0, BV)
        vmask = valid[:, None] & (vv[None, :] < V)
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        E = tl.load(e_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        dE = tl.load(de_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        dR = tl.dot(tl.trans(Linv), dE)
        tl.store(dr_ptr + tok[:, None] * V + vv[None, :], dR.to(dr_ptr.dtype.element_ty), mask=vmask)
        G += tl.dot(dO, tl.trans(E))
        dL -= tl.dot(dR, tl.trans(E))
    Gs = tl.where(idx[:, None] >= idx[None, :], scale * G, 0.0)
    dL = tl.where(idx[:, None] > idx[None, :], dL, 0.0)
    out = tok[:, None] * C + idx[None, :]
    if RESET:
        X, XY, dg, dbeta = _reset_cc_adjoints(q_ptr, k_ptr, g_ptr, beta_ptr, Gs, dL, rows, valid, tok, h, H,
                                              K, BKB, C)
        tl.store(gs_ptr + out, X, mask=valid[:, None])
        tl.store(dl_ptr + out, XY, mask=valid[:, None])
        tl.store(dg_part_ptr + part0 + tok, dg, mask=valid)
        tl.store(dbeta_part_ptr + part0 + tok, dbeta, mask=valid)
    else:
        tl.store(gs_ptr + out, Gs, mask=valid[:, None])
        tl.store(dl_ptr + out, dL, mask=valid[:, None])


@triton.jit
def _reverse_cumsum(x):
    """y_t = Σ_{t' ≥ t} x_t' (g_t enters every log decay lgΓ_t' with t' ≥ t)."""
    return tl.sum(x, 0) - tl.cumsum(x, 0) + x


@triton.jit
def _reset_cc_adjoints(q_ptr, k_ptr, g_ptr, beta_ptr, Gs, dL, rows, valid, tok, h, H, K: tl.constexpr,
                       BKB: tl.constexpr, C: tl.constexpr):
    """reset's C × C algebra of one chunk (U = K, w = beta):
        A_ts = (q_t·k_s) Λ_ts,  L_ts = (k_t·k_s) Λ_ts beta_s (s < t),  Λ_ts = exp(lgΓ_t − lgΓ_s),
    given the adjoints Gs of A diag(beta) and dL of L. Returns the adjoints of Q Kᵀ and K Kᵀ,
    X = Gs ∘ Λ ∘ beta_s and Y + Yᵀ with Y = strict(dL ∘ Λ ∘ beta_s) (as one symmetric matrix: K Kᵀ
    is), and the parts of dg and dbeta that flow through Λ and beta here. The parts through the
    local terms (Γ dQ_S, Γ dK̃, Λ_C· beta E dS_Cᵀ, Γ_C) come per K block in
    _reset_local_keys_kernel."""
    idx = tl.arange(0, C)
    QK = tl.zeros([C, C], dtype=tl.float32)
    KK = tl.zeros([C, C], dtype=tl.float32)
    for kb in range(0, K, BKB):
        cols = kb + tl.arange(0, BKB)
        kmask = valid[:, None] & (cols[None, :] < K)
        qc = tl.load(q_ptr + tok[:, None] * K + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + tok[:, None] * K + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
        QK += tl.dot(qc, tl.trans(kc))
        KK += tl.dot(kc, tl.trans(kc))
    _, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    strict = idx[:, None] > idx[None, :]
    X = Gs * decay * beta[None, :]
    Y = tl.where(strict, dL * decay * beta[None, :], 0.0)
    decay_adj = Gs * QK * beta[None, :] + tl.where(strict, dL * KK * beta[None, :], 0.0)
    dbeta = tl.sum(Gs * QK * decay, 0) + tl.sum(tl.where(strict, dL * KK * decay, 0.0), 0)
    # Λ_ts = exp(lgΓ_t − lgΓ_s): its adjoint flows + to lgΓ_t and − to lgΓ_s.
    flow = decay_adj * decay
    return X, Y + tl.trans(Y), _reverse_cumsum(tl.sum(flow, 1) - tl.sum(flow, 0)), dbeta


@triton.jit
def _reset_local_keys_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, e_ptr, do_ptr, dr_ptr, h_ptr, dh_ptr, x_ptr, xy_ptr,
                             chunk_ptr, cu_ptr, slot_ptr, dq_ptr, dk_ptr, dg_part_ptr, dbeta_part_ptr,
                             scale, H, n_tok,
                             K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr,
                             C: tl.constexpr, SLOT_DOTS: tl.constexpr):
    """dq, dk of one K block of a chunk of reset, and this block's parts of dg and dbeta, from the
    local terms and the chunk's X, Y + Yᵀ (_reset_cc_adjoints, which need no sum over K):
        dq = X K + Γ dQ_S,   dk = Xᵀ Q + (Y + Yᵀ) K + Γ dK̃ + Λ_C· beta E dS_Cᵀ,
    so the C × K local terms never reach memory. The rest of dg and dbeta is linear in row dots
    of this block (q·dQ_S, k·dK̃, k·(E dS_Cᵀ)) and its part of ⟨S0, dS_C⟩: every block stores its
    own part (dg_part, dbeta_part [parts, B·T, H], summed afterwards)."""
    pid_k, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    start, end_adjoint = _slots_of_chunk(h_ptr, dh_ptr, slot_ptr, n, i, h, H, K, V)
    kk = pid_k * BKB + tl.arange(0, BKB)
    dQS, EdS, dKt, dgc = _local_terms(e_ptr, do_ptr, dr_ptr, start, end_adjoint, tok, valid, kk,
                                      K, V, BKB, BV, C, SLOT_DOTS)
    dQS = scale * dQS
    idx = tl.arange(0, C)
    kmask = valid[:, None] & (kk[None, :] < K)
    off = tok[:, None] * K + kk[None, :]
    qc = tl.load(q_ptr + off, mask=kmask, other=0.0).to(tl.float32)
    kc = tl.load(k_ptr + off, mask=kmask, other=0.0).to(tl.float32)
    gamma, gamma_C, last = _chunk_end(g_ptr, tok, valid, C)
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    gamma_adj = tl.sum(qc * dQS, 1) + tl.sum(kc * dKt, 1)      # adjoint of Γ_t
    k_eds = tl.sum(kc * EdS, 1)
    cc = tok[:, None] * C + idx[None, :]
    X = tl.load(x_ptr + cc, mask=valid[:, None], other=0.0)
    tl.store(dq_ptr + off, (tl.dot(X, kc) + gamma[:, None] * dQS).to(dq_ptr.dtype.element_ty), mask=kmask)
    dk = tl.dot(tl.trans(X), qc) + gamma[:, None] * dKt + (last * beta)[:, None] * EdS
    dk += tl.dot(tl.load(xy_ptr + cc, mask=valid[:, None], other=0.0), kc)
    tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=kmask)
    # diag(Λ_C· beta) K with adjoint E dS_Cᵀ: Λ_C· is row C − 1 of Λ, so its part of Λ's
    # adjoint is one row, whose flow β_s k_eds_s Λ_C,s goes + to lgΓ_C and − to lgΓ_s.
    row_flow = beta * k_eds * last
    lg_adj = gamma * gamma_adj - row_flow
    lg_adj += tl.where(idx == C - 1, tl.sum(row_flow, 0) + gamma_C * tl.sum(dgc, 0), 0.0)
    part = pid_k.to(tl.int64) * n_tok * H + tok
    tl.store(dg_part_ptr + part, _reverse_cumsum(lg_adj), mask=valid)
    tl.store(dbeta_part_ptr + part, last * k_eds, mask=valid)
