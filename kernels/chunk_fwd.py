"""Triton kernels of the chunked forward pass (design note §4–6, stable form of filter_math).

Layout. Inputs keep the user's [B, T, H, ...] layout and are read as one packed stream of
B·T tokens with document boundaries `cu` (B equal documents when there are no cu_seqlens),
so one code path serves batch and varlen inputs, and a chunk never straddles a document.
Per-token intermediates are token-major like the inputs ([T_all, H, ...]); chunk-boundary
states live in "slots": document n owns slots slot0[n] .. slot0[n] + NT_n, slot i holding
the belief at the start of its chunk i and the last one the final belief. The mean's slots
(h) are bf16 when the keys are 16-bit (`slot_dtype`); its final state is kept apart in fp32,
and the last h slot of a document stays unused.

Passes (all fp32 state math; the matrix products run on tensor cores, TF32 for fp32 operands):
  1. bayes: `_bayes_cov_kernel`, one program per (document, head) or a few sharing its column
     tiles (cov_split), sweeps the chunks carrying P (in global memory, two buffers alternating
     by chunk: it fits L2 and serves K up to 256 with one code path).
     Per chunk it builds S, factorises S = L D Lᵀ, and stores L⁻¹, w = 1/D, the write
     directions U (and diag(√w) U, from which, with the saved factors, the backward's rerun
     replays P in parallel over P's tiles: `_cov_replay_kernel`, `_unpack_kernel`) and the
     prior part of the predictive variance.
     reset: `_reset_system_blocked_kernel` (chunks of 32 and 64; `_reset_system_kernel` for 16),
     parallel over chunks, inverts the delta-rule system.
  2. `_whiten_kernel`, parallel over chunks: W = L⁻¹ K̃ and L⁻¹ V. Then `_mean_kernel`, one
     program per (document, head, V block): the h-loop carrying S = Mᵀ, storing every chunk's
     start state and the innovations E = L⁻¹ (V − K̃ S0) = L⁻¹ V − W S0.
  3. `_output_kernel`, parallel over chunks: O = scale·[diag(Γ) Q S0 + (tril(Q Uᵀ) ∘ Λ) D⁻¹ E].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from titan_bayes.ops import filter_math as fm

from . import _interpreting
from .pivot_check import check_later, check_now, pivot_status


@triton.jit
def _chunk_decays(g_ptr, rows, valid, h, H, C: tl.constexpr):
    """Log decay cumsum of the chunk and Λ_ts = exp(logΓ_t − logΓ_s) (0 above the diagonal).

    Padded rows read g = 0, so Γ and Λ stay at their last valid values there.
    """
    idx = tl.arange(0, C)
    g = tl.load(g_ptr + rows * H + h, mask=valid, other=0.0).to(tl.float32)
    lg = tl.cumsum(g, 0)
    diff = lg[:, None] - lg[None, :]
    # Mask before exp: above the diagonal the exponent is positive and may overflow.
    decay = tl.exp(tl.where(idx[:, None] >= idx[None, :], diff, float("-inf")))
    return lg, decay


@triton.jit
def _chunk_noise(noise_ptr, tok, valid, decay):
    """The chunk's process noise q_t and d_t = Σ_j Λ_tj² q_j, the noise accumulated from token j's
    step to token t (padded rows read q = 0)."""
    noise = tl.load(noise_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    return noise, tl.sum(decay * decay * noise[None, :], 1)


@triton.jit
def _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C: tl.constexpr):
    """Chunk c of the plan, head h: (its document n, its index i in that document, its C token
    rows of the packed stream, which rows lie inside the document, and the rows' offsets
    row·H + h into token-major [B·T, H, ...] tensors)."""
    n, i = tl.load(chunk_ptr + 2 * c), tl.load(chunk_ptr + 2 * c + 1)
    bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    rows = bos + i * C + tl.arange(0, C)
    valid = rows < eos
    return n, i, rows, valid, rows * H + h


@triton.jit
def _last_row(x, C: tl.constexpr):
    """Row C − 1 of a [C, C] register tile (the decays Λ_C,s to the chunk end)."""
    idx = tl.arange(0, C)
    return tl.sum(tl.where(idx[:, None] == C - 1, x, 0.0), 0)


@triton.jit
def _ldl_inverse(S, scratch, C: tl.constexpr):
    """S = L D Lᵀ (L unit lower triangular) of the symmetric positive definite C × C matrix S,
    returned as (L⁻¹, D, L); scratch: the program's own 4·C² fp32.

    By halves: with S = [[S11, S12], [S21, S22]] and S11 = L1 D1 L1ᵀ (_ldl_quads),
    L21 = S21 L1⁻ᵀ D1⁻¹, and the Schur complement S22 − L21 D1 L21ᵀ = L2 D2 L2ᵀ; then
    L⁻¹ = [[L1⁻¹, 0], [−L2⁻¹ L21 L1⁻¹, L2⁻¹]]. The pivots stay serial (C of them), but each step
    works on a [C/2, C/2] tile, a quarter of the elements per thread, and the coupling is three
    exact fp32 products (_mm). The halves pass through the scratch, which also holds the
    halves' own scratch. On an H100, 128 chunks × 192 programs at C = 32: 12.5 µs per chunk
    unblocked with register reductions, 10.5 with _ldl_quads on the whole tile, 7.2 by halves.
    C = 16 takes _ldl_quads whole.
    """
    if C < 32:                      # halves of 8: too small for tl.dot
        Linv, D, L = _ldl_quads(S, scratch, C)
    else:
        HB: tl.constexpr = C // 2
        idx = tl.arange(0, C)
        rows, cols = idx[:, None], idx[None, :]
        h = tl.arange(0, HB)
        hr, hc = h[:, None], h[None, :]
        tl.store(scratch + rows * C + cols, S)
        tl.debug_barrier()
        S11 = tl.load(scratch + hr * C + hc)
        S21 = tl.load(scratch + (HB + hr) * C + hc)
        S22 = tl.load(scratch + (HB + hr) * C + HB + hc)
        halves = scratch + 3 * C * C
        Linv1, D1, L1 = _ldl_quads(S11, halves, HB)
        W = _mm(S21, tl.trans(Linv1))                        # S21 L1⁻ᵀ = L21 D1
        L21 = W * (1.0 / D1)[None, :]
        Linv2, D2, L2 = _ldl_quads(S22 - _mm(L21, tl.trans(W)), halves, HB)
        Linv21 = -_mm(_mm(Linv2, L21), Linv1)
        linv_out, l_out = scratch + C * C, scratch + 2 * C * C
        tl.store(linv_out + hr * C + hc, Linv1)
        tl.store(linv_out + (HB + hr) * C + hc, Linv21)
        tl.store(linv_out + (HB + hr) * C + HB + hc, Linv2)
        tl.store(l_out + hr * C + hc, L1)
        tl.store(l_out + (HB + hr) * C + hc, L21)
        tl.store(l_out + (HB + hr) * C + HB + hc, L2)
        tl.store(scratch + h, D1)
        tl.store(scratch + HB + h, D2)
        tl.debug_barrier()
        upper_right = (rows < HB) & (cols >= HB)
        Linv = tl.load(linv_out + rows * C + cols, mask=~upper_right, other=0.0)
        L = tl.load(l_out + rows * C + cols, mask=~upper_right, other=0.0)
        D = tl.load(scratch + tl.arange(0, C))
    return Linv, D, L


@triton.jit
def _ldl_quads(S, scratch, C: tl.constexpr):
    """(L⁻¹, D, L) of S = L D Lᵀ by Gaussian elimination without pivoting; scratch: 4·C² fp32.

    Step j subtracts m_i = S_ij / S_jj times row j from every row i > j; the trailing block
    stays the (symmetric) Schur complement. The same row operations applied to I give L⁻¹,
    and the pivots are D = the sequential filter's innovation variances s_t. The multipliers m
    are column j of L itself, kept for the backward (its key kernels need L and L⁻¹; recording
    L costs no reduction).

    The steps are serial and latency-bound (T of them per sequence, whatever the chunk size).
    Taking a row or a column out of a register tile is a reduction across threads, and across
    warps a round trip through shared memory with a barrier; the elimination used to spend
    most of its time in them. So each loop iteration writes S and L⁻¹ to the scratch
    (L1-resident, [2, 2, C, C]: two buffers, alternating, so one barrier per iteration
    orders every write before the reads and every read before the next write) and reads back
    the rows and columns of four pivots j … j + 3 as tiles broadcast along the other axis, in
    the layout of S itself, and their 4 × 4 block as scalars. The four steps then need no
    exchange between threads: the block's entries are updated as scalars, the pivot rows and
    columns brought up to date with the steps before them (`_eliminated`), and S, L⁻¹ and L
    updated with all four at once.
    """
    idx = tl.arange(0, C)
    rows, cols = idx[:, None], idx[None, :]
    Linv = tl.where(rows == cols, 1.0, 0.0)
    L = Linv
    D = tl.zeros([C], dtype=tl.float32)
    for quad in range(C // 4):
        j = 4 * quad
        buf = scratch + (quad % 2) * 2 * C * C
        tl.store(buf + rows * C + cols, S)
        tl.store(buf + C * C + rows * C + cols, Linv)
        tl.debug_barrier()
        R0, Q0, J0 = _pivot_tiles(buf, rows, cols, j, C)
        R1, Q1, J1 = _pivot_tiles(buf, rows, cols, j + 1, C)
        R2, Q2, J2 = _pivot_tiles(buf, rows, cols, j + 2, C)
        R3, Q3, J3 = _pivot_tiles(buf, rows, cols, j + 3, C)
        s00, s01, s02, s03 = _block_row(buf, j, 0, C)
        _, s11, s12, s13 = _block_row(buf, j, 1, C)
        _, _, s22, s23 = _block_row(buf, j, 2, C)
        _, _, _, s33 = _block_row(buf, j, 3, C)
        # step j (one division per pivot: its reciprocal multiplies)
        i0 = 1.0 / s00
        M0 = tl.where(rows > j, Q0 * i0, 0.0)
        R1, Q1, J1 = _eliminated(R1, Q1, J1, R0, M0, J0, s01, s01 * i0)
        R2, Q2, J2 = _eliminated(R2, Q2, J2, R0, M0, J0, s02, s02 * i0)
        R3, Q3, J3 = _eliminated(R3, Q3, J3, R0, M0, J0, s03, s03 * i0)
        s11, s12, s13 = s11 - (s01 * i0) * s01, s12 - (s01 * i0) * s02, s13 - (s01 * i0) * s03
        s22, s23, s33 = s22 - (s02 * i0) * s02, s23 - (s02 * i0) * s03, s33 - (s03 * i0) * s03
        # step j + 1
        i1 = 1.0 / s11
        M1 = tl.where(rows > j + 1, Q1 * i1, 0.0)
        R2, Q2, J2 = _eliminated(R2, Q2, J2, R1, M1, J1, s12, s12 * i1)
        R3, Q3, J3 = _eliminated(R3, Q3, J3, R1, M1, J1, s13, s13 * i1)
        s22, s23, s33 = s22 - (s12 * i1) * s12, s23 - (s12 * i1) * s13, s33 - (s13 * i1) * s13
        # step j + 2
        i2 = 1.0 / s22
        M2 = tl.where(rows > j + 2, Q2 * i2, 0.0)
        R3, Q3, J3 = _eliminated(R3, Q3, J3, R2, M2, J2, s23, s23 * i2)
        s33 = s33 - (s23 * i2) * s23
        # step j + 3
        M3 = tl.where(rows > j + 3, Q3 * (1.0 / s33), 0.0)
        S = S - M0 * R0 - M1 * R1 - M2 * R2 - M3 * R3
        Linv = Linv - M0 * J0 - M1 * J1 - M2 * J2 - M3 * J3
        L += (tl.where(cols == j, M0, 0.0) + tl.where(cols == j + 1, M1, 0.0)
              + tl.where(cols == j + 2, M2, 0.0) + tl.where(cols == j + 3, M3, 0.0))
        D = tl.where(idx == j, s00, tl.where(idx == j + 1, s11, tl.where(idx == j + 2, s22,
                                                                          tl.where(idx == j + 3, s33, D))))
    return Linv, D, L


@triton.jit
def _pivot_tiles(buf, rows, cols, j, C: tl.constexpr):
    """Row j of S, column j of S and row j of L⁻¹ from the scratch (S at buf, L⁻¹ after it), each
    as a [C, C] tile: the rows repeated down the tile, the column repeated across it."""
    across = rows * 0 + cols
    down = rows + cols * 0
    return (tl.load(buf + j * C + across), tl.load(buf + down * C + j),
            tl.load(buf + C * C + j * C + across))


@triton.jit
def _block_row(buf, j, a, C: tl.constexpr):
    """Entries (j + a, j … j + 3) of S from the scratch."""
    row = buf + (j + a) * C + j
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _eliminated(row, col, inv, pivot_row, m, pivot_inv, s, ratio):
    """Row, column and L⁻¹ row (as tiles) of a later pivot after step j (pivot row j, multipliers
    m, s = S_j,later and the later row's multiplier ratio = s / S_jj)."""
    return row - ratio * pivot_row, col - m * s, inv - ratio * pivot_inv


@triton.jit
def _unit_lower_inverse(A, C: tl.constexpr):
    """(I + A)⁻¹ for strictly lower A by forward substitution: row t of the inverse is
    e_t − Σ_{s<t} A_ts · row s, and rows s < t are final when row t is formed."""
    idx = tl.arange(0, C)
    Linv = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)
    for t in range(1, C):
        a_row = tl.sum(tl.where(idx[:, None] == t, A, 0.0), 0)
        new_row = -tl.sum(a_row[:, None] * Linv, 0)
        Linv = tl.where(idx[:, None] == t, new_row[None, :] + tl.where(idx == t, 1.0, 0.0)[None, :], Linv)
    return Linv


