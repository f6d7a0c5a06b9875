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
V block)) with three products per chunk, the C × C map Ma = scale · diag(w) Aᵀ formed once
per chunk (`_readout_map_kernel`), and dR = L⁻ᵀ dE after it, parallel over chunks
(`_square_kernel`). Everything else is local to a chunk and needs a sum over V, which
`_square_kernel` (C × C results) and `_local_kernel` (C × K results, per K block) form: the
adjoints of the chunk's key-side products
    A diag(w) ← Gs = scale · dO Eᵀ,    L ← dL = −dR Eᵀ (strictly lower: E = L⁻¹ R),
    diag(Λ_C· w) U ← E dS_Cᵀ,   diag(Γ) Q ← scale · dO S0ᵀ,   K̃ ← −dR S0ᵀ,   Γ_C ← ⟨S0, dS_C⟩.
For reset `_reset_keys_kernel` turns these into dq, dk, dg, dbeta (the formulas are in it);
for bayes the kernels of bayes_keys.py do (through the chunk's LDLᵀ factorisation and its
covariance).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import _chunk_decays, _chunk_end, _chunk_tokens, _last_row


@triton.jit
def _readout_map_kernel(q_ptr, u_ptr, g_ptr, w_ptr, chunk_ptr, cu_ptr, ma_ptr, scale, H,
                        K: tl.constexpr, BKB: tl.constexpr, C: tl.constexpr):
    """Ma = scale · diag(w) Aᵀ of one chunk, A = tril(Q Uᵀ) ∘ Λ, stored by rows [B·T, H, C]."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    idx = tl.arange(0, C)
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
    tl.store(ma_ptr + tok[:, None] * C + idx[None, :], Ma, mask=valid[:, None])


@triton.jit
def _dstate_kernel(q_ptr, g_ptr, u_ptr, w_ptr, wk_ptr, ma_ptr, do_ptr, dsf_ptr, cu_ptr, slot_ptr,
                   dh_ptr, ds0_ptr, de_ptr, scale, H,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                   KEY_DOTS: tl.constexpr, UPDATE_16: tl.constexpr):
    """Reverse h-loop. dh slot slot0 + i + 1 receives the adjoint of the state at the end of
    chunk i, in the slots' dtype (bf16 with 16-bit keys, like the forward's h slots), ds0 the
    initial state's adjoint in fp32 (slot0 stays unused); also stores dE per token. The loop
    carries dS in fp32."""
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
        gamma_C, last = _chunk_end(g_ptr, tok, valid, C)
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        Ma = tl.load(ma_ptr + tok[:, None] * C + idx[None, :], mask=valid[:, None], other=0.0)
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
        dE = tl.dot(Ma, dO) + (w * last)[:, None] * UdS
        tl.store(de_ptr + tok[:, None] * V + vv[None, :], dE, mask=vmask)
        gamma = tl.exp(tl.cumsum(tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float32), 0))
        if UPDATE_16:
            # (ΓQ)ᵀ and Wᵀ read transposed from memory ([K, C]) and the bf16 products with dO
            # and dE rounded to bf16, as the forward's update (chunk_fwd.bf16_dots).
            kmask_t = (kk[:, None] < K) & valid[None, :]
            qt = tl.load(q_ptr + tok[None, :] * K + kk[:, None], mask=kmask_t, other=0.0)
            Wt = tl.load(wk_ptr + tok[None, :] * K + kk[:, None], mask=kmask_t, other=0.0)
            qt = (qt * (scale * gamma)[None, :]).to(Wt.dtype)
            dS = gamma_C * dS + tl.dot(qt, dO.to(Wt.dtype)) - tl.dot(Wt, dE.to(Wt.dtype))
        else:
            qc = tl.load(q_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
            Wk = tl.load(wk_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
            dS = gamma_C * dS + scale * tl.dot(tl.trans(qc * gamma[:, None]), dO) - tl.dot(tl.trans(Wk), dE)
    tl.store(ds0_ptr + pid.to(tl.int64) * K * V + state_off, dS, mask=state_mask)


@triton.jit
def _local_kernel(e_ptr, do_ptr, dr_ptr, h_ptr, dh_ptr, chunk_ptr, cu_ptr, slot_ptr,
                  dqs_ptr, eds_ptr, dkt_ptr, dgc_ptr, scale, H, n_chunks,
                  K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                  SLOT_DOTS: tl.constexpr):
    """The C × K local terms for one K block of a chunk: scale·dO S0ᵀ, E dS_Cᵀ, −dR S0ᵀ, and
    this block's part of ⟨S0, dS_C⟩."""
    pid_k, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    slot = tl.load(slot_ptr + n) + i
    kk = pid_k * BKB + tl.arange(0, BKB)
    start = h_ptr + (slot * H + h).to(tl.int64) * K * V
    end_adjoint = dh_ptr + ((slot + 1) * H + h).to(tl.int64) * K * V
    dQS = tl.zeros([C, BKB], dtype=tl.float32)
    EdS = tl.zeros([C, BKB], dtype=tl.float32)
    dKt = tl.zeros([C, BKB], dtype=tl.float32)
    dgc = tl.zeros([BKB], dtype=tl.float32)
    for vb in range(0, V, BV):
        vv = vb + tl.arange(0, BV)
        vmask = valid[:, None] & (vv[None, :] < V)
        smask = (kk[:, None] < K) & (vv[None, :] < V)
        dO = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        E = tl.load(e_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
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
            dO = dO.to(tl.float32)
            dQS += tl.dot(dO, tl.trans(S0))
            EdS += tl.dot(E, tl.trans(dSC))
            dKt -= tl.dot(dR, tl.trans(S0))
            dgc += tl.sum(S0 * dSC, 1)
    kmask = valid[:, None] & (kk[None, :] < K)
    out = tok[:, None] * K + kk[None, :]
    tl.store(dqs_ptr + out, scale * dQS, mask=kmask)
    tl.store(eds_ptr + out, EdS, mask=kmask)
    tl.store(dkt_ptr + out, dKt, mask=kmask)
    tl.store(dgc_ptr + (pid_k * n_chunks + c) * H + h, tl.sum(dgc, 0))


@triton.jit
def _square_kernel(e_ptr, do_ptr, dr_ptr, linv_ptr, chunk_ptr, cu_ptr, gs_ptr, dl_ptr, scale, H,
                   V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """dR = L⁻ᵀ dE in place (dr holds dE on entry), and the C × C local terms of a chunk:
    Gs = scale·dO Eᵀ (lower with the diagonal) and dL = −dR Eᵀ (strictly lower)."""
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
        E = tl.load(e_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        dE = tl.load(dr_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0)
        dR = tl.dot(tl.trans(Linv), dE)
        tl.store(dr_ptr + tok[:, None] * V + vv[None, :], dR, mask=vmask)
        G += tl.dot(dO, tl.trans(E))
        dL -= tl.dot(dR, tl.trans(E))
    out = tok[:, None] * C + idx[None, :]
    tl.store(gs_ptr + out, tl.where(idx[:, None] >= idx[None, :], scale * G, 0.0), mask=valid[:, None])
    tl.store(dl_ptr + out, tl.where(idx[:, None] > idx[None, :], dL, 0.0), mask=valid[:, None])


@triton.jit
def _reset_keys_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, gs_ptr, dl_ptr, dqs_ptr, eds_ptr, dkt_ptr, dgc_ptr,
                       chunk_ptr, cu_ptr, dq_ptr, dk_ptr, dg_ptr, dbeta_ptr, H,
                       K: tl.constexpr, BKB: tl.constexpr, C: tl.constexpr):
    """dq, dk, dg, dbeta of reset from the key-side adjoints of one chunk (U = K, w = beta):
        A_ts = (q_t·k_s) Λ_ts,  L_ts = (k_t·k_s) Λ_ts beta_s (s < t),  Λ_ts = exp(lgΓ_t − lgΓ_s).
    A first pass over K blocks forms Q Kᵀ, K Kᵀ and the row dots; the C × C algebra gives the
    adjoints X of Q Kᵀ and Y of K Kᵀ, of Λ (→ log Γ → g by a reverse cumsum) and of beta; a
    second pass forms dq = X K + Γ dQ_S and dk = Xᵀ Q + (Y + Yᵀ) K + Γ dK̃ + Λ_C· beta E dS_Cᵀ."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    idx = tl.arange(0, C)
    QK = tl.zeros([C, C], dtype=tl.float32)
    KK = tl.zeros([C, C], dtype=tl.float32)
    gamma_adj = tl.zeros([C], dtype=tl.float32)       # adjoint of Γ_t: q_t·dQ_S,t + k_t·dK̃_t
    k_eds = tl.zeros([C], dtype=tl.float32)
    for kb in range(0, K, BKB):
        cols = kb + tl.arange(0, BKB)
        kmask = valid[:, None] & (cols[None, :] < K)
        off = tok[:, None] * K + cols[None, :]
        qc = tl.load(q_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        QK += tl.dot(qc, tl.trans(kc))
        KK += tl.dot(kc, tl.trans(kc))
        gamma_adj += tl.sum(qc * tl.load(dqs_ptr + off, mask=kmask, other=0.0), 1)
        gamma_adj += tl.sum(kc * tl.load(dkt_ptr + off, mask=kmask, other=0.0), 1)
        k_eds += tl.sum(kc * tl.load(eds_ptr + off, mask=kmask, other=0.0), 1)
    lg, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    gamma = tl.exp(lg)
    last = _last_row(decay, C)
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    cc = tok[:, None] * C + idx[None, :]
    Gs = tl.load(gs_ptr + cc, mask=valid[:, None], other=0.0)
    dL = tl.load(dl_ptr + cc, mask=valid[:, None], other=0.0)
    strict = idx[:, None] > idx[None, :]
    # A diag(beta) with adjoint Gs; L = I + strict(K Kᵀ ∘ Λ ∘ beta_s) with adjoint dL.
    X = Gs * decay * beta[None, :]
    Y = tl.where(strict, dL * decay * beta[None, :], 0.0)
    decay_adj = Gs * QK * beta[None, :] + tl.where(strict, dL * KK * beta[None, :], 0.0)
    beta_adj = tl.sum(Gs * QK * decay, 0) + tl.sum(tl.where(strict, dL * KK * decay, 0.0), 0)
    # diag(Λ_C· beta) K with adjoint E dS_Cᵀ: Λ_C· is row C − 1 of Λ.
    beta_adj += last * k_eds
    decay_adj += tl.where(idx[:, None] == C - 1, (beta * k_eds)[None, :], 0.0)
    # Λ_ts = exp(lgΓ_t − lgΓ_s): + to t, − to s; Γ_t = exp(lgΓ_t); Γ_C = Γ at row C − 1.
    flow = decay_adj * decay
    lg_adj = tl.sum(flow, 1) - tl.sum(flow, 0) + gamma * gamma_adj
    gamma_C = tl.sum(tl.where(idx == C - 1, gamma, 0.0), 0)
    lg_adj += tl.where(idx == C - 1, gamma_C * tl.load(dgc_ptr + c * H + h), 0.0)
    # g_t enters every lgΓ_t' with t' ≥ t: a reverse cumulative sum.
    dg = tl.sum(lg_adj, 0) - tl.cumsum(lg_adj, 0) + lg_adj
    tl.store(dg_ptr + tok, dg.to(dg_ptr.dtype.element_ty), mask=valid)
    tl.store(dbeta_ptr + tok, beta_adj.to(dbeta_ptr.dtype.element_ty), mask=valid)
    XY = Y + tl.trans(Y)
    for kb in range(0, K, BKB):
        cols = kb + tl.arange(0, BKB)
        kmask = valid[:, None] & (cols[None, :] < K)
        off = tok[:, None] * K + cols[None, :]
        qc = tl.load(q_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        dq = tl.dot(X, kc) + gamma[:, None] * tl.load(dqs_ptr + off, mask=kmask, other=0.0)
        dk = (tl.dot(tl.trans(X), qc) + tl.dot(XY, kc) + gamma[:, None] * tl.load(dkt_ptr + off, mask=kmask, other=0.0)
              + (last * beta)[:, None] * tl.load(eds_ptr + off, mask=kmask, other=0.0))
        tl.store(dq_ptr + off, dq.to(dq_ptr.dtype.element_ty), mask=kmask)
        tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=kmask)
