"""Triton kernels of the key side of bayes' backward: dq, dk, dg, dbeta, dnoise and dP0.

Per chunk (filter_math.chunk_covariance, stable form; P = the chunk's start covariance P_i):
    Λ_ts = Γ_t / Γ_s (t ≥ s),   d_t = Σ_j Λ_tj² q_j,   K̃ = diag(Γ) K,   r = (1 − β) / β
    S   = K̃ P K̃ᵀ + (K Kᵀ) ∘ Ψ + diag(r) = L D Lᵀ,   w = 1 / D,   Ψ_ts = Λ_ts d_s (t ≥ s, symmetric)
    X   = diag(Γ) K̃ P + diag(d) K,   U = M⁻¹ X with M = L ∘ Λ (M⁻¹ = L⁻¹ ∘ Λ)
    P_C = Γ_C² P + d_C I − Uᵀ diag(Λ_C·² w) U
The value kernels (chunk_bwd.py) give the adjoints of the products the readout uses:
    Â diag(w) ← Gs (Â = (Q Uᵀ) ∘ Λ),   L ← dL,   diag(Λ_C· w) U ← E dS_Cᵀ,   diag(Γ) Q ← dQS,
    K̃ ← dKt,   Γ_C ← dgc,   and with output_variance the variance
    var_t = scale² (Γ_t² q_tᵀ P q_t + d_t |q_t|² − Σ_s Â_ts² w_s) ← dvar,
and the covariance sweep gives the adjoint D̄ (symmetric) of P_C. Reverse mode, in the order
the kernels run it (a bar is an adjoint; Λ̄ and the log-decay adjoint lḡ collect along the way):
  1. Â diag(w) and the variance: dÂ = (Gs − 2 scale² diag(dvar) Â) diag(w), so
     Ū += Yᵀ Q, q̄ += Y U with Y = dÂ ∘ Λ; w̄_s = Σ_t Gs_ts Â_ts − scale² Σ_t dvar_t Â_ts².
  2. diag(Λ_C· w) U and P_C's −Uᵀ diag(Λ_C·² w) U, with Z = U D̄: Ū += diag(Λ_C· w) E dS_Cᵀ
     − 2 diag(Λ_C·² w) Z; w̄ and Λ̄_C· get the matching row dots u·EdS and u·Z.
  3. U = M⁻¹ X: X̄ = M⁻ᵀ Ū, M̄ = −X̄ Uᵀ (strictly lower: M is unit lower), L̄ += M̄ ∘ Λ,
     Λ̄ += M̄ ∘ L. Only X̄ Uᵀ = M⁻ᵀ (Ū Uᵀ) is needed here, a C × C product of the chunk's
     Q Uᵀ, EdS Uᵀ, Z Uᵀ; X̄ itself is formed per K block later.
  4. S = L D Lᵀ (the Cholesky adjoint in LDLᵀ form): with dS = dL D Lᵀ + L dD Lᵀ + L D dLᵀ,
     L⁻¹ dS L⁻ᵀ has strictly lower part (L⁻¹ dL) D and diagonal dD, hence
         S̄ = sym(L⁻ᵀ Ω L⁻¹),   Ω = strict(Lᵀ L̄) D⁻¹ + diag(D̄),   D̄ = −w̄ w².
  5. S: r̄ = diag(S̄) → β̄ = −r̄ / β² (where r is not clamped); Ψ̄ = S̄ ∘ K Kᵀ → d̄, Λ̄;
     K̃̄ += 2 S̄ K̃ P, k̄ += 2 (S̄ ∘ Ψ) K.  X: K̃̄ += diag(Γ) X̄ P, k̄ += diag(d) X̄, d̄ += k·X̄,
     and the explicit Γ_t of X gives lḡ_t += X̄_t · (X_t − d_t k_t) (= Γ_t X̄_t · (K̃ P)_t).
     Both P products are one: K̃̄ = dKt + F P with F = 2 S̄ K̃ + diag(Γ) X̄ (P symmetric).
     P_C: Γ̄_C += 2 Γ_C ⟨P, D̄⟩, d̄_C += tr D̄. The variance: q̄ += 2 scale² dvar (Γ² P q + d q).
  6. The chunk's own terms in P (everything but P_C, for the sweep): K̃ᵀ S̄ K̃ + K̃ᵀ diag(Γ) X̄
     + scale² Q̃ᵀ diag(dvar) Q̃ = K̃ᵀ G + scale² Q̃ᵀ diag(dvar) Q̃, G = S̄ K̃ + diag(Γ) X̄, Q̃ = diag(Γ) Q:
     rank 2C, so the sweep takes the factors instead of K × K matrices.
  7. d_t = Σ_j Λ_tj² q_j: q̄_j = Σ_t d̄_t Λ_tj², Λ̄_tj += 2 d̄_t Λ_tj q_j. Λ_ts = exp(lgΓ_t − lgΓ_s):
     lḡ += rowsum(Λ̄ ∘ Λ) − colsum(Λ̄ ∘ Λ); Γ_t: lḡ_t += Γ_t Γ̄_t (q·dQS, K̃·K̃̄, Γ_C); g → reverse cumsum.
The two passes: `_bayes_own_kernel` runs 1–4 without P_C's terms and stores G and the sweep's
B (below); `_cov_sweep_kernel` carries dP backwards over the chunks and, as it reads each
chunk's D̄ = the adjoint of its end covariance, forms the only products with D̄ the gradients
need (Z = U D̄, ⟨P, D̄⟩, tr D̄), so no chunk's D̄ is stored; then two kernels run everything
else: `_bayes_keys_kernel` per chunk (the C × C algebra, F = 2 S̄ K̃ + diag(Γ) X̄ and
everything free of P), `_keys_fp_kernel` parallel over K column blocks (F P → dk, dq). One
kernel per chunk doing all of it held the C × C accumulators and the K × K tiles at once and
spilled registers (7.3 ms at (8, 4096, 6, 256, 512) on an H100).

The C × C algebra of steps 1–4 uses exact fp32 products (input_precision "ieee": triangular
factors can have large entries and these products are cheap); the C × K and K × K products
use the default (TF32 on tensor cores), as the forward does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_bwd import _reverse_cumsum
from .chunk_fwd import _chunk_decays, _chunk_noise, _chunk_tokens, _group_barrier, _last_row, _mm, _split_program


@triton.jit
def _chunk_square(linv_ptr, l_ptr, w_ptr, gs_ptr, dl_ptr, dvar_ptr, tok, valid, C: tl.constexpr, VAR: tl.constexpr):
    """L⁻¹, L, w and the C × C adjoints Gs, dL (and dvar) of a chunk. Padded rows get the values
    of the forward's padding (identity rows of L⁻¹ and L, gain 1) and zero adjoints."""
    idx = tl.arange(0, C)
    cc = tok[:, None] * C + idx[None, :]
    eye = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)
    Linv = tl.where(valid[:, None], tl.load(linv_ptr + cc, mask=valid[:, None], other=0.0), eye)
    L = tl.where(valid[:, None], tl.load(l_ptr + cc, mask=valid[:, None], other=0.0), eye)
    w = tl.load(w_ptr + tok, mask=valid, other=1.0)
    Gs = tl.load(gs_ptr + cc, mask=valid[:, None], other=0.0)
    dL = tl.load(dl_ptr + cc, mask=valid[:, None], other=0.0)
    if VAR:
        dv = tl.load(dvar_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    else:
        dv = tl.zeros([C], dtype=tl.float32)
    return Linv, L, w, Gs, dL, dv


@triton.jit
def _square_adjoints(QU, EU, ZU, uE, uZu, Gs, dL, dv, Linv, L, w, decay, last, scale,
                     C: tl.constexpr, VAR: tl.constexpr, PC: tl.constexpr):
    """Steps 1–4 of the module docstring for one chunk. Returns Y = dÂ ∘ Λ (q̄ = Y U, Ū ∋ Yᵀ Q),
    M⁻¹ = L⁻¹ ∘ Λ, S̄ (symmetric) and Λ̄ so far. PC: include P_C's terms (ZU = Z Uᵀ,
    uZu = row dots u·Z)."""
    idx = tl.arange(0, C)
    strict = idx[:, None] > idx[None, :]
    eye = idx[:, None] == idx[None, :]
    # 1. Â diag(w) ← Gs; the variance's −scale² Σ_s Â_ts² w_s ← dvar.
    A = QU * decay
    if VAR:
        dA = (Gs - 2.0 * scale * scale * dv[:, None] * A) * w[None, :]
        wbar = tl.sum(Gs * A - scale * scale * dv[:, None] * A * A, 0)
    else:
        dA = Gs * w[None, :]
        wbar = tl.sum(Gs * A, 0)
    Y = dA * decay
    lam = dA * QU
    # 2. diag(Λ_C· w) U ← E dS_Cᵀ (and P_C ∋ −Uᵀ diag(Λ_C·² w) U ← D̄): Λ_C· is row C − 1 of Λ.
    wbar += last * uE
    lam_last = w * uE
    UbUt = _mm(tl.trans(Y), QU) + (last * w)[:, None] * EU                # Ū Uᵀ
    if PC:
        wbar -= last * last * uZu
        lam_last -= 2.0 * last * w * uZu
        UbUt -= 2.0 * (last * last * w)[:, None] * ZU
    lam += tl.where(idx[:, None] == C - 1, lam_last[None, :], 0.0)
    # 3. U = M⁻¹ X: M̄ = −M⁻ᵀ Ū Uᵀ on the strictly lower part; M = L ∘ Λ.
    Mi = Linv * decay
    Mbar = tl.where(strict, -_mm(tl.trans(Mi), UbUt), 0.0)
    Lbar = dL + Mbar * decay
    lam += Mbar * L
    # 4. S = L D Lᵀ: S̄ = sym(L⁻ᵀ Ω L⁻¹), Ω = strict(Lᵀ L̄) D⁻¹ + diag(−w̄ w²).
    Om = tl.where(strict, _mm(tl.trans(L), Lbar), 0.0) * w[None, :]
    Om += tl.where(eye, (-wbar * w * w)[None, :], 0.0)
    Sb = _mm(tl.trans(Linv), _mm(Om, Linv))
    Sb = 0.5 * (Sb + tl.trans(Sb))
    return Y, Mi, Sb, lam


@triton.jit
def _bayes_own_kernel(q_ptr, k_ptr, g_ptr, u_ptr, w_ptr, linv_ptr, l_ptr, gs_ptr, dl_ptr, eds_ptr, dvar_ptr,
                      chunk_ptr, cu_ptr, gfac_ptr, bfac_ptr, scale, H,
                      K: tl.constexpr, BKB: tl.constexpr, C: tl.constexpr, VAR: tl.constexpr):
    """First pass, per (chunk, head): the chunk's own terms in P as the factor G (own =
    K̃ᵀ G + scale² Q̃ᵀ diag(dvar) Q̃, step 6) and the sweep's B = diag(Λ_C· w) L⁻¹ K̃, both
    token-major [B·T, H, K]."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    QU = tl.zeros([C, C], dtype=tl.float32)
    EU = tl.zeros([C, C], dtype=tl.float32)
    uE = tl.zeros([C], dtype=tl.float32)
    for kb in range(0, K, BKB):
        cols = kb + tl.arange(0, BKB)
        kmask = valid[:, None] & (cols[None, :] < K)
        off = tok[:, None] * K + cols[None, :]
        qc = tl.load(q_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        U = tl.load(u_ptr + off, mask=kmask, other=0.0)
        EdS = tl.load(eds_ptr + off, mask=kmask, other=0.0)
        QU += tl.dot(qc, tl.trans(U))
        EU += tl.dot(EdS, tl.trans(U))
        uE += tl.sum(U * EdS, 1)
    lg, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    gamma = tl.exp(lg)
    last = _last_row(decay, C)
    Linv, L, w, Gs, dL, dv = _chunk_square(linv_ptr, l_ptr, w_ptr, gs_ptr, dl_ptr, dvar_ptr, tok, valid, C, VAR)
    Y, Mi, Sb, lam = _square_adjoints(QU, EU, EU, uE, uE, Gs, dL, dv, Linv, L, w, decay, last, scale,
                                      C, VAR, False)
    for kb in range(0, K, BKB):
        cols = kb + tl.arange(0, BKB)
        kmask = valid[:, None] & (cols[None, :] < K)
        off = tok[:, None] * K + cols[None, :]
        qc = tl.load(q_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        kt = tl.load(k_ptr + off, mask=kmask, other=0.0).to(tl.float32) * gamma[:, None]
        EdS = tl.load(eds_ptr + off, mask=kmask, other=0.0)
        Ubar = tl.dot(tl.trans(Y), qc) + (last * w)[:, None] * EdS
        Xbar = tl.dot(tl.trans(Mi), Ubar)
        G = tl.dot(Sb, kt) + gamma[:, None] * Xbar
        B = tl.dot(Linv, kt) * (last * w)[:, None]
        tl.store(gfac_ptr + off, G, mask=kmask)
        tl.store(bfac_ptr + off, B, mask=kmask)


@triton.jit
def _bf16_operand(x, TO_BF16: tl.constexpr):
    """A product operand of the covariance sweep: x as it is (TF32 products on a GPU), or rounded
    to bf16 for bf16 tensor cores (UPDATE_16 for the update pass, Z_16 for the Z/W pass)."""
    if TO_BF16:
        x = x.to(tl.bfloat16)
    return x


@triton.jit
def _cov_sweep_kernel(u_ptr, b_ptr, k_ptr, q_ptr, g_ptr, gfac_ptr, dvar_ptr, cu_ptr, slot_ptr, p_ptr, dp_ptr,
                      z_ptr, pd_ptr, tr_ptr, part_ptr, sync_ptr, scale, H, n_cc, K: tl.constexpr,
                      BP: tl.constexpr, C: tl.constexpr, VAR: tl.constexpr, NS: tl.constexpr,
                      UPDATE_16: tl.constexpr, Z_16: tl.constexpr):
    """The covariance adjoint sweep for one (document, head): dP_i = Φ_iᵀ dP_{i+1} Φ_i + own_i,
    which also hands every chunk i the products of its end-covariance adjoint D̄ = dP_{i+1} that
    its input gradients need: Z = U D̄ (token-major scratch z, [B·T, H, K]), and each K column
    block's shares of ⟨P_i, D̄⟩ and tr D̄ (pd, tr: [n_kb, n_chunks, H]; P_i from the replay's slots
    in p_ptr). So no chunk's dP is kept: dp_ptr holds three K × K buffers per (document, head),
    [N·H, 3, K, K]: dP_{i+1} and dP_i alternate between the first two (the first holds
    sym(dP_final) on entry), and the third receives dP_0 (it holds sym(dP_final) on entry too,
    for a document without tokens).
    Φ = Γ_C I − Uᵀ B (B = diag(Λ_C· w) L⁻¹ K̃): with Z = U dP [C, K] and W = Z Uᵀ [C, C],
        Φᵀ dP Φ = Γ_C² dP − Γ_C (Bᵀ Z + Zᵀ B) + Bᵀ W B,
    one pass over dP's tiles for Z and W, then one writing every tile of dP_i. The own terms
    come as factors (step 6 of the module docstring), symmetrised as P is in the forward:
        sym(K̃ᵀ G) + scale² Q̃ᵀ diag(dvar) Q̃.
    Split as the forward's sweep (chunk_fwd.cov_split): part p forms dP's column tiles p, p + NS,
    ... of Z and of dP_i, and its share of W; one group barrier per chunk sums W and completes Z.
    A part reads and writes only its own columns of dP, so the two buffers need no barrier
    between parts; Z has rows per chunk, and the shares of W alternate between two buffers by
    chunk, so a part that runs ahead into the next chunk does not overwrite what a slower part
    still reads.
    UPDATE_16: the update pass's products take bf16 operands (B, Z, W, K̃, G, Q̃ rounded to bf16,
    fp32 accumulation; dP itself stays fp32), as the design note's §6 allows for covariance
    products. Z_16: the Z/W pass's products too (U and dP's tiles rounded to bf16 for Z = U dP, Z
    for W = Z Uᵀ; Z is stored in fp32)."""
    group, part = _split_program(sync_ptr, NS)
    n, h = group // H, group % H
    bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    slot0 = tl.load(slot_ptr + n)
    first_chunk = slot0 - n                                    # the plan's chunks: documents in order
    idx = tl.arange(0, C)
    pp = tl.arange(0, BP)
    cc = idx[:, None] * C + idx[None, :]
    count_ptr = sync_ptr + 1 + group
    dp_base = dp_ptr + (group * 3).to(tl.int64) * K * K
    n_chunks = tl.cdiv(eos - bos, C)
    for j in range(n_chunks):
        i = n_chunks - 1 - j
        rows = bos + i * C + idx
        valid = rows < eos
        tok = rows * H + h
        src = dp_base + (j % 2) * K * K
        dst = dp_base + tl.where(i == 0, 2, (j + 1) % 2) * K * K
        p_base = p_ptr + ((slot0 + i) * H + h).to(tl.int64) * K * K
        dot_base = (first_chunk + i) * H + h
        lg = tl.cumsum(tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float32), 0)
        gamma = tl.exp(lg)
        gamma_C = tl.exp(tl.sum(tl.where(idx == C - 1, lg, 0.0), 0))
        if VAR:
            dv = scale * scale * tl.load(dvar_ptr + tok, mask=valid, other=0.0).to(tl.float32)
        W = tl.zeros([C, C], dtype=tl.float32)
        for jb in range(part * BP, K, NS * BP):
            cols = jb + pp
            cmask = cols < K
            Z = tl.zeros([C, BP], dtype=tl.float32)
            PD = tl.zeros([BP, BP], dtype=tl.float32)                 # ⟨P_i, D̄⟩, summed once
            for ib in range(0, K, BP):
                r_idx = ib + pp
                rmask = r_idx < K
                tile_off = r_idx[:, None] * K + cols[None, :]
                tile_mask = rmask[:, None] & cmask[None, :]
                tile = tl.load(src + tile_off, mask=tile_mask, other=0.0)
                PD += tl.load(p_base + tile_off, mask=tile_mask, other=0.0) * tile
                U_i = tl.load(u_ptr + tok[:, None] * K + r_idx[None, :], mask=valid[:, None] & rmask[None, :], other=0.0)
                Z += tl.dot(_bf16_operand(U_i, Z_16), _bf16_operand(tile, Z_16))
            tl.store(z_ptr + tok[:, None] * K + cols[None, :], Z, mask=valid[:, None] & cmask[None, :])
            diag = tl.load(src + cols * K + cols, mask=cmask, other=0.0)
            tl.store(pd_ptr + (jb // BP) * n_cc + dot_base, tl.sum(tl.sum(PD, 1), 0))
            tl.store(tr_ptr + (jb // BP) * n_cc + dot_base, tl.sum(diag, 0))
            U_j = tl.load(u_ptr + tok[:, None] * K + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
            W += tl.dot(_bf16_operand(Z, Z_16), tl.trans(_bf16_operand(U_j, Z_16)))
        if NS > 1:
            shares = part_ptr + ((group * 2 + j % 2) * NS) * C * C
            tl.store(shares + part * C * C + cc, W)
            _group_barrier(count_ptr, NS * (j + 1))            # every part's Z and share of W stored
            W = tl.zeros([C, C], dtype=tl.float32)
            for p in range(NS):
                W += tl.load(shares + p * C * C + cc, cache_modifier=".cg")
        else:
            tl.debug_barrier()                                 # Z read back by other threads
        # Tile (i, j) of Φᵀ dP Φ − Γ_C² dP = −Γ_C B_iᵀ Z_j + (Wᵀ B_i − Γ_C Z_i)ᵀ B_j: two products of
        # [BP, C] by [C, BP]. The column loop is outside, so an own column's loads happen once.
        W_op = _bf16_operand(W, UPDATE_16)
        for jb in range(part * BP, K, NS * BP):
            cols = jb + pp
            cmask = cols < K
            jmask = valid[:, None] & cmask[None, :]
            j_off = tok[:, None] * K + cols[None, :]
            B_j = _bf16_operand(tl.load(b_ptr + j_off, mask=jmask, other=0.0), UPDATE_16)
            Z_j = _bf16_operand(tl.load(z_ptr + j_off, mask=jmask, other=0.0, cache_modifier=".cg"), UPDATE_16)
            kt_j = _bf16_operand(tl.load(k_ptr + j_off, mask=jmask, other=0.0).to(tl.float32) * gamma[:, None],
                                   UPDATE_16)
            G_j = _bf16_operand(tl.load(gfac_ptr + j_off, mask=jmask, other=0.0), UPDATE_16)
            if VAR:
                qt_j = _bf16_operand(
                    tl.load(q_ptr + j_off, mask=jmask, other=0.0).to(tl.float32) * (gamma * dv)[:, None], UPDATE_16)
            for ib in range(0, K, BP):
                r_idx = ib + pp
                rmask = r_idx < K
                imask = valid[:, None] & rmask[None, :]
                i_off = tok[:, None] * K + r_idx[None, :]
                tile_off = r_idx[:, None] * K + cols[None, :]
                tile_mask = rmask[:, None] & cmask[None, :]
                B_i = tl.load(b_ptr + i_off, mask=imask, other=0.0)
                Z_i = tl.load(z_ptr + i_off, mask=imask, other=0.0, cache_modifier=".cg")
                kt_i = tl.load(k_ptr + i_off, mask=imask, other=0.0).to(tl.float32) * gamma[:, None]
                G_i = tl.load(gfac_ptr + i_off, mask=imask, other=0.0)
                tile = tl.load(src + tile_off, mask=tile_mask, other=0.0)
                B_i = _bf16_operand(B_i, UPDATE_16)
                WB_i = _bf16_operand(tl.dot(tl.trans(W_op), B_i) - gamma_C * Z_i, UPDATE_16)     # [C, BP]
                own = 0.5 * (tl.dot(tl.trans(_bf16_operand(kt_i, UPDATE_16)), G_j)
                             + tl.dot(tl.trans(_bf16_operand(G_i, UPDATE_16)), kt_j))
                if VAR:
                    qt_i = tl.load(q_ptr + i_off, mask=imask, other=0.0).to(tl.float32) * gamma[:, None]
                    own += tl.dot(tl.trans(_bf16_operand(qt_i, UPDATE_16)), qt_j)
                tile = (gamma_C * gamma_C * tile - gamma_C * tl.dot(tl.trans(B_i), Z_j)
                        + tl.dot(tl.trans(WB_i), B_j) + own)
                tl.store(dst + tile_off, tile, mask=tile_mask)
        tl.debug_barrier()                                     # the next chunk reads dP_i


@triton.jit
def _bayes_keys_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, noise_ptr, u_ptr, w_ptr, linv_ptr, l_ptr, gs_ptr, dl_ptr,
                       dqs_ptr, eds_ptr, dkt_ptr, dgc_ptr, dvar_ptr, z_ptr, pd_ptr, tr_ptr, chunk_ptr, cu_ptr,
                       f_ptr, kpart_ptr, y_ptr, dbeta_ptr, dnoise_ptr, dg_ptr, scale, H, n_cc,
                       K: tl.constexpr, BKB: tl.constexpr, C: tl.constexpr, R_MIN: tl.constexpr,
                       VAR: tl.constexpr):
    """Input gradients, second kernel, per (chunk, head): steps 1–7 except the products with P.
    (A) the C × C products of the chunk (Z from `_cov_sweep_kernel`); the C × C algebra; (B) X̄ per
    K block, F = 2 S̄ K̃ + diag(Γ) X̄ (scratch f) and the parts of k̄ free of P (scratch kpart);
    dbeta, dnoise, Y = dÂ ∘ Λ (scratch y, [B·T, H, C]) and the chunk's share of dg (dg_ptr, fp32)."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    idx = tl.arange(0, C)
    bb = tl.arange(0, BKB)
    strict = idx[:, None] > idx[None, :]
    eye = idx[:, None] == idx[None, :]
    lg, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    gamma = tl.exp(lg)
    # (A) Q Uᵀ, EdS Uᵀ, Z Uᵀ and the row dots.
    QU = tl.zeros([C, C], dtype=tl.float32)
    EU = tl.zeros([C, C], dtype=tl.float32)
    ZU = tl.zeros([C, C], dtype=tl.float32)
    uE = tl.zeros([C], dtype=tl.float32)
    uZu = tl.zeros([C], dtype=tl.float32)
    lgb = tl.zeros([C], dtype=tl.float32)               # adjoint of log Γ
    qq = tl.zeros([C], dtype=tl.float32)
    for kb in range(0, K, BKB):
        cols = kb + bb
        kmask = valid[:, None] & (cols[None, :] < K)
        off = tok[:, None] * K + cols[None, :]
        qc = tl.load(q_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        U = tl.load(u_ptr + off, mask=kmask, other=0.0)
        EdS = tl.load(eds_ptr + off, mask=kmask, other=0.0)
        Z = tl.load(z_ptr + off, mask=kmask, other=0.0)
        QU += tl.dot(qc, tl.trans(U))
        EU += tl.dot(EdS, tl.trans(U))
        ZU += tl.dot(Z, tl.trans(U))
        uE += tl.sum(U * EdS, 1)
        uZu += tl.sum(U * Z, 1)
        qq += tl.sum(qc * qc, 1)
        # Γ_t of diag(Γ) Q ← dQS and of K̃ ← dKt.
        lgb += gamma * tl.sum(qc * tl.load(dqs_ptr + off, mask=kmask, other=0.0), 1)
        lgb += gamma * tl.sum(kc * tl.load(dkt_ptr + off, mask=kmask, other=0.0), 1)
    PD = tl.load(pd_ptr + c * H + h)                    # ⟨P, D̄⟩ and tr D̄: the K blocks' shares
    trD = tl.load(tr_ptr + c * H + h)
    for jb in range(1, tl.cdiv(K, BKB)):
        PD += tl.load(pd_ptr + jb * n_cc + c * H + h)
        trD += tl.load(tr_ptr + jb * n_cc + c * H + h)
    last = _last_row(decay, C)
    Linv, L, w, Gs, dL, dv = _chunk_square(linv_ptr, l_ptr, w_ptr, gs_ptr, dl_ptr, dvar_ptr, tok, valid, C, VAR)
    Y, Mi, Sb, lam = _square_adjoints(QU, EU, ZU, uE, uZu, Gs, dL, dv, Linv, L, w, decay, last, scale,
                                      C, VAR, True)
    tl.store(y_ptr + tok[:, None] * C + idx[None, :], Y, mask=valid[:, None])
    # 5. S: the pivots' observation noise r = max((1 − β) / β, R_MIN) and Ψ. K Kᵀ is formed only
    # now: held through the algebra above, it took spills from 94–102 to 198–220 registers and
    # the kernel from 1.83 to 1.95 ms at (8, 4096, 6, 256, 512) on an H100.
    KK = tl.zeros([C, C], dtype=tl.float32)
    for kb in range(0, K, BKB):
        cols = kb + bb
        kc = tl.load(k_ptr + tok[:, None] * K + cols[None, :], mask=valid[:, None] & (cols[None, :] < K),
                     other=0.0).to(tl.float32)
        KK += tl.dot(kc, tl.trans(kc))
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.5).to(tl.float32)
    rbar = tl.sum(tl.where(eye, Sb, 0.0), 1)
    dbeta = tl.where((1.0 - beta) / beta >= R_MIN, -rbar / (beta * beta), 0.0)
    tl.store(dbeta_ptr + tok, dbeta.to(dbeta_ptr.dtype.element_ty), mask=valid)
    noise, d = _chunk_noise(noise_ptr, tok, valid, decay)
    psi = decay * d[None, :]
    psi = psi + tl.trans(psi) - tl.where(eye, d[None, :], 0.0)
    # Ψ = lower + lowerᵀ − diag(d), lower_ts = Λ_ts d_s: Ψ̄ (symmetric) acts on lower twice off
    # the diagonal and once on it.
    psi_bar = Sb * KK
    psi_low = tl.where(strict, 2.0 * psi_bar, tl.where(eye, psi_bar, 0.0))
    dbar = tl.sum(psi_low * decay, 0)
    lam += psi_low * d[None, :]
    SPsi = 2.0 * Sb * psi                               # k̄ += 2 (S̄ ∘ Ψ) K
    dbar += tl.where(idx == C - 1, trD, 0.0)            # P_C ∋ d_C I
    if VAR:
        dbar += scale * scale * dv * qq
    LM = L * decay                                      # M = L ∘ Λ: X = M U
    # (B) per K block: Ū, X̄ = M⁻ᵀ Ū, F = 2 S̄ K̃ + diag(Γ) X̄ and k̄'s P-free part.
    for kb in range(0, K, BKB):
        cols = kb + bb
        kmask = valid[:, None] & (cols[None, :] < K)
        off = tok[:, None] * K + cols[None, :]
        qc = tl.load(q_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        U = tl.load(u_ptr + off, mask=kmask, other=0.0)
        EdS = tl.load(eds_ptr + off, mask=kmask, other=0.0)
        Z = tl.load(z_ptr + off, mask=kmask, other=0.0)
        Ubar = tl.dot(tl.trans(Y), qc) + (last * w)[:, None] * EdS - 2.0 * (last * last * w)[:, None] * Z
        Xbar = tl.dot(tl.trans(Mi), Ubar)
        X = tl.dot(LM, U)
        dbar += tl.sum(kc * Xbar, 1)
        lgb += tl.sum(Xbar * (X - d[:, None] * kc), 1)
        kt = kc * gamma[:, None]
        F = 2.0 * tl.dot(Sb, kt) + gamma[:, None] * Xbar
        kpart = (tl.dot(SPsi, kc) + d[:, None] * Xbar
                 + gamma[:, None] * tl.load(dkt_ptr + off, mask=kmask, other=0.0))
        tl.store(f_ptr + off, F, mask=kmask)
        tl.store(kpart_ptr + off, kpart, mask=kmask)
    # 7. d_t = Σ_j Λ_tj² q_j; then Λ → log Γ → g (the products with P add theirs in _keys_fp_kernel).
    tl.store(dnoise_ptr + tok, tl.sum(dbar[:, None] * decay * decay, 0).to(dnoise_ptr.dtype.element_ty),
             mask=valid)
    lam += 2.0 * dbar[:, None] * decay * noise[None, :]
    flow = lam * decay
    lgb += tl.sum(flow, 1) - tl.sum(flow, 0)
    gamma_C = tl.sum(tl.where(idx == C - 1, gamma, 0.0), 0)
    lgb += tl.where(idx == C - 1, gamma_C * tl.load(dgc_ptr + c * H + h) + 2.0 * gamma_C * gamma_C * PD, 0.0)
    tl.store(dg_ptr + tok, _reverse_cumsum(lgb), mask=valid)


@triton.jit
def _keys_fp_kernel(q_ptr, k_ptr, g_ptr, noise_ptr, u_ptr, dqs_ptr, dvar_ptr, p_ptr, f_ptr, kpart_ptr, y_ptr,
                    chunk_ptr, cu_ptr, slot_ptr, dq_ptr, dk_ptr, dg_ptr, scale, H, n_tok_h,
                    K: tl.constexpr, BKB: tl.constexpr, C: tl.constexpr, VAR: tl.constexpr):
    """Input gradients, third kernel, per (K block jb, chunk, head): column block jb of F P (and of
    Q̃ P for the variance), then dk and dq there, and the block's share of dg (row jb of
    dg_ptr, [n_kb + 1, B·T, H] fp32; the dg of g is the sum of the rows)."""
    jb, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    slot = tl.load(slot_ptr + n) + i
    p_base = p_ptr + (slot * H + h).to(tl.int64) * K * K
    idx = tl.arange(0, C)
    bb = tl.arange(0, BKB)
    lg, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    gamma = tl.exp(lg)
    cols = jb * BKB + bb
    cmask = cols < K
    kmask = valid[:, None] & cmask[None, :]
    off = tok[:, None] * K + cols[None, :]
    FP = tl.zeros([C, BKB], dtype=tl.float32)
    if VAR:
        QP = tl.zeros([C, BKB], dtype=tl.float32)
    for ib in range(0, K, BKB):
        r_idx = ib + bb
        rmask = r_idx < K
        imask = valid[:, None] & rmask[None, :]
        Pt = tl.load(p_base + r_idx[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        F_i = tl.load(f_ptr + tok[:, None] * K + r_idx[None, :], mask=imask, other=0.0)
        FP += tl.dot(F_i, Pt)
        if VAR:
            qt_i = tl.load(q_ptr + tok[:, None] * K + r_idx[None, :], mask=imask, other=0.0).to(tl.float32)
            QP += tl.dot(qt_i * gamma[:, None], Pt)
    kc = tl.load(k_ptr + off, mask=kmask, other=0.0).to(tl.float32)
    lgb = gamma * tl.sum(kc * FP, 1)                    # Γ_t k_t · (K̃̄ − dKt)_t; dKt's share is in (A)
    dk = tl.load(kpart_ptr + off, mask=kmask, other=0.0) + gamma[:, None] * FP
    tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=kmask)
    U = tl.load(u_ptr + off, mask=kmask, other=0.0)
    Y = tl.load(y_ptr + tok[:, None] * C + idx[None, :], mask=valid[:, None], other=0.0)
    dq = tl.dot(Y, U) + gamma[:, None] * tl.load(dqs_ptr + off, mask=kmask, other=0.0)
    if VAR:
        # var_t ∋ scale² (Γ_t² q_tᵀ P q_t + d_t |q_t|²)
        qc = tl.load(q_ptr + off, mask=kmask, other=0.0).to(tl.float32)
        _, d = _chunk_noise(noise_ptr, tok, valid, decay)
        dv = scale * scale * tl.load(dvar_ptr + tok, mask=valid, other=0.0).to(tl.float32)
        dq += (2.0 * dv)[:, None] * (gamma[:, None] * QP + d[:, None] * qc)
        lgb += 2.0 * dv * gamma * tl.sum(qc * QP, 1)
    tl.store(dq_ptr + off, dq.to(dq_ptr.dtype.element_ty), mask=kmask)
    tl.store(dg_ptr + jb * n_tok_h + tok, _reverse_cumsum(lgb), mask=valid)