@triton.jit
def _split_program(sync_ptr, NS: tl.constexpr):
    """(group, part) of this program: group = its (document, head), part = which of the group's NS
    programs it is (see COV_SPLIT). With NS > 1 the number comes from a ticket counter instead of
    the program id, so a program starts only after every lower-numbered one has started: the
    programs a group waits for are then running or about to, whatever order the GPU launches
    them in, and the group barrier cannot wait forever."""
    if NS > 1:
        pid = tl.atomic_add(sync_ptr, 1)
    else:
        pid = tl.program_id(0)
    return pid // NS, pid % NS


@triton.jit
def _group_barrier(count_ptr, arrivals):
    """Wait until the group's counter reaches `arrivals` (each of its programs adds 1 per barrier).
    The first debug_barrier makes every thread's stores precede the release; the acquire and the
    second one make the other programs' stores visible to every thread (loads of them bypass L1).
    Polling with plain loads instead (volatile, then one acquire; or ld.acquire by every thread)
    changed nothing on an H100: covariance kernel 4.40 → 4.33 / 4.37 ms, backward sweep 4.25 →
    4.23 / 4.21 at (8, 4096, 6, 256, 512): the barriers wait for the slowest part, not on the poll."""
    tl.debug_barrier()
    seen = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while seen < arrivals:
        seen = tl.atomic_add(count_ptr, 0, sem="acq_rel", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _bayes_cov_kernel(k_ptr, q_ptr, g_ptr, beta_ptr, noise_ptr, cu_ptr, p_ptr, pfin_ptr, x_ptr, elim_ptr,
                      us_ptr, ud_ptr, linv_ptr, l_ptr, w_ptr, f_ptr, vpri_ptr, part_ptr, sync_ptr, H,
                      K: tl.constexpr, BP: tl.constexpr, C: tl.constexpr,
                      R_MIN: tl.constexpr, WITH_VARIANCE: tl.constexpr, NS: tl.constexpr,
                      WRITES_16: tl.constexpr):
    """The covariance sweep of one (document, head), by NS programs (COV_SPLIT). L⁻¹, L and w
    are stored unpacked for the other kernels, and packed for the backward in f: one C × C block
    per chunk holding L below the diagonal, L⁻¹ transposed above it and w on it (both factors
    are unit lower triangular).
    The write directions go out twice: us = diag(√w) U in us's dtype (saved for the backward,
    which replays P from them: _cov_replay_kernel), and U as the backward will see it,
    us / √w, in ud's dtype (the keys' 16-bit one, or fp32) for the value kernels' products. P's
    own update takes its U from us too, so the replay reproduces these covariances.
    A chunk's products with its prior P0 (K̃ P0, so S and X) are formed while the chunk before
    writes P0 (_update_covariance), from the tiles in registers: P is read once per chunk and
    written once. Only the first chunk reads its P0 for them (_first_key_products).
    Split: part p of the group owns P's column tiles p, p + NS, ...: it forms those columns of
    K̃ P0, X and U, its share of S (summed through part_ptr at a group barrier: every part then
    factorises the same S), and, after a second barrier (U complete), those columns of P_C."""
    group, part = _split_program(sync_ptr, NS)
    n, h = group // H, group % H
    bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    idx = tl.arange(0, C)
    pp = tl.arange(0, BP)
    cc = idx[:, None] * C + idx[None, :]
    # P of the chunk and of the next, alternating. Two suffice: a part writes chunk i + 1's P over
    # chunk i − 1's only after chunk i's barriers, which every part reaches after its last read of
    # chunk i − 1's P (in that chunk's update).
    p_buf = p_ptr + group.to(tl.int64) * 2 * K * K
    x_base = x_ptr + group * C * K        # scratch for X = diag(Γ²) K P0 + diag(d) K
    count_ptr = sync_ptr + 1 + group
    part_base = part_ptr + group * NS * (2 * C * C + 2 * C)
    arrivals = 0
    n_chunks = tl.cdiv(eos - bos, C)
    S, KK, q_P_q, q_sq = _first_key_products(k_ptr, q_ptr, g_ptr, noise_ptr, p_buf,
                                             x_base, bos, eos, h, H, part, K, BP, C, NS, WITH_VARIANCE)
    for i in range(n_chunks):
        rows = bos + i * C + idx
        valid = rows < eos
        tok, lg, decay, gamma, d = _chunk_scalings(g_ptr, noise_ptr, rows, valid, h, H, C)
        beta = tl.load(beta_ptr + tok, mask=valid, other=0.5).to(tl.float32)
        r = tl.where(valid, tl.maximum((1.0 - beta) / beta, R_MIN), 1.0)
        p_old = p_buf + (i % 2) * K * K
        if i == n_chunks - 1:                                  # the document's final P
            p_new = pfin_ptr + group.to(tl.int64) * K * K
        else:
            p_new = p_buf + ((i + 1) % 2) * K * K
        if NS > 1:
            # Sum the parts' shares in one fixed order, so every part factorises the same S.
            # One buffer serves every chunk: no part writes chunk i + 1's share before all
            # have passed chunk i's second barrier, after their last read of it.
            own = part_base + part * (2 * C * C + 2 * C)
            tl.store(own + cc, S)
            tl.store(own + C * C + cc, KK)
            if WITH_VARIANCE:
                tl.store(own + 2 * C * C + idx, q_P_q)
                tl.store(own + 2 * C * C + C + idx, q_sq)
            arrivals += NS
            _group_barrier(count_ptr, arrivals)
            S = tl.zeros([C, C], dtype=tl.float32)
            KK = tl.zeros([C, C], dtype=tl.float32)
            q_P_q = tl.zeros([C], dtype=tl.float32)
            q_sq = tl.zeros([C], dtype=tl.float32)
            for p in range(NS):
                share = part_base + p * (2 * C * C + 2 * C)
                S += tl.load(share + cc, cache_modifier=".cg")
                KK += tl.load(share + C * C + cc, cache_modifier=".cg")
                if WITH_VARIANCE:
                    q_P_q += tl.load(share + 2 * C * C + idx, cache_modifier=".cg")
                    q_sq += tl.load(share + 2 * C * C + C + idx, cache_modifier=".cg")
        eye = idx[:, None] == idx[None, :]
        # The factors are stored by part 0 alone. part is broadcast to [C] first: the interpreter
        # refuses a mask built from a scalar comparison ("mask has unsupported dtype").
        first = valid & (tl.zeros([C], dtype=tl.int32) + part == 0)
        # Process noise between observations: (K Kᵀ) ∘ Ψ, Ψ_ts = Λ_ts d_s for t ≥ s, symmetric.
        psi = decay * d[None, :]
        psi = psi + tl.trans(psi) - tl.where(eye, d[None, :], 0.0)
        S += KK * psi
        S = 0.5 * (S + tl.trans(S)) + tl.where(eye, r[None, :], 0.0)
        Linv, D, L = _ldl_inverse(S, elim_ptr + (group * NS + part) * 4 * C * C, C)
        w = 1.0 / D
        F = tl.where(idx[:, None] > idx[None, :], L, tl.where(eye, w[:, None], tl.trans(Linv)))
        tl.store(f_ptr + tok[:, None] * C + idx[None, :], F, mask=first[:, None])
        tl.store(linv_ptr + tok[:, None] * C + idx[None, :], Linv, mask=first[:, None])
        tl.store(l_ptr + tok[:, None] * C + idx[None, :], L, mask=first[:, None])
        tl.store(w_ptr + tok, w, mask=first)
        if WITH_VARIANCE:
            tl.store(vpri_ptr + tok, gamma * gamma * q_P_q + d * q_sq, mask=first)
        tl.debug_barrier()                                     # X scratch written by all threads
        # U = (L ∘ Λ)⁻¹ X and (L ∘ Λ)⁻¹ = L⁻¹ ∘ Λ (a diagonal similarity by Γ).
        M_inv = Linv * decay
        root_w = tl.sqrt(w)
        for jb in range(part * BP, K, NS * BP):
            cols = jb + pp
            cmask = cols < K
            X = tl.load(x_base + idx[:, None] * K + cols[None, :], mask=cmask[None, :], other=0.0)
            U_blk = tl.dot(M_inv, X)
            _store_writes(us_ptr, ud_ptr, tok, valid, cols, cmask, U_blk * root_w[:, None], root_w, K)
        if NS > 1:
            arrivals += NS
            _group_barrier(count_ptr, arrivals)                # every part's columns of U stored
        else:
            tl.debug_barrier()                                 # U read back, X rewritten, by other threads
        # The next chunk (past the document's end on its last chunk: no valid rows, zero keys). Its
        # scalings are formed again at the top of its own iteration: carrying them across the loop
        # instead was slower on an H100 (cov kernel 7.51 → 7.81 ms at (8, 4096, 6, 256, 512),
        # 3.96 → 4.02 at (8, 4096, 8, 128, 128)), the [C, C] decays held through the whole chunk.
        rows_next = rows + C
        valid_next = rows_next < eos
        tok_next, _, _, gamma_next, d_next = _chunk_scalings(g_ptr, noise_ptr, rows_next, valid_next, h, H, C)
        S, KK, q_P_q, q_sq = _update_covariance(
            us_ptr, p_old, p_new, tok, valid, g_ptr, noise_ptr, part,
            k_ptr, q_ptr, x_base, tok_next, valid_next, gamma_next, d_next,
            K, BP, C, NS, WITH_VARIANCE, WRITES_16)
        tl.debug_barrier()                                     # next chunk reads the new P


@triton.jit
def _store_writes(us_ptr, ud_ptr, tok, valid, cols, cmask, us_blk, root_w, K: tl.constexpr):
    """Columns cols of the write directions: us = diag(√w) U rounded to us's dtype, and U as
    the backward's unpacking recovers it from those (us / √w, _unpack_kernel) in ud's dtype."""
    mask = valid[:, None] & cmask[None, :]
    offs = tok[:, None] * K + cols[None, :]
    us_blk = us_blk.to(us_ptr.dtype.element_ty)
    tl.store(us_ptr + offs, us_blk, mask=mask)
    tl.store(ud_ptr + offs, (us_blk.to(tl.float32) / root_w[:, None]).to(ud_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_scalings(g_ptr, noise_ptr, rows, valid, h, H, C: tl.constexpr):
    """The chunk of these rows: token offsets, log decays, Λ, Γ and the accumulated noise d."""
    tok = rows * H + h
    lg, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    _, d = _chunk_noise(noise_ptr, tok, valid, decay)
    return tok, lg, decay, tl.exp(lg), d


@triton.jit
def _first_key_products(k_ptr, q_ptr, g_ptr, noise_ptr, p_base, x_base, bos, eos, h, H, part,
                        K: tl.constexpr, BP: tl.constexpr, C: tl.constexpr, NS: tl.constexpr,
                        WITH_VARIANCE: tl.constexpr):
    """The first chunk's products with the document's initial P0 (at p_base), as
    _update_covariance forms every later chunk's: this part's share of S and K Kᵀ, its columns
    of X (stored), its share of the variance's sums."""
    rows = bos + tl.arange(0, C)
    valid = rows < eos
    tok, _, _, gamma, d = _chunk_scalings(g_ptr, noise_ptr, rows, valid, h, H, C)
    S = tl.zeros([C, C], dtype=tl.float32)
    KK = tl.zeros([C, C], dtype=tl.float32)
    q_P_q = tl.zeros([C], dtype=tl.float32)
    q_sq = tl.zeros([C], dtype=tl.float32)
    for jb in range(part * BP, K, NS * BP):
        kP = tl.zeros([C, BP], dtype=tl.float32)
        qP = tl.zeros([C, BP], dtype=tl.float32)
        for ib in range(0, K, BP):
            kP, qP = _keys_times(k_ptr, q_ptr, tok, valid, gamma, ib, _p_tile(p_base, ib, jb, K, BP), kP, qP, K, BP,
                                 WITH_VARIANCE)
        S, KK, q_P_q, q_sq = _key_block_sums(k_ptr, q_ptr, x_base, tok, valid, gamma, d, jb, kP, qP,
                                             S, KK, q_P_q, q_sq, K, BP, C, WITH_VARIANCE)
    return S, KK, q_P_q, q_sq


@triton.jit
def _keys_times(k_ptr, q_ptr, tok, valid, gamma, ib, P_tile, kP, qP, K: tl.constexpr, BP: tl.constexpr,
                WITH_VARIANCE: tl.constexpr):
    """kP += K̃[:, ib block] P_tile and qP += Q[:, ib block] P_tile, for the [BP, BP] tile of P0 at
    rows ib.. of a column block (no [C, K] or [K, BP] operand stays in registers: at K = 256 they
    spilled)."""
    r_idx = ib + tl.arange(0, BP)
    kmask = valid[:, None] & (r_idx < K)[None, :]
    k_rows = tl.load(k_ptr + tok[:, None] * K + r_idx[None, :], mask=kmask, other=0.0)
    kP += tl.dot(k_rows.to(tl.float32) * gamma[:, None], P_tile)
    if WITH_VARIANCE:
        q_rows = tl.load(q_ptr + tok[:, None] * K + r_idx[None, :], mask=kmask, other=0.0)
        qP += tl.dot(q_rows.to(tl.float32), P_tile)
    return kP, qP


@triton.jit
def _key_block_sums(k_ptr, q_ptr, x_base, tok, valid, gamma, d, jb, kP, qP, S, KK, q_P_q, q_sq,
                    K: tl.constexpr, BP: tl.constexpr, C: tl.constexpr, WITH_VARIANCE: tl.constexpr):
    """Column block jb of K̃ P0 (kP) and Q P0 (qP) complete: add its terms of S = K̃ P0 K̃ᵀ, of
    K Kᵀ and of the variance's sums q P0 q, q·q, and store its columns of X = Γ K̃ P0 + diag(d) K
    (rows Γ_t² P0 k_t + d_t k_t) to the scratch."""
    idx = tl.arange(0, C)
    cols = jb + tl.arange(0, BP)
    cmask = cols < K
    k_blk = tl.load(k_ptr + tok[:, None] * K + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    S += tl.dot(kP, tl.trans(k_blk * gamma[:, None]))
    KK += tl.dot(k_blk, tl.trans(k_blk))
    X = gamma[:, None] * kP + d[:, None] * k_blk
    tl.store(x_base + idx[:, None] * K + cols[None, :], X, mask=cmask[None, :])
    if WITH_VARIANCE:
        q_blk = tl.load(q_ptr + tok[:, None] * K + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        q_P_q += tl.sum(qP * q_blk, 1)
        q_sq += tl.sum(q_blk * q_blk, 1)
    return S, KK, q_P_q, q_sq


@triton.jit
def _covariance_tile(us_ptr, P0, tok, valid, a, b, weight, gamma_C, d_C, K: tl.constexpr, BP: tl.constexpr,
                     WRITES_16: tl.constexpr):
    """Tile (a, b) of P_C = Γ_C² P0 + d_C I − Ũᵀ diag(weight) Ũ, for a ≤ b (both tile offsets),
    from that tile of P0 and the saved write directions Ũ = diag(√w) U: the forward's update and
    the backward's replay (_cov_replay_kernel) both form it here, so they agree."""
    pp = tl.arange(0, BP)
    r_idx = a + pp
    c_idx = b + pp
    U_a = tl.load(us_ptr + tok[:, None] * K + r_idx[None, :], mask=valid[:, None] & (r_idx < K)[None, :],
                  other=0.0, cache_modifier=".cg")
    U_b = tl.load(us_ptr + tok[:, None] * K + c_idx[None, :], mask=valid[:, None] & (c_idx < K)[None, :],
                  other=0.0, cache_modifier=".cg")
    U_a = U_a.to(tl.float32) * weight[:, None]
    if WRITES_16:
        # fp16 products: Ũ_b as saved, Ũ_a·weight rounded to fp16's 11 significant bits (TF32 keeps
        # as many); weight ≤ 1, so the range is the saved directions' (write_dtype).
        update = tl.dot(tl.trans(U_a.to(U_b.dtype)), U_b)
    else:
        update = tl.dot(tl.trans(U_a), U_b.to(tl.float32))
    tile = gamma_C * gamma_C * P0 - update
    tile += tl.where(r_idx[:, None] == c_idx[None, :], d_C, 0.0)
    if a == b:
        tile = 0.5 * (tile + tl.trans(tile))
    return tile


@triton.jit
def _p_tile(p_base, a, b, K: tl.constexpr, BP: tl.constexpr):
    """Tile (a, b) of the K × K matrix at p_base (zeros outside it)."""
    r_idx = a + tl.arange(0, BP)
    c_idx = b + tl.arange(0, BP)
    return tl.load(p_base + r_idx[:, None] * K + c_idx[None, :], mask=(r_idx < K)[:, None] & (c_idx < K)[None, :],
                   other=0.0, cache_modifier=".cg")


@triton.jit
def _write_weights(g_ptr, noise_ptr, tok, valid, C: tl.constexpr):
    """What P_C = Γ_C² P0 + d_C I − Ũᵀ diag(weight) Ũ takes of the chunk: the weights Λ_C,t² of
    its writes, Γ_C and d_C = Σ_t Λ_C,t² q_t (the noise accumulated over the whole chunk), from
    the log decays and the noise alone (row C − 1 of Λ, no [C, C] decays), so the forward's
    update and the backward's replay form them alike."""
    _, gamma_C, last = _chunk_end(g_ptr, tok, valid, C)
    weight = last * last
    noise = tl.load(noise_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    return weight, gamma_C, tl.sum(weight * noise, 0)


@triton.jit
def _update_covariance(us_ptr, p_old, p_new, tok, valid, g_ptr, noise_ptr, part,
                       k_ptr, q_ptr, x_base, tok_next, valid_next, gamma_next, d_next,
                       K: tl.constexpr, BP: tl.constexpr, C: tl.constexpr, NS: tl.constexpr,
                       WITH_VARIANCE: tl.constexpr, WRITES_16: tl.constexpr):
    """P_C = Γ_C² P0 + d_C I − Uᵀ diag(Λ_C·² w) U, this part's column tiles (all rows), stored
    exactly symmetric (note §6), so it stays so across chunks: every tile is computed as the tile
    (a, b) with a ≤ b and written to (a, b), or transposed to (b, a), by the same code whichever
    part writes it.
    Each column block of P_C, once in registers, also gives that column block of the next
    chunk's K̃ P_C and Q P_C (_keys_times, _key_block_sums): returns the next chunk's sums and
    leaves its X in the scratch."""
    pp = tl.arange(0, BP)
    weight, gamma_C, d_C = _write_weights(g_ptr, noise_ptr, tok, valid, C)
    S = tl.zeros([C, C], dtype=tl.float32)
    KK = tl.zeros([C, C], dtype=tl.float32)
    q_P_q = tl.zeros([C], dtype=tl.float32)
    q_sq = tl.zeros([C], dtype=tl.float32)
    for jb in range(part * BP, K, NS * BP):
        c_idx = jb + pp
        kP = tl.zeros([C, BP], dtype=tl.float32)
        qP = tl.zeros([C, BP], dtype=tl.float32)
        for ib in range(0, K, BP):
            a, b = tl.minimum(ib, jb), tl.maximum(ib, jb)
            tile = _covariance_tile(us_ptr, _p_tile(p_old, a, b, K, BP), tok, valid, a, b, weight, gamma_C, d_C,
                                    K, BP, WRITES_16)
            if ib > jb:
                tile = tl.trans(tile)
            r_idx = ib + pp
            tl.store(p_new + r_idx[:, None] * K + c_idx[None, :], tile,
                     mask=(r_idx < K)[:, None] & (c_idx < K)[None, :])
            kP, qP = _keys_times(k_ptr, q_ptr, tok_next, valid_next, gamma_next, ib, tile, kP, qP, K, BP,
                                 WITH_VARIANCE)
        S, KK, q_P_q, q_sq = _key_block_sums(k_ptr, q_ptr, x_base, tok_next, valid_next, gamma_next, d_next, jb,
                                             kP, qP, S, KK, q_P_q, q_sq, K, BP, C, WITH_VARIANCE)
    return S, KK, q_P_q, q_sq


@triton.jit
def _cov_replay_kernel(us_ptr, g_ptr, noise_ptr, cu_ptr, slot_ptr, p_ptr, H,
                       K: tl.constexpr, BP: tl.constexpr, C: tl.constexpr, NB: tl.constexpr,
                       WRITES_16: tl.constexpr):
    """The backward's covariances from the forward's saved write directions Ũ: over the chunks
    of one (document, head), P_{i+1} = Γ_C² P_i + d_C I − Ũ_iᵀ diag(Λ_C·²) Ũ_i for one tile pair
    (a ≤ b) of P, stored at (a, b) and transposed at (b, a), as the forward stores it.
    Once Ũ is known the recursion is linear with scalar coefficients, and a tile needs only its
    own columns of Ũ: the tiles run in parallel, each carried in registers from chunk to chunk,
    where the forward's sweep must wait for each chunk's factorisation."""
    pair, group = tl.program_id(0), tl.program_id(1)
    ta, tb = pair // NB, pair % NB
    if ta <= tb:                              # the pairs below the diagonal have nothing to do
        a, b = ta * BP, tb * BP
        n, h = group // H, group % H
        bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
        slot0 = tl.load(slot_ptr + n)
        idx = tl.arange(0, C)
        r_idx = a + tl.arange(0, BP)
        c_idx = b + tl.arange(0, BP)
        mask = (r_idx < K)[:, None] & (c_idx < K)[None, :]
        tile = _p_tile(p_ptr + (slot0 * H + h).to(tl.int64) * K * K, a, b, K, BP)
        for i in range(tl.cdiv(eos - bos, C)):
            rows = bos + i * C + idx
            valid = rows < eos
            tok = rows * H + h
            weight, gamma_C, d_C = _write_weights(g_ptr, noise_ptr, tok, valid, C)
            tile = _covariance_tile(us_ptr, tile, tok, valid, a, b, weight, gamma_C, d_C, K, BP, WRITES_16)
            p_new = p_ptr + ((slot0 + i + 1) * H + h).to(tl.int64) * K * K
            tl.store(p_new + r_idx[:, None] * K + c_idx[None, :], tile, mask=mask)
            if a != b:
                tl.store(p_new + c_idx[:, None] * K + r_idx[None, :], tl.trans(tile), mask=tl.trans(mask))


@triton.jit
def _unpack_kernel(f_ptr, us_ptr, chunk_ptr, cu_ptr, linv_ptr, l_ptr, w_ptr, u_ptr, ud_ptr, H,
                   K: tl.constexpr, BKB: tl.constexpr, C: tl.constexpr, U_COPY: tl.constexpr):
    """The backward's chunk factors and write directions from what the forward saved: L⁻¹, L and
    w from the packed block f, U = Ũ / √w in fp32 and (U_COPY) in ud's dtype, as the forward
    rounded it for the value kernels (_store_writes)."""
    c, h = tl.program_id(0), tl.program_id(1)
    _, _, _, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    idx = tl.arange(0, C)
    eye = idx[:, None] == idx[None, :]
    below = idx[:, None] > idx[None, :]
    cc = tok[:, None] * C + idx[None, :]
    F = tl.load(f_ptr + cc, mask=valid[:, None], other=0.0)
    tl.store(linv_ptr + cc, tl.where(below, tl.trans(F), tl.where(eye, 1.0, 0.0)), mask=valid[:, None])
    tl.store(l_ptr + cc, tl.where(below, F, tl.where(eye, 1.0, 0.0)), mask=valid[:, None])
    w = tl.sum(tl.where(eye, F, 0.0), 1)
    tl.store(w_ptr + tok, w, mask=valid)
    root_w = tl.sqrt(tl.where(valid, w, 1.0))
    for kb in range(0, K, BKB):
        cols = kb + tl.arange(0, BKB)
        mask = valid[:, None] & (cols < K)[None, :]
        offs = tok[:, None] * K + cols[None, :]
        u = tl.load(us_ptr + offs, mask=mask, other=0.0).to(tl.float32) / root_w[:, None]
        tl.store(u_ptr + offs, u, mask=mask)
        if U_COPY:
            tl.store(ud_ptr + offs, u.to(ud_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reset_system_kernel(k_ptr, g_ptr, beta_ptr, chunk_ptr, cu_ptr, linv_ptr, H,
                         K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr):
    """L⁻¹ of the gated delta rule's chunk system L = I + strict_tril((K Kᵀ) ∘ Λ ∘ beta_s)."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    idx = tl.arange(0, C)
    kk = tl.arange(0, BK)
    kc = tl.load(k_ptr + tok[:, None] * K + kk[None, :], mask=valid[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    lg, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    A = tl.dot(kc, tl.trans(kc)) * decay * beta[None, :]
    A = tl.where(idx[:, None] > idx[None, :], A, 0.0)
    Linv = _unit_lower_inverse(A, C)
    tl.store(linv_ptr + tok[:, None] * C + idx[None, :], Linv, mask=valid[:, None])


@triton.jit
def _sub_block(g_ptr, beta_ptr, row0, eos, lg_start, h, H):
    """16 rows of a chunk from row0 of the packed stream: their log decays from the chunk start
    (lg_start: the decays of the rows before), beta, token offsets and which rows lie inside
    the document (rows past it read zero keys and beta, so their entries of A vanish)."""
    rows = row0 + tl.arange(0, 16)
    valid = rows < eos
    tok = rows * H + h
    lg = lg_start + tl.cumsum(tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float32), 0)
    beta = tl.load(beta_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    return lg, beta, tok, valid


@triton.jit
def _system_block(k_ptr, tok_i, valid_i, lg_i, tok_j, valid_j, lg_j, beta_j, K: tl.constexpr,
                  BKS: tl.constexpr, DIAGONAL: tl.constexpr):
    """Block (i, j ≤ i) of A = strict_tril((K Kᵀ) ∘ Λ ∘ beta_s) between two 16-row blocks. The keys
    are read in slices of BKS columns, so no [16, K] tile stays in registers (at K = 256 whole
    key blocks spilled). Off the diagonal every t > s, so lg_i − lg_j ≤ 0 and exp cannot overflow."""
    kk = tl.arange(0, BKS)
    A = tl.zeros([16, 16], dtype=tl.float32)
    for kb in range(0, K, BKS):
        cols = kb + kk
        k_i = tl.load(k_ptr + tok_i[:, None] * K + cols[None, :], mask=valid_i[:, None] & (cols[None, :] < K), other=0.0)
        k_j = tl.load(k_ptr + tok_j[:, None] * K + cols[None, :], mask=valid_j[:, None] & (cols[None, :] < K), other=0.0)
        A += tl.dot(k_i.to(tl.float32), tl.trans(k_j.to(tl.float32)))
    diff = lg_i[:, None] - lg_j[None, :]
    if DIAGONAL:
        r = tl.arange(0, 16)
        strict = r[:, None] > r[None, :]
        return tl.where(strict, A * tl.exp(tl.where(strict, diff, float("-inf"))) * beta_j[None, :], 0.0)
    return A * tl.exp(diff) * beta_j[None, :]


@triton.jit
def _mm(a, b):
    """An exact fp32 product (input_precision "ieee") for C × C factor algebra: the merges of the
    blocked inverse here, bayes' factorisation adjoints in bayes_keys.py. Triangular factors can
    have large entries, TF32 would cost accuracy, and at these sizes the fp32 FMAs are cheap."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _store_block(linv_ptr, tok, valid, j, X, C: tl.constexpr):
    """Write column block j (16 wide) of 16 rows of L⁻¹."""
    r = tl.arange(0, 16)
    tl.store(linv_ptr + tok[:, None] * C + 16 * j + r[None, :], X, mask=valid[:, None])


@triton.jit
def _store_zeros_right(linv_ptr, tok, valid, col0, C: tl.constexpr):
    """Zeros from column col0 on in 16 rows of L⁻¹ (lower triangular; the buffer is uninitialised)."""
    cols = tl.arange(0, C)
    tl.store(linv_ptr + tok[:, None] * C + cols[None, :], tl.zeros([16, C], dtype=tl.float32),
             mask=valid[:, None] & (cols[None, :] >= col0))


@triton.jit
def _reset_system_blocked_kernel(k_ptr, g_ptr, beta_ptr, chunk_ptr, cu_ptr, linv_ptr, H,
                                 K: tl.constexpr, BKS: tl.constexpr, C: tl.constexpr):
    """L⁻¹ of reset's chunk system by 16-row blocks (C = 32 or 64), as fla's solve_tril: each
    diagonal block X_bb = (I + A_bb)⁻¹ by its own 15-step substitution on a 16 × 16 tile, the
    blocks independent of each other, then the blocks below the diagonal from (I + A) X = I,
    column block by column block: X_ij = −X_ii Σ_{j≤k<i} A_ik X_kj."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i = tl.load(chunk_ptr + 2 * c), tl.load(chunk_ptr + 2 * c + 1)
    bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    row0 = bos + i * C
    r = tl.arange(0, 16)
    lg0, b0, t0, v0 = _sub_block(g_ptr, beta_ptr, row0, eos, 0.0, h, H)
    lg_end0 = tl.sum(tl.where(r == 15, lg0, 0.0), 0)
    lg1, b1, t1, v1 = _sub_block(g_ptr, beta_ptr, row0 + 16, eos, lg_end0, h, H)
    X00 = _unit_lower_inverse(_system_block(k_ptr, t0, v0, lg0, t0, v0, lg0, b0, K, BKS, True), 16)
    X11 = _unit_lower_inverse(_system_block(k_ptr, t1, v1, lg1, t1, v1, lg1, b1, K, BKS, True), 16)
    A10 = _system_block(k_ptr, t1, v1, lg1, t0, v0, lg0, b0, K, BKS, False)
    X10 = -_mm(_mm(X11, A10), X00)
    _store_block(linv_ptr, t0, v0, 0, X00, C)
    _store_zeros_right(linv_ptr, t0, v0, 16, C)
    _store_block(linv_ptr, t1, v1, 0, X10, C)
    _store_block(linv_ptr, t1, v1, 1, X11, C)
    _store_zeros_right(linv_ptr, t1, v1, 32, C)
    if C == 64:
        lg_end1 = tl.sum(tl.where(r == 15, lg1, 0.0), 0)
        lg2, b2, t2, v2 = _sub_block(g_ptr, beta_ptr, row0 + 32, eos, lg_end1, h, H)
        lg_end2 = tl.sum(tl.where(r == 15, lg2, 0.0), 0)
        lg3, b3, t3, v3 = _sub_block(g_ptr, beta_ptr, row0 + 48, eos, lg_end2, h, H)
        X22 = _unit_lower_inverse(_system_block(k_ptr, t2, v2, lg2, t2, v2, lg2, b2, K, BKS, True), 16)
        X33 = _unit_lower_inverse(_system_block(k_ptr, t3, v3, lg3, t3, v3, lg3, b3, K, BKS, True), 16)
        A20 = _system_block(k_ptr, t2, v2, lg2, t0, v0, lg0, b0, K, BKS, False)
        A21 = _system_block(k_ptr, t2, v2, lg2, t1, v1, lg1, b1, K, BKS, False)
        A30 = _system_block(k_ptr, t3, v3, lg3, t0, v0, lg0, b0, K, BKS, False)
        A31 = _system_block(k_ptr, t3, v3, lg3, t1, v1, lg1, b1, K, BKS, False)
        A32 = _system_block(k_ptr, t3, v3, lg3, t2, v2, lg2, b2, K, BKS, False)
        X21 = -_mm(_mm(X22, A21), X11)
        X20 = -_mm(X22, _mm(A20, X00) + _mm(A21, X10))
        X32 = -_mm(_mm(X33, A32), X22)
        X31 = -_mm(X33, _mm(A31, X11) + _mm(A32, X21))
        X30 = -_mm(X33, _mm(A30, X00) + _mm(A31, X10) + _mm(A32, X20))
        _store_block(linv_ptr, t2, v2, 0, X20, C)
        _store_block(linv_ptr, t2, v2, 1, X21, C)
        _store_block(linv_ptr, t2, v2, 2, X22, C)
        _store_zeros_right(linv_ptr, t2, v2, 48, C)
        _store_block(linv_ptr, t3, v3, 0, X30, C)
        _store_block(linv_ptr, t3, v3, 1, X31, C)
        _store_block(linv_ptr, t3, v3, 2, X32, C)
        _store_block(linv_ptr, t3, v3, 3, X33, C)


@triton.jit
def _whiten_kernel(k_ptr, v_ptr, g_ptr, linv_ptr, chunk_ptr, cu_ptr, wk_ptr, e_ptr, H,
                   K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """The chunk's whitened keys W = L⁻¹ K̃ (stored in wk's dtype) and whitened values L⁻¹ V
    (stored in e, which the h-loop then turns into the innovations in place): parallel over
    chunks, so that the serial h-loop has two products per chunk instead of three."""
    c, h = tl.program_id(0), tl.program_id(1)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    idx = tl.arange(0, C)
    gamma = tl.exp(tl.cumsum(tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float32), 0))
    Linv = tl.load(linv_ptr + tok[:, None] * C + idx[None, :], mask=valid[:, None], other=0.0)
    for kb in range(0, K, BKB):
        cols = kb + tl.arange(0, BKB)
        kmask = valid[:, None] & (cols[None, :] < K)
        kc = tl.load(k_ptr + tok[:, None] * K + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
        W = tl.dot(Linv, kc * gamma[:, None])
        tl.store(wk_ptr + tok[:, None] * K + cols[None, :], W.to(wk_ptr.dtype.element_ty), mask=kmask)
    for vb in range(0, V, BV):
        vv = vb + tl.arange(0, BV)
        vmask = valid[:, None] & (vv[None, :] < V)
        vc = tl.load(v_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        tl.store(e_ptr + tok[:, None] * V + vv[None, :], tl.dot(Linv, vc).to(e_ptr.dtype.element_ty), mask=vmask)


@triton.jit
def _chunk_end(g_ptr, tok, valid, C: tl.constexpr):
    """Γ_t, Γ_C and the decays Λ_C· from each token to the chunk end (row C − 1 of Λ), from the
    log decays alone (padded rows read g = 0)."""
    idx = tl.arange(0, C)
    lg = tl.cumsum(tl.load(g_ptr + tok, mask=valid, other=0.0).to(tl.float32), 0)
    lg_C = tl.sum(tl.where(idx == C - 1, lg, 0.0), 0)
    return tl.exp(lg), tl.exp(lg_C), tl.exp(lg_C - lg)


@triton.jit
def _mean_kernel(wk_ptr, g_ptr, u_ptr, w_ptr, s0_ptr, cu_ptr, slot_ptr, h_ptr, sf_ptr, e_ptr, H,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                 KEY_DOTS: tl.constexpr, UPDATE_16: tl.constexpr):
    """The h-loop: E = L⁻¹ V − W S0 (e holds L⁻¹ V on entry, W = L⁻¹ K̃ from _whiten_kernel) and
    S_C = Γ_C S0 + Uᵀ diag(Λ_C· w) E.

    U and w are the write directions and gains: bayes passes its own, reset passes the keys
    and beta (same token-major layout). The loop carries S in fp32; the chunk start states go
    to the h slots in their dtype, the final state to sf [N, H, K, V] in fp32.
    """
    pid_v, pid = tl.program_id(0), tl.program_id(1)
    n, h = pid // H, pid % H
    bos, eos = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    slot0 = tl.load(slot_ptr + n)
    idx = tl.arange(0, C)
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    state_mask = (kk[:, None] < K) & (vv[None, :] < V)
    state_off = kk[:, None] * V + vv[None, :]
    S = tl.load(s0_ptr + pid.to(tl.int64) * K * V + state_off, mask=state_mask, other=0.0)
    for i in range(tl.cdiv(eos - bos, C)):
        tl.store(h_ptr + ((slot0 + i) * H + h).to(tl.int64) * K * V + state_off, S.to(h_ptr.dtype.element_ty),
                 mask=state_mask)
        rows = bos + i * C + idx
        valid = rows < eos
        tok = rows * H + h
        kmask = valid[:, None] & (kk[None, :] < K)
        vmask = valid[:, None] & (vv[None, :] < V)
        Wk = tl.load(wk_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0)
        E = tl.load(e_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
        if KEY_DOTS:
            # The prediction W·S in the keys' dtype (bf16 in training: S rounded to 8 bits for
            # this product only, as fla does; it stays fp32 in the loop). On an H100 at K = 256
            # this took the h-loop from 2.7 to 2.3 ms, the states moved by 1e-4 relative.
            E -= tl.dot(Wk, S.to(Wk.dtype))
        else:
            E -= tl.dot(Wk.to(tl.float32), S)
        tl.store(e_ptr + tok[:, None] * V + vv[None, :], E.to(e_ptr.dtype.element_ty), mask=vmask)
        w = tl.load(w_ptr + tok, mask=valid, other=0.0).to(tl.float32)
        _, gamma_C, last = _chunk_end(g_ptr, tok, valid, C)
        if UPDATE_16:
            # Uᵀ read transposed from memory ([K, C], no register transpose) and the weighted
            # innovations rounded to U's bf16: the update on bf16 tensor cores, as fla does.
            Ut = tl.load(u_ptr + tok[None, :] * K + kk[:, None], mask=(kk[:, None] < K) & valid[None, :], other=0.0)
            S = gamma_C * S + tl.dot(Ut, (E * (last * w)[:, None]).to(Ut.dtype))
        else:
            U = tl.load(u_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
            S = gamma_C * S + tl.dot(tl.trans(U), E * (last * w)[:, None])
    tl.store(sf_ptr + pid.to(tl.int64) * K * V + state_off, S, mask=state_mask)


@triton.jit
def _output_kernel(q_ptr, g_ptr, u_ptr, w_ptr, e_ptr, h_ptr, vpri_ptr, chunk_ptr, cu_ptr, slot_ptr,
                   o_ptr, var_ptr, scale, H,
                   K: tl.constexpr, V: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                   WITH_VARIANCE: tl.constexpr, KEY_DOTS: tl.constexpr):
    """O = scale · [diag(Γ) Q S0 + (tril(Q Uᵀ) ∘ Λ) diag(w) E]; with variance, also
    scale² · [prior part − Σ_s (Q Uᵀ ∘ Λ)_ts² w_s] (filter_math.chunk_variance).
    Q Uᵀ and Q S0 are summed over blocks of BKB keys, so no operand holds all K columns (the
    V block can be wide at K = 256). KEY_DOTS: Q Uᵀ and Q S0 take U's dtype (16-bit in
    training, the S0 slots are bf16 then), as fla's output kernel does; the product with the
    innovations E is fp32."""
    pid_v, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i, rows, valid, tok = _chunk_tokens(chunk_ptr, cu_ptr, c, h, H, C)
    start = h_ptr + ((tl.load(slot_ptr + n) + i) * H + h).to(tl.int64) * K * V
    vv = pid_v * BV + tl.arange(0, BV)
    vmask = valid[:, None] & (vv[None, :] < V)
    QU = tl.zeros([C, C], dtype=tl.float32)
    QS = tl.zeros([C, BV], dtype=tl.float32)
    for kb in range(0, K, BKB):
        kk = kb + tl.arange(0, BKB)
        kmask = valid[:, None] & (kk[None, :] < K)
        qc = tl.load(q_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0)
        U = tl.load(u_ptr + tok[:, None] * K + kk[None, :], mask=kmask, other=0.0)
        S0 = tl.load(start + kk[:, None] * V + vv[None, :], mask=(kk[:, None] < K) & (vv[None, :] < V), other=0.0)
        if KEY_DOTS:
            qc, S0 = qc.to(U.dtype), S0.to(U.dtype)
        else:
            qc, S0, U = qc.to(tl.float32), S0.to(tl.float32), U.to(tl.float32)
        QU = tl.dot(qc, tl.trans(U), QU)
        QS = tl.dot(qc, S0, QS)
    lg, decay = _chunk_decays(g_ptr, rows, valid, h, H, C)
    w = tl.load(w_ptr + tok, mask=valid, other=0.0).to(tl.float32)
    E = tl.load(e_ptr + tok[:, None] * V + vv[None, :], mask=vmask, other=0.0).to(tl.float32)
    scores = QU * decay                                       # decay is 0 above the diagonal
    O = tl.exp(lg)[:, None] * QS + tl.dot(scores * w[None, :], E)
    tl.store(o_ptr + tok[:, None] * V + vv[None, :], (scale * O).to(o_ptr.dtype.element_ty), mask=vmask)
    if WITH_VARIANCE:
        if pid_v == 0:
            prior = tl.load(vpri_ptr + tok, mask=valid, other=0.0)
            var = scale * scale * (prior - tl.sum(scores * scores * w[None, :], 1))
            tl.store(var_ptr + tok, var.to(var_ptr.dtype.element_ty), mask=valid)


class Plan:
    """Chunk bookkeeping shared by the forward kernels and the backward sweep.

    cu: int32 document boundaries of the packed token stream; chunks: [n_chunks, 2] int32
    (document, chunk index in it) for the chunk-parallel kernels; slot0: int32 first state
    slot of every document (its chunks' start states, then its final state).
    """

    def __init__(self, B, T, bounds, chunk_size, device):
        """bounds: the document boundaries (cu_seqlens) as a host sequence, or None."""
        C = chunk_size
        # The tables are built on the host and copied without waiting: a device-side
        # repeat_interleave or a .sum() read back would stall the host until the GPU queue
        # drains, and the kernels launched after it would start late (on an H100 this cost
        # reset 1.2 ms of wall time per fwd+bwd at (8, 4096, 8, 128, 128)).
        if bounds is None:
            self.cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
            per_doc = torch.full((B,), -(-T // C), dtype=torch.int64)
        else:
            self.cu = _to_device(torch.tensor(bounds, dtype=torch.int32), device)
            per_doc = torch.tensor([-(-(b - a) // C) for a, b in zip(bounds[:-1], bounds[1:])], dtype=torch.int64)
        self.n_docs = len(per_doc)
        self.n_chunks = int(per_doc.sum())
        doc = torch.repeat_interleave(torch.arange(self.n_docs), per_doc)
        first = torch.cumsum(per_doc, 0) - per_doc                 # first chunk of every document
        within = torch.arange(self.n_chunks) - first[doc]
        self.chunks = _to_device(torch.stack([doc, within], 1).to(torch.int32), device)
        self.slot0 = _to_device((first + torch.arange(self.n_docs)).to(torch.int32), device)
        self.n_slots = self.n_chunks + self.n_docs
        self.per_doc = _to_device(per_doc, device)

    def final_slots(self):
        """The slot of every document's final state (after its last chunk), int64."""
        return self.slot0.long() + self.per_doc


_PLANS = {}


def plan_for(B, T, cu_seqlens, chunk_size, device):
    """The Plan of these arguments, built once and reused: every layer of a model, and the
    backward of each, asks for the same one. cu_seqlens is read back to the host (one sync
    per call with documents; none without)."""
    bounds = None if cu_seqlens is None else tuple(cu_seqlens.tolist())
    key = (B, T, bounds, chunk_size, str(device))
    if key not in _PLANS:
        if len(_PLANS) >= 64:              # a loader with varying documents: keep it bounded
            _PLANS.clear()
        _PLANS[key] = Plan(B, T, bounds, chunk_size, device)
    return _PLANS[key]


def _to_device(host, device):
    """A host tensor on the device, copied asynchronously from pinned memory on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# Launch settings (module constants: tools/profile_kernels.py --set tries others). The reset system's
# serial inverse is latency-bound: 2 warps took it from 1.54 to 0.60 ms at (8, 4096, 6, 256)
# on an H100 (0.89 → 0.82 at H = 8, K = 128; 1 warp: 1.20 and 0.87). Whitening with 2 warps:
# 0.30 → 0.25 ms per call at (8, 4096, 6, 256, 512) with bf16 innovations (8 warps: 0.33); its
# fp32 products then sum in another order, which moved reset's outputs by 1.5e-5 relative.
# The covariance sweep with 4 warps once split (cov_split): on an H100, bayes' covariance kernel
# (fwd + rerun) 5.40 → 4.70 ms at (8, 4096, 8, 128, 128) against 8 warps; at (8, 4096, 6, 256,
# 512) 9.68 → 8.43 with 4 warps and two programs per SM (so split 4 ways instead of 2).
COV_WARPS, OUT_WARPS, RESET_SYSTEM_WARPS, WHITEN_WARPS = 4, 4, 2, 2
# reset's system inverse by 16-row blocks (_reset_system_blocked_kernel) at chunk sizes 32 and
# 64, else row by row. On an H100 at C = 64 it took 0.52 ms at (8, 4096, 6, 256) and 0.38 at
# (8, 4096, 8, 128) against the row-by-row 0.61 and 0.83, with 1 warp (2 warps: 0.83 / 0.39;
# keeping whole [16, K] key blocks in registers spilled: 5.3 ms at K = 256 with 2 warps).
RESET_SYSTEM_BLOCKED, RESET_BLOCKED_WARPS = 1, 1
COV_BLOCK = 64      # columns of P per tile in the covariance sweep
# Tried and not kept (H100, Triton 3.6): P formed only every few chunks (a window), each chunk's
# products K P_i Kᵀ and K P_i taken from the window's start P and C × C products with the
# window's earlier writes (P_i = a P_s + b I − Σ_l Ũ_lᵀ diag(e_l) Ũ_l), to take the per-chunk update
# of all of P off the serial path. Correct (interpreter and GPU tests passed), but the covariance
# kernel got slower: 4.38 → 5.30 ms (4-chunk windows) and 4.96 (2) at (8, 4096, 6, 256, 512),
# 2.63 → 2.96 and 2.77 at (8, 4096, 8, 128, 128), spilling 94–110 registers at 4 warps. Per
# chunk (K = 256, globaltimer stamps) the update of 15 µs became 6.7 µs of shares, 6.2 of
# summing them, and a window end that still applies each chunk's update to every tile (44 µs per
# window); the small products stay latency-bound like the update they replaced.
# The backward's covariance replay (_cov_replay_kernel, one program per tile pair of P: its
# tile width and warps) and the unpacking of the saved factors and write directions
# (_unpack_kernel, one program per chunk). On an H100 the replay took 0.93 and 0.45 ms at
# (8, 4096, 6, 256, 512) and (8, 4096, 8, 128, 128) with (64, 4); (32, 4) 1.30 and 0.63,
# (64, 8) 0.98 and 0.52. It writes every chunk's P (1.6 GB at the first shape).
# Tried and not kept (H100, Triton 3.6): those slots in fp16 for 16-bit inputs (the sweep and
# _keys_fp_kernel converting them back to fp32). Replay 0.85 → 0.61 ms, _keys_fp_kernel 0.95 →
# 0.76, the sweep ~0.1 ms slower: fwd+bwd 20.49 → 20.25 ms at (8, 4096, 6, 256, 512), 10.28 →
# 10.24 at (8, 4096, 8, 128, 128). Unscaled, fp16's 65504 bounds P; scaled per slot by a power of
# two from a variance bound (P0's largest, then Γ_C² b + d_C per chunk), the slots matched the fp32
# ones to 1.5e-4 and a random-cotangent loss's gradients moved 2e-4, but for profile_kernels' loss
# (o.sum()) dk and dg moved 4.7e-3 and 5.1e-3 on the GPU (1.4e-4 in Triton's interpreter), which
# stayed unexplained: not kept for a 1% gain (commits 7cf9a6a, reverted).
REPLAY_BLOCK, REPLAY_WARPS, UNPACK_WARPS = 64, 4, 4
# The most programs that share one (document, head)'s covariance sweeps (cov_split), each
# owning some column tiles of P and meeting the others at two barriers per chunk (the backward's
# at one). On an H100 (one run, bayes fwd+bwd): 40.8 → 34.2 ms at (8, 4096, 6, 256, 512) (split
# 2 ways; the covariance kernel 12.9 → 9.7 ms, the backward's sweep 9.2 → 5.5), 18.9 → 17.2 at
# (8, 4096, 8, 128, 128), 29.0 → 17.7 at (2, 4096, 6, 256, 512) (4 ways). Outputs move ~5e-5
# (S is summed from the parts' shares in another order); P stays exactly symmetric.
COV_SPLIT = 4
COV_PER_SM = 2      # programs of _bayes_cov_kernel resident on one SM (registers at COV_WARPS = 4)
# Warps of _bayes_cov_kernel where every program has an SM to itself (cov_launch). On an H100,
# with the elimination by halves: at (8, 4096, 8, 128, 128) (128 programs, split 2 ways) 8 warps
# took the kernel (fwd + rerun) from 4.19 to 3.94–3.99 ms; at (8, 4096, 6, 256, 512) 8 warps, one
# program per SM (so split 2 ways, not 4) made it slower, 7.51 → 8.13. The backward's sweep
# (backward._cov_sweep_kernel) got slower with 8 warps alone at K = 128: 1.58 → 1.80 ms.
COV_WARPS_ALONE = 8
# Software pipelining of the covariance sweep's tile loops (loads of the next [BP, BP] tile of P
# issued during the current product). 2 was slower on an H100: 13.0 → 15.2 ms fwd + rerun at
# (8, 4096, 6, 256, 512); the backward's sweep (backward.COV_SWEEP_STAGES) 9.3 → 13.5.
# Where the forward sweep waits (Nsight Compute, H100, (8, 4096, 6, 256, 512), 192 programs of 4
# warps: 255 registers, 36 spilled): of its stall samples 23% at barriers (the bar.sync of
# register-to-shared layout conversions), 23% on global loads (P's tiles, keys, U from L2),
# 18% on fixed-latency waits, 14% on shared memory; 0.21 instructions issued per cycle and
# scheduler. So it waits on latency, not on throughput, as the backward's sweep does.
COV_STAGES = 1
# P's update (forward sweep and backward replay) with fp16 products of the saved write directions
# (writes_16); 0 = TF32. On an H100 (Triton 3.6, one process, tools/profile_kernels.py --modes bayes
# against --set COV_WRITES_16=1): covariance kernel 4.44 → 3.89 ms and replay 0.95 → 0.84 at
# (8, 4096, 6, 256, 512), fwd+bwd 21.54 → 20.72; 2.62 → 2.54, 0.39 → 0.35 and 10.49 → 10.15 at
# (8, 4096, 8, 128, 128). Outputs and gradients moved ≤ 2.1e-4 (relative).
COV_WRITES_16 = 1
# The output kernel's key block, widest V block and software-pipelining stages of its key loop.
# On an H100 (Triton 3.6), reset forward at (8, 4096, 6, 256, 512): 0.87 ms before the key loop
# (all K columns at once, V blocks of 64), 0.73 with it, 0.62 with 3 stages; of the 36 settings
# of (BKB 32/64/128, BV 64/128, 4/8 warps, 1–3 stages) this was the fastest at both target
# shapes (0.20 → 0.196 ms at (8, 4096, 8, 128, 128)), outputs identical across all of them.
OUT_BKB, OUT_BV_CAP, OUT_STAGES = 64, 64, 3
# Software pipelining of the h-loop's chunk loop (loads of chunk i + 1 issued during chunk i).
# 2 stages on an H100 (Triton 3.6), outputs and gradients bit-identical to 1: bayes 3.75 → 2.43 ms
# at (8, 4096, 6, 256, 512) and 0.86 → 0.62 at (8, 4096, 8, 128, 128); reset 2.77 → 2.44 and
# 0.60 → 0.46. Where the stages do not fit in shared memory, launch_staged takes 1.
MEAN_STAGES = 2
# Two chunks per step of the h-loop (chunk b's prediction from the step's start state,
# W_b S_a = Γ_a W_b S + (W_b U_aᵀ) diag(Λ_C· w) E_a, so a step waits on three products instead of
# four) was tried and was slower on an H100: bayes' h-loop 2.19 → 3.73 ms at (8, 4096, 6, 256, 512)
# (255 registers, 62 spilled, at 8 warps) and 0.55 → 0.59 at (8, 4096, 8, 128, 128); reset's,
# pairing its chunks of 64, 1.72 → 9.94 and 0.39 → 0.86.
# The h-loop's state update Uᵀ(…)E on bf16 tensor cores (bf16_dots; 0 = fp32 products). On an
# H100 (Triton 3.6) with V blocks of 32 and 4 warps: 2.96 → 2.78 ms at (8, 4096, 6, 256, 512),
# 0.68 → 0.60 ms at (8, 4096, 8, 128, 128) (V blocks of 64 there before); outputs moved 6e-4.
MEAN_UPDATE_16 = 1
# Innovations stored in bf16 for bf16 values (innovation_dtype; 0 = fp32). On an H100, reset
# fwd+bwd 9.04 → 8.26 ms at (8, 4096, 6, 256, 512) (h-loop 2.28 → 1.71) and 3.19 → 3.04 at
# (8, 4096, 8, 128, 128). Relative RMS error against the fp32 reference at K = 256 (B = 2):
# outputs 1.85e-3 → 2.46e-3 (reset), 2.59e-3 → 3.07e-3 (bayes); final states alike; gradients
# within 5e-4 of before (the GPU tests' bounds: 5e-3 and 1e-2).
E_16 = 1
# The h-loop's V block and warps with the bf16 update at K > 128 (_mean_launch).
MEAN_WIDE_BV, MEAN_WIDE_WARPS = 64, 8


def cov_split(K, BP, groups, device, per_sm):
    """How many programs share one (document, head)'s covariance sweep (NS of _bayes_cov_kernel
    and of the backward's sweep): the most, up to COV_SPLIT and one per column tile of P, that
    keep every program of the launch resident at once, per_sm of them on each SM (a second wave
    would wait for the first to finish its whole sweep). 1 in Triton's interpreter, which runs
    programs one after another, so a program waiting at a group barrier would wait forever."""
    device = torch.device(device)
    if device.type != "cuda" or _interpreting():
        return 1
    slots = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while 2 * split <= min(COV_SPLIT, triton.cdiv(K, BP)) and 2 * split * groups <= slots:
        split *= 2
    return split


def cov_launch(K, BP, groups, device):
    """(NS, num_warps) of _bayes_cov_kernel: NS from cov_split, and COV_WARPS_ALONE warps instead
    of COV_WARPS when the launch gives every program an SM of its own anyway (groups × NS at most
    the SMs): the sweep is latency-bound with one warp per scheduler (Nsight Compute on an H100
    at (8, 4096, 8, 128, 128): 0.18 instructions issued per cycle and scheduler, 5.5 cycles per
    instruction), and more warps split each tile's work without costing a second program per SM."""
    NS = cov_split(K, BP, groups, device, COV_PER_SM)
    device = torch.device(device)
    if device.type != "cuda" or _interpreting():
        return NS, COV_WARPS
    alone = groups * NS <= torch.cuda.get_device_properties(device).multi_processor_count
    return NS, COV_WARPS_ALONE if alone else COV_WARPS


def key_dots(k):
    """Whether the state sweeps may use the keys' own dtype (bf16 or fp16 in training) as a dot
    operand, with the state rounded to it (KEY_DOTS of _mean_kernel and _dstate_kernel).
    Not under Triton's interpreter with bf16 keys: it computes bf16 dots wrongly (values of
    order 1e10 with Triton 3.9), so the CPU tests take the fp32 products there; the GPU tests
    cover the bf16 path."""
    return not (k.dtype == torch.bfloat16 and _interpreting())


def bf16_dots(enabled, *operands):
    """Whether a kernel may take its transposed products (the state sweeps' updates, the
    local terms) on bf16 tensor cores, the fp32 operands rounded to bf16 as fla rounds its
    innovations: only when the given tensor operands are all bf16 (fp16 would not hold E·w
    with gains up to 1 / R_MIN) and never under the interpreter (its bf16 dots are wrong,
    see key_dots)."""
    return bool(enabled) and all(x.dtype == torch.bfloat16 for x in operands) and not _interpreting()


def writes_16(writes):
    """Whether P's update takes its products with the saved write directions on fp16 tensor cores
    (WRITES_16 of _covariance_tile): when they are saved in fp16 (write_dtype) and COV_WRITES_16 is
    set, never under the interpreter."""
    return bool(COV_WRITES_16) and writes.dtype == torch.float16 and not _interpreting()


def innovation_dtype(v):
    """dtype of the innovations e [B·T, H, V]: bf16 when the values are (E_16), as fla keeps its
    v_new, else fp32. e is the h-loop's read and write and the output and backward kernels'
    read; every kernel computes with it in fp32, and the h-loop updates its state with the
    fp32 innovations before they are rounded for storage."""
    return torch.bfloat16 if E_16 and v.dtype == torch.bfloat16 else torch.float32


def slot_dtype(k):
    """dtype of the mean's chunk-boundary state slots: bf16 when the keys are 16-bit, as fla
    keeps its chunk states, else fp32. These slots are the h-loop's largest write and the
    output and local kernels' largest read (B·T/C·H·K·V of them); bf16 rather than fp16
    keeps fp32's range for states that grow with the values. The loops that carry the state
    stay fp32, and the final state is returned in fp32."""
    return torch.bfloat16 if k.dtype in (torch.bfloat16, torch.float16) else torch.float32


def write_dtype(k):
    """dtype of bayes' saved write directions Ũ = diag(√w) U [B·T, H, K], from which the backward
    replays the covariances (_cov_replay_kernel): fp16 for 16-bit keys, else fp32. fp16 keeps
    11 significant bits, those of the TF32 products that take Ũ on a GPU anyway, in half the
    memory of fp32 (the saved-memory target: at most 2x what Gated DeltaNet saves). The √w
    scaling bounds its range: u_t = P̄_t k_t and s_t ≥ k_tᵀ P̄_t k_t give
    |ũ_t| = |u_t| / √s_t ≤ √λ_max(P̄_t) · |k_t|, far below fp16's 65504 for unit keys and
    covariances of order 1 (chunk_forward checks that it stayed finite)."""
    return torch.float16 if k.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _v_block(V, cap):
    """A power-of-two block of the value dimension: V rounded up, at least 16, at most cap."""
    return max(16, min(triton.next_power_of_2(V), cap))


def _block_v(K, V):
    # The h-loop holds S0 [K, BV] and U, K̃ [C, K] in registers: narrower V blocks for K = 256.
    return _v_block(V, 32 if K > 128 else 64)


def _mean_launch(K, V, u_dots):
    """(BV, num_warps, UPDATE_16) of the h-loop. Measured on an H100 (Triton 3.6) at K = 256, V = 512:
    with fp32 U (read again by every V block) 6.3 → 3.7 ms with (64, 8) instead of (32, 4).
    With bf16 U (reset's keys, bayes' copy) and the bf16 update, per fwd + backward rerun, one
    process: at K = 256 (64, 8) 2.27 ms against (32, 4) 2.39–2.41 ((64, 4) 3.0, (32, 2) 7.0);
    at K = 128 (32, 4) 0.47 against (64, 8) 0.53.
    (32, 8) returned NaNs at K = 256 (the Triton 3.6 Hopper miscompilation noted at
    backward._dstate_launch): avoid it."""
    if K > 128 and u_dots.dtype == torch.float32:
        return _v_block(V, 64), 8, False
    update_16 = bf16_dots(MEAN_UPDATE_16, u_dots)
    if K > 128 and update_16:
        return _v_block(V, MEAN_WIDE_BV), MEAN_WIDE_WARPS, True
    if K > 64 and update_16:
        return _v_block(V, 32), 4, True
    return _block_v(K, V), 4, update_16


_STAGES_TOO_MANY = set()


def launch_staged(kernel, grid, *args, num_stages, **kwargs):
    """kernel[grid](*args, **kwargs) with num_stages software-pipelining stages, or with 1 where
    the GPU's shared memory cannot hold them. Triton refuses such a launch before it runs
    (OutOfResources); on an H100 reset's reverse sweep at K = 256 asked 254 KB of 227 with 2.
    Which kernels, stage counts and operand types were refused is remembered, so the refusal
    happens once each."""
    if num_stages > 1:
        key = (kernel.__name__, num_stages, tuple(sorted(kwargs.items())),
               tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        if key not in _STAGES_TOO_MANY:
            try:
                return kernel[grid](*args, num_stages=num_stages, **kwargs)
            except triton.runtime.errors.OutOfResources:
                _STAGES_TOO_MANY.add(key)
    return kernel[grid](*args, num_stages=1, **kwargs)


@dataclass
class Intermediates:
    """What the first two forward passes leave behind, token-major [B·T, H, ...] fp32 unless
    noted: the chunk-boundary states h_slots [n_slots, H, K, V] (slot_dtype; a document's last
    slot unused), the final states s_final [N, H, K, V]; bayes' covariances (else None): the
    forward's final ones p_final [N, H, K, K] (its sweep keeps no other) and, in the backward's
    rerun, every chunk's start covariance p_slots [n_slots, H, K, K]; the write directions u
    (reset: the keys k themselves; bayes: only in the backward's rerun, else None) and u_dots,
    the copy that the value kernels' products read (bayes with 16-bit keys: U in the keys'
    dtype, as reset reads its keys; else fp32 U);
    gains w (reset: beta); L⁻¹ of every chunk's system [B·T, H, C]; innovations e [B·T, H, V]
    (innovation_dtype); the whitened keys wkeys = L⁻¹ K̃ [B·T, H, K] (the keys' dtype when they
    are dot operands); the prior part of the predictive variance vpri (bayes with
    output_variance, else None); L itself (bayes, else None) and what the backward's rerun is
    given back: as factors bayes' packed factors (L below the diagonal, L⁻¹ᵀ above, w on it)
    or reset's L⁻¹, and bayes' write directions Ũ = diag(√w) U (write_dtype) as writes."""

    h_slots: torch.Tensor
    s_final: torch.Tensor
    p_slots: Optional[torch.Tensor]
    u: Optional[torch.Tensor]
    u_dots: torch.Tensor
    w: torch.Tensor
    linv: torch.Tensor
    e: torch.Tensor
    wkeys: torch.Tensor
    vpri: Optional[torch.Tensor]
    l: Optional[torch.Tensor] = None
    packed: Optional[torch.Tensor] = None
    writes: Optional[torch.Tensor] = None
    p_final: Optional[torch.Tensor] = None


def chunk_states(mode, q, k, v, g, beta, noise, S0, P0, plan, output_variance, chunk_size, factors=None,
                 writes=None):
    """Passes 1 and 2 of the forward (covariance or reset system, then the mean h-loop).
    Inputs [B, T, H, ...] contiguous (noise fp32, bayes only); S0 [N, H, K, V] fp32,
    P0 [N, H, K, K] fp32 (bayes) or None. The backward's rerun passes what the forward
    returned as `packed` (factors: bayes' packed factors, reset's L⁻¹, both [B·T, H, C] fp32)
    and, for bayes, as `writes` (the write directions Ũ [B·T, H, K]): it then skips reset's
    system inverse, and bayes replays its covariances from Ũ in parallel over P's tiles
    (_cov_replay_kernel) instead of sweeping the chunks' factorisations again.
    Returns Intermediates; the final state of document n is s_final[n] (and p_final[n], or
    slot slot0[n] + NT_n of p_slots in the rerun)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    dev = q.device
    BK = max(16, triton.next_power_of_2(K))
    n_tok = B * T
    f32 = dict(dtype=torch.float32, device=dev)
    reset_linv_given = mode == "reset" and factors is not None
    # reset's rerun takes the forward's L⁻¹ (factors) instead of inverting its system again
    linv = factors if reset_linv_given else torch.empty(n_tok, H, C, **f32)
    h_slots = torch.empty(plan.n_slots, H, K, V, dtype=slot_dtype(k), device=dev)
    s_final = torch.empty(plan.n_docs, H, K, V, **f32)
    p_slots = p_final = None
    vpri = None
    l_factor = None
    u = None
    if mode == "bayes":
        u_copy = key_dots(k) and k.dtype != torch.float32
        l_factor, w = torch.empty(n_tok, H, C, **f32), torch.empty(n_tok, H, **f32)
        groups = plan.n_docs * H
        BP = min(BK, COV_BLOCK)
        if factors is None:
            packed = torch.empty(n_tok, H, C, **f32)
            writes = torch.empty(n_tok, H, K, dtype=write_dtype(k), device=dev)
            u_dots = torch.empty(n_tok, H, K, dtype=k.dtype if u_copy else torch.float32, device=dev)
            vpri = torch.empty(n_tok, H, **f32) if output_variance else None
            scratch = torch.empty(groups, C, K, **f32)
            # P of the chunk being swept and of the next, by (document, head): the forward needs no
            # other (the backward replays every chunk's from the write directions), where storing
            # every chunk's took 1.6 GB at (8, 4096, 6, 256, 512).
            p_buf = torch.empty(groups, 2, K, K, **f32)
            p_buf[:, 0] = P0.float().reshape(groups, K, K)
            p_final = P0.float().clone()                  # as is for a document without tokens
            NS, cov_warps = cov_launch(K, BP, groups, dev)
            sync = torch.zeros(1 + groups, dtype=torch.int32, device=dev)
            elim = torch.empty(groups * NS * 4 * C * C, **f32)     # _ldl_inverse's
            shares = torch.empty(groups * NS * (2 * C * C + 2 * C), **f32) if NS > 1 else w
            _bayes_cov_kernel[(groups * NS,)](
                k, q, g, beta, noise, plan.cu, p_buf, p_final, scratch, elim, writes, u_dots, linv, l_factor,
                w, packed, vpri if vpri is not None else w, shares, sync, H,
                K=K, BP=BP, C=C, R_MIN=fm.R_MIN, WITH_VARIANCE=output_variance, NS=NS,
                WRITES_16=writes_16(writes), num_warps=cov_warps, num_stages=COV_STAGES)
        else:
            packed = factors
            p_slots = torch.empty(plan.n_slots, H, K, K, **f32)
            p_slots[plan.slot0.long()] = P0.float()
            u = torch.empty(n_tok, H, K, **f32)
            u_dots = torch.empty(n_tok, H, K, dtype=k.dtype, device=dev) if u_copy else u
            _unpack_kernel[(plan.n_chunks, H)](packed, writes, plan.chunks, plan.cu, linv, l_factor, w, u, u_dots, H,
                                               K=K, BKB=min(BK, 64), C=C, U_COPY=u_copy, num_warps=UNPACK_WARPS)
            BR = min(BK, REPLAY_BLOCK)
            NB = triton.cdiv(K, BR)
            _cov_replay_kernel[(NB * NB, groups)](writes, g, noise, plan.cu, plan.slot0, p_slots, H,
                                                  K=K, BP=BR, C=C, NB=NB, WRITES_16=writes_16(writes),
                                                  num_warps=REPLAY_WARPS)
    else:
        if reset_linv_given:
            pass                                # the forward's L⁻¹, taken above
        elif RESET_SYSTEM_BLOCKED and C > 16:
            _reset_system_blocked_kernel[(plan.n_chunks, H)](k, g, beta, plan.chunks, plan.cu, linv, H,
                                                             K=K, BKS=min(BK, 64), C=C, num_warps=RESET_BLOCKED_WARPS)
        else:
            _reset_system_kernel[(plan.n_chunks, H)](k, g, beta, plan.chunks, plan.cu, linv, H,
                                                      K=K, BK=BK, C=C, num_warps=RESET_SYSTEM_WARPS)
        u, w, u_dots = k, beta, k              # reset: write along the keys with gain beta
    e = torch.empty(n_tok, H, V, dtype=innovation_dtype(v), device=dev)
    wkeys = torch.empty(n_tok, H, K, dtype=k.dtype if key_dots(k) else torch.float32, device=dev)
    _whiten_kernel[(plan.n_chunks, H)](k, v, g, linv, plan.chunks, plan.cu, wkeys, e, H, K=K, V=V,
                                       BKB=min(BK, 64), BV=_v_block(V, 64), C=C,
                                       num_warps=WHITEN_WARPS)
    BV, mean_warps, update_16 = _mean_launch(K, V, u_dots)
    launch_staged(
        _mean_kernel, (triton.cdiv(V, BV), plan.n_docs * H),
        wkeys, g, u_dots, w, S0.float().contiguous(), plan.cu, plan.slot0, h_slots, s_final, e, H,
        K=K, V=V, BK=BK, BV=BV, C=C, KEY_DOTS=key_dots(k), UPDATE_16=update_16,
        num_warps=mean_warps, num_stages=MEAN_STAGES)
    return Intermediates(h_slots, s_final, p_slots, u, u_dots, w, linv, e, wkeys, vpri, l_factor,
                         packed if mode == "bayes" else linv, writes, p_final)


def chunk_forward(mode, q, k, v, g, beta, noise, S0, P0, plan, scale, output_variance, chunk_size,
                  defer_check=False):
    """The whole forward: chunk_states, then the outputs (pass 3).

    Returns (o, variance or None, the final states [N, H, K, V] fp32, the final covariances
    [N, H, K, K] fp32 or None, the factors [B·T, H, C] fp32 for the backward: bayes' packed
    LDLᵀ factors, reset's L⁻¹, and bayes' write directions Ũ [B·T, H, K] (write_dtype; None for
    reset), also for the backward, and bayes' pivot check (pivot_check.pivot_status; None for
    reset)). bayes checks it here, or with defer_check leaves it for the backward to read.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    BK = max(16, triton.next_power_of_2(K))
    mid = chunk_states(mode, q, k, v, g, beta, noise, S0, P0, plan, output_variance and mode == "bayes", C)
    o = torch.empty_like(v)
    variance = torch.empty(B, T, H, dtype=v.dtype, device=q.device) if output_variance else None
    BV = _v_block(V, OUT_BV_CAP)
    launch_staged(
        _output_kernel, (triton.cdiv(V, BV), plan.n_chunks, H),
        q, g, mid.u_dots, mid.w, mid.e, mid.h_slots, mid.vpri if mid.vpri is not None else mid.w, plan.chunks,
        plan.cu, plan.slot0, o, variance if variance is not None else o, scale, H,
        K=K, V=V, BKB=min(BK, OUT_BKB), BV=BV, C=C,
        WITH_VARIANCE=output_variance and mode == "bayes", KEY_DOTS=key_dots(k), num_warps=OUT_WARPS,
        num_stages=OUT_STAGES)
    if output_variance and mode != "bayes":
        variance.zero_()
    status = None
    if mode == "bayes":
        status = pivot_status(mid.w, mid.p_final)
        if defer_check:
            check_later(status)             # the backward reads it (pivot_check.py)
        else:
            check_now(status, mid.writes)   # waits for the GPU: only after every forward launch
    return o, variance, mid.s_final, mid.p_final, mid.packed, mid.writes, status
