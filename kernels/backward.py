"""Backward of the chunked filter, all in Triton kernels (no autograd).

1. The forward's first two passes rerun (chunk_fwd.chunk_states) and give the chunk-boundary
   states, the write directions U, gains w, L⁻¹ (and bayes' L), the whitened keys L⁻¹ K̃ and
   the innovations E. The forward saves its inputs and each chunk's factors (bayes: L⁻¹, L,
   w packed in one C × C block; reset: L⁻¹), so the rerun skips the system's inverse (reset);
   bayes also saves its write directions, from which the rerun replays the covariances in
   parallel over P's tiles (no serial LDLᵀ, no sweep waiting on one).
2. chunk_bwd.py: the adjoint of the mean runs backwards over the chunks (`_dstate_kernel`),
   then chunk-parallel kernels form every sum over V: dV and the adjoints of the chunk's
   key-side products (A diag(w), L, diag(Λ_C· w) U, diag(Γ) Q, K̃, Γ_C; see that module).
3. Those products are functions of (q, k, g, beta) alone for reset:
   `_reset_local_keys_kernel` differentiates them by hand as it forms them. For bayes they
   also depend on the process noise and the chunk's start covariance P_i: bayes_keys.py
   recomputes each chunk's factorisation adjoint by hand (the derivation is in that module)
   from the rerun's L⁻¹, L, w, U and P_i.
4. bayes also carries the covariance adjoint across chunks. With Kalman-optimal gains the
   first-order change of the gains drops out of the covariance update
   (d(P̄ − P̄kkᵀP̄/s) = (I − ukᵀ/s) dP̄ (I − ukᵀ/s)ᵀ), so P_{i+1} moves by Φ_i dP_i Φ_iᵀ, with
   Φ_i = Γ_C I − Uᵀ diag(Λ_C· w) L⁻¹ K̃ the chunk's closed-loop transition (the same Φ that
   carries the mean: S_{i+1} = Φ_i S_i + terms free of S_i). Hence
       dP_i = Φ_iᵀ dP_{i+1} Φ_i + (the chunk's own terms in P_i),
   a sweep that needs each chunk's own terms first: one chunk-parallel kernel for them, the
   sweep (which also forms the products of each chunk's end-covariance adjoint that the
   gradients use, so it keeps only the dP it carries), then the input gradients.
"""

from __future__ import annotations

import torch
import triton

from titan_bayes.ops import filter_math as fm

from .bayes_keys import _bayes_keys_kernel, _bayes_own_kernel, _cov_sweep_kernel, _keys_fp_kernel
from .chunk_bwd import _dstate_kernel, _local_de_kernel, _local_kernel, _reset_local_keys_kernel, _square_kernel
from .chunk_fwd import _v_block, bf16_dots, chunk_states, cov_split, key_dots, launch_staged


def _dstate_launch(K, V, u_dots, q, wkeys):
    """(BV, num_warps, UPDATE_16) of the reverse state sweep. Measured on an H100 with Triton 3.6,
    fp32 U: V blocks of 64 and 4 warps at every K (at K = 256: 5.6 ms against 8.1 with (32, 4)).
    16-bit U (reset's keys, bayes' copy) at K = 256, one process, with Ma dO formed before the
    sweep and 2 stages: (32, 4) 1.52 ms, (64, 8) 2.02–2.04 (its 2 stages do not fit in shared
    memory). At K = 128, (32, 4).
    (32, 8) and (16, 8) returned NaNs there (a Triton 3.6 Hopper miscompilation): avoid them.
    The bf16 update (DSTATE_UPDATE_16) only at K > 128, see there."""
    if u_dots.dtype == torch.float32:
        return _v_block(V, 64), 4, False
    if K > 128:
        return _v_block(V, DSTATE_WIDE_BV), DSTATE_WIDE_WARPS, bf16_dots(DSTATE_UPDATE_16, q, wkeys)
    return _v_block(V, 32), 4, False


# Launch settings (module constants: tools/profile_kernels.py --set tries others): bayes' key-side
# kernels (bayes_keys.py: own terms, covariance sweep, input gradients), by chunk size. Swept on
# an H100 at (8, 4096, 6, 256, 512) and (8, 4096, 8, 128, 128). C = 64: own 7.3 → 6.0 ms at K = 256
# with 8 warps (equal at 128), keys 12.1 / 10.3 ms with 8 (4: 17.1 / 15.6). C = 32 (bayes'
# default): 4 warps, own 1.32 → 0.81 and 1.07 → 0.63 ms, keys 8.47 → 7.74 and 5.10 → 4.68 ms
# against 8. The sweep: 4 warps (C = 64: 9.6 → 8.7 and 2.9 → 2.5 ms against 8; C = 32: 9.25 and
# 2.75 against 11.49 and 3.29).
OWN_WARPS = {16: 8, 32: 4, 64: 8}     # C = 16 untried with 4
KEYS_WARPS = {16: 8, 32: 4, 64: 8}
KEYS_TILE_WARPS = 4   # _keys_fp_kernel, one K column block each
COV_SWEEP_WARPS = 4
# Programs of _cov_sweep_kernel resident on one SM (chunk_fwd.cov_split): 2 at 4 warps let
# (8, 4096, 6, 256, 512) split 4 ways, 5.43 → 5.09 ms on an H100.
COV_SWEEP_PER_SM = 2
COV_SWEEP_STAGES = 1  # software pipelining of the sweep's tile loops (see chunk_fwd.COV_STAGES)
# The sweep's update pass on bf16 tensor cores (chunk_fwd.bf16_dots; 0 = TF32 products). On an
# H100 (one process, `profile_kernels --set`): sweep 4.19 → 3.51 ms at (8, 4096, 6, 256, 512) and
# 1.77 → 1.42 at (8, 4096, 8, 128, 128), fwd+bwd 22.56 → 21.97 and 11.04 → 10.70 ms; gradients
# moved by at most 1.4e-4 relative (dk; dg 2e-5, dbeta 1.1e-4), o, dq and dv not at all.
# What pointed here: a microbenchmark of one part's per-chunk work (the Z/W pass and this update,
# same math, no group barrier; tools/sweep_microbench.py), 128 programs, one per SM, per chunk at
# K = 256 / 128: this kernel's TF32 form 21.6 / 13.8 µs, with bf16 operands 18.0 / 10.4; the same
# in Gluon (Triton 3.6's triton.experimental.gluon) with the part's dP columns resident in shared
# memory 26.6 / 14.2, and with each chunk's [C, K] operands also copied to shared memory at once
# (cp.async) 23.2 / 12.9; the TF32 form at 8 warps 25.7 / 15.8. So dP's round trip to L2 is not
# what a chunk waits on (keeping it on chip, the lever earlier notes proposed, did not help); the
# number and width of the small products' operands are.
COV_SWEEP_UPDATE_16 = 1
# The sweep's Z/W pass on bf16 tensor cores too (dP's tiles rounded to bf16 for Z = U dP). On an
# H100 (same run as COV_WRITES_16's figures): the sweep 3.50 → 3.34 ms at (8, 4096, 6, 256, 512),
# 1.41 → 1.42 at (8, 4096, 8, 128, 128); dk moved 1.2e-4 / 1.4e-4, dbeta 7e-5 / 1.1e-4, the rest
# ≤ 2e-5 (relative). A small gain, at K = 256 only.
COV_SWEEP_Z_16 = 1
# The sweep also forms each chunk's products with its end-covariance adjoint (Z = U D̄, ⟨P, D̄⟩,
# tr D̄), which a chunk-parallel kernel used to form from every chunk's stored dP: on an H100
# fwd+bwd 22.21 → 21.18 ms at (8, 4096, 6, 256, 512) and 10.25 → 9.89 at (8, 4096, 8, 128, 128)
# (sweep 3.80 → 4.21 and 1.60 → 1.77 ms, that kernel's 1.27 and 0.46 gone), and the backward's peak
# 9193 → 7858 MiB and 3348 → 2966 MiB without every chunk's dP. ⟨P, D̄⟩ accumulates elementwise
# over a column block's tiles and is summed once: summing each tile's rows (across warps) took the
# sweep to 4.76 ms at K = 256, its columns to 4.49. The launch rechecked after: 8 warps 4.21 → 6.30
# and 1.77 → 1.92 ms, 2 stages 5.77 and 2.16, one program per SM 5.87 and 1.75.
# Forming chunk i − 1's Z = U dP_i from dP_i's tiles while the sweep writes them (as the forward
# forms the next chunk's K̃ P), instead of a separate pass reading dP_i again, was slower on an
# H100: sweep 3.80 → 3.98 ms at (8, 4096, 6, 256, 512), 1.58 → 1.63 at (8, 4096, 8, 128, 128).
# Nsight Compute (ncu's WarpStateStats and SourceCounters, H100, (8, 4096, 6, 256, 512)) puts the
# sweep's stalls on global loads (long scoreboard, 38% of samples) and on the barriers of
# register-to-shared conversions (21%). Neither fix tried for them moved it: the update pass with
# its row-side operands read transposed from memory (five accumulating products, no register
# transposes) took 4.20 → 4.20 ms at (8, 4096, 6, 256, 512) and 1.76 → 1.74 at (8, 4096, 8, 128,
# 128); with the next row tile's loads issued before the current tile's products as well, 4.26
# and 1.70 (255 registers, 2–4 spilled); either at 8 warps, 6.2–6.4 and 1.9–2.0.
# The chunk-parallel value and reset kernels (chunk_bwd.py). Reset's square and key kernels: on
# an H100 4 warps took them from 1.11 + 1.84 to 1.03 + 1.29 ms at (8, 4096, 6, 256, 512) and from
# 0.62 + 0.81 to 0.60 + 0.55 at (8, 4096, 8, 128, 128) against 8.
LOCAL_DE_WARPS, SQUARE_WARPS, LOCAL_WARPS = 4, 4, 4
RESET_SQUARE_WARPS, RESET_KEYS_WARPS = 4, 4
# The reverse state sweep's V block and warps with 16-bit U at K > 128 (_dstate_launch).
DSTATE_WIDE_BV, DSTATE_WIDE_WARPS = 32, 4
# Software pipelining (chunk_fwd.launch_staged takes 1 stage where shared memory is short). On an
# H100, against 1 stage, outputs and gradients equal to 4e-7: bayes' key kernels with 1 since their
# input-gradient pass became three kernels (2 had helped the single one, 7.74 → 7.32 ms): fwd+bwd
# 12.33 → 12.06 ms at (8, 4096, 8, 128, 128), 26.60 / 26.49 at (8, 4096, 6, 256, 512); the
# reverse state sweep's chunk loop with 2: bayes 2.57 → 1.45
# and 0.65 → 0.52 ms; reset, once Ma dO left the sweep (_local_de_kernel), 0.43 → 0.39 ms at
# K = 128 and, with (32, 4), 2.13 → 1.52 at K = 256.
KEYS_STAGES = 1
DSTATE_STAGES = 2
# The reverse sweep's two transposed products on bf16 tensor cores (chunk_fwd.bf16_dots), at
# K > 128 only: on an H100 at (8, 4096, 6, 256, 512) 3.2–3.5 → 2.4 ms with V blocks of 64 and
# 8 warps. At K = 128 its (32, 4) launch made an illegal memory access (Triton 3.6 on Hopper)
# and (64, 4) / (64, 8) were slower than the fp32 products (0.52 against 0.47 ms).
DSTATE_UPDATE_16 = 1
# The local kernel's products with the bf16 state slots in bf16 (chunk_fwd.bf16_dots): on an
# H100 1.87 → 1.29 ms at K = 256, 0.47 → 0.41 at K = 128, 0.35 → 0.31 at K = 64.
LOCAL_SLOT_DOTS = 1


def _key_block(K):
    """Width of the K blocks the chunk-parallel backward kernels loop over."""
    return min(max(16, triton.next_power_of_2(K)), 64)


def chunk_backward(mode, inputs, S0, P0, plan, cu_seqlens, grads, scale, output_variance, chunk_size,
                   factors, writes=None):
    """inputs: (q, k, v, g, beta, noise) as given to the forward, [B, T, H, ...] contiguous;
    grads: (dO, dvar or None, dS_final or None, dP_final or None); factors and writes: what
    chunk_forward returned for the backward (bayes' packed LDLᵀ factors and write directions
    Ũ, reset's L⁻¹ and None).
    Returns (dq, dk, dv, dg, dbeta, dnoise, dS0, dP0) in the inputs' layouts (dP0 None for reset)."""
    q, k, v, g, beta, noise = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    d_out, d_var, dS_final, dP_final = grads
    d_out = d_out.contiguous()
    mid = chunk_states(mode, q, k, v, g, beta, noise, S0, P0, plan, False, C, factors=factors, writes=writes)
    sums = _value_sums(q, k, v, g, beta, d_out, mid, plan, dS_final, scale, C, reset=mode == "reset")
    dv = sums["dR"].view(B, T, H, V)
    dS0 = sums["dS0"]
    if mode == "reset":
        dq, dk, dg, dbeta = _reset_keys(q, k, g, beta, d_out, mid, sums, plan, scale, C)
        return dq, dk, dv, dg, dbeta, torch.zeros_like(noise), dS0, None
    sums.update(_local_sums(k, d_out, mid, sums, plan, scale, C))
    d_var = d_var if output_variance else None
    dq, dk, dg, dbeta, dnoise, dP0 = _bayes_keys(inputs, mid, sums, plan, d_var, dP_final, scale, C)
    return dq, dk, dv, dg, dbeta, dnoise, dS0, dP0


def _value_sums(q, k, v, g, beta, d_out, mid, plan, dS_final, scale, C, reset):
    """Run the value kernels of chunk_bwd.py. Returns the adjoints (see that module): dR
    [B·T, H, V] in v's dtype (it is dV), dS0 [N, H, K, V] fp32 (of the initial states),
    dh_slots (the adjoints of every chunk's end state, in the h slots' dtype), and Gs, dL
    [B·T, H, C] fp32; reset (`_reset_cc_adjoints`): X, Y + Yᵀ in place of Gs, dL, and the dg and
    dbeta parts [n_kb + 1, B·T, H] fp32 with the chunks' own in the last row."""
    B, T, H, K = q.shape
    V = d_out.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    n_tok, N = B * T, plan.n_docs
    BK = max(16, triton.next_power_of_2(K))
    BKB = _key_block(K)
    BV, dstate_warps, update_16 = _dstate_launch(K, V, mid.u_dots, q, mid.wkeys)
    grid_cc = (plan.n_chunks, H)
    dS_final = torch.zeros(N, H, K, V, **f32) if dS_final is None else dS_final.float().contiguous()
    dE = torch.empty(n_tok, H, V, **f32)
    _local_de_kernel[grid_cc](q, mid.u_dots, g, mid.w, d_out, plan.chunks, plan.cu, dE, scale, H,
                              K=K, V=V, BKB=BKB, BV=_v_block(V, 64), C=C, num_warps=LOCAL_DE_WARPS)
    dh_slots = torch.empty_like(mid.h_slots)
    dS0 = torch.empty(N, H, K, V, **f32)
    launch_staged(
        _dstate_kernel, (triton.cdiv(V, BV), N * H),
        q, g, mid.u_dots, mid.w, mid.wkeys, d_out, dS_final, plan.cu, plan.slot0, dh_slots, dS0, dE, scale, H,
        K=K, V=V, BK=BK, BV=BV, C=C, KEY_DOTS=key_dots(k),
        UPDATE_16=update_16, num_warps=dstate_warps,
        num_stages=DSTATE_STAGES)
    dR = torch.empty(n_tok, H, V, dtype=v.dtype, device=q.device)
    Gs, dL = torch.empty(n_tok, H, C, **f32), torch.empty(n_tok, H, C, **f32)
    n_kb = triton.cdiv(K, BKB)
    parts = [torch.empty(n_kb + 1, B, T, H, **f32) for _ in range(2)] if reset else [dE, dE]
    _square_kernel[grid_cc](mid.e, d_out, dE, mid.linv, plan.chunks, plan.cu, dR, Gs, dL, scale, H,
                            q, k, g, beta, *parts, n_kb * n_tok * H, K=K, V=V, BKB=BKB, BV=_v_block(V, 64),
                            C=C, RESET=reset, num_warps=RESET_SQUARE_WARPS if reset else SQUARE_WARPS)
    sums = dict(Gs=Gs, dL=dL, dR=dR, dh_slots=dh_slots, dS0=dS0)
    if reset:
        sums["dg_part"], sums["dbeta_part"] = parts
    return sums


def _local_sums(k, d_out, mid, sums, plan, scale, C):
    """bayes' C × K local terms (chunk_bwd._local_kernel): dQS, EdS, dKt [B·T, H, K] fp32 and
    dgc [n_chunks, H] (of Γ_C)."""
    n_tok, H, K = k.shape[0] * k.shape[1], k.shape[2], k.shape[3]
    V = d_out.shape[-1]
    f32 = dict(dtype=torch.float32, device=k.device)
    BKB = _key_block(K)
    n_kb = triton.cdiv(K, BKB)
    dQS, EdS, dKt = (torch.empty(n_tok, H, K, **f32) for _ in range(3))
    dgc_blocks = torch.empty(n_kb, plan.n_chunks, H, **f32)
    _local_kernel[(n_kb, plan.n_chunks, H)](
        mid.e, d_out, sums["dR"], mid.h_slots, sums["dh_slots"], plan.chunks, plan.cu, plan.slot0,
        dQS, EdS, dKt, dgc_blocks, scale, H, plan.n_chunks, K=K, V=V, BKB=BKB, BV=_v_block(V, 64), C=C,
        SLOT_DOTS=bf16_dots(LOCAL_SLOT_DOTS, mid.h_slots, k), num_warps=LOCAL_WARPS)
    return dict(dQS=dQS, EdS=EdS, dKt=dKt, dgc=dgc_blocks.sum(0))


def _reset_keys(q, k, g, beta, d_out, mid, sums, plan, scale, C):
    """dq, dk, dg, dbeta of reset: one kernel per K block of every chunk
    (chunk_bwd._reset_local_keys_kernel), then the sums of the dg and dbeta parts."""
    n_tok, H, K = q.shape[0] * q.shape[1], q.shape[2], q.shape[3]
    V = d_out.shape[-1]
    BKB = _key_block(K)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg_part, dbeta_part = sums["dg_part"], sums["dbeta_part"]
    _reset_local_keys_kernel[(triton.cdiv(K, BKB), plan.n_chunks, H)](
        q, k, g, beta, mid.e, d_out, sums["dR"], mid.h_slots, sums["dh_slots"], sums["Gs"], sums["dL"],
        plan.chunks, plan.cu, plan.slot0, dq, dk, dg_part, dbeta_part, scale, H, n_tok,
        K=K, V=V, BKB=BKB, BV=_v_block(V, 64), C=C, SLOT_DOTS=bf16_dots(LOCAL_SLOT_DOTS, mid.h_slots, k),
        num_warps=RESET_KEYS_WARPS)
    return dq, dk, dg_part.sum(0).to(g.dtype), dbeta_part.sum(0).to(beta.dtype)


def _bayes_keys(inputs, mid, sums, plan, d_var, dP_final, scale, C):
    """dq, dk, dg, dbeta, dnoise and dP0 of bayes (bayes_keys.py): each chunk's own terms in its
    start covariance P_i (as rank-2C factors), the covariance sweep dP_i = Φ_iᵀ dP_{i+1} Φ_i + own_i
    over the chunks of every document, which also forms the products of each chunk's end
    covariance adjoint D̄ that the gradients need, then every chunk's input gradients (two
    launches: the C × C algebra, the products with P)."""
    q, k, v, g, beta, noise = inputs
    B, T, H, K = q.shape
    n_tok, N = B * T, plan.n_docs
    f32 = dict(dtype=torch.float32, device=q.device)
    BKB = _key_block(K)
    VAR = d_var is not None
    dvar = d_var.contiguous() if VAR else mid.w              # a placeholder pointer without variance
    grid_cc = (plan.n_chunks, H)
    G, Bf = torch.empty(n_tok, H, K, **f32), torch.empty(n_tok, H, K, **f32)
    launch_staged(_bayes_own_kernel, grid_cc, q, k, g, mid.u, mid.w, mid.linv, mid.l, sums["Gs"], sums["dL"],
                  sums["EdS"], dvar, plan.chunks, plan.cu, G, Bf, scale, H, K=K, BKB=BKB, C=C, VAR=VAR,
                  num_warps=OWN_WARPS[C], num_stages=KEYS_STAGES)
    # dP carried in three buffers per (document, head): the sweep alternates between the first
    # two and writes dP_0 to the third (both start as sym(dP_final): a document may be empty).
    dp_bufs = torch.empty(N, H, 3, K, K, **f32)
    if dP_final is None:
        dp_bufs[:, :, 0] = 0.0
    else:
        dP_final = dP_final.float()
        dp_bufs[:, :, 0] = 0.5 * (dP_final + dP_final.transpose(-1, -2))
    dp_bufs[:, :, 2] = dp_bufs[:, :, 0]
    n_kb = triton.cdiv(K, BKB)
    Zs = torch.empty(n_tok, H, K, **f32)
    pd, tr = torch.empty(2, n_kb, plan.n_chunks, H, **f32)
    NS = cov_split(K, BKB, N * H, q.device, COV_SWEEP_PER_SM)
    sync = torch.zeros(1 + N * H, dtype=torch.int32, device=q.device)
    shares = torch.empty(N * H * 2 * NS, C, C, **f32) if NS > 1 else pd
    _cov_sweep_kernel[(N * H * NS,)](mid.u, Bf, k, q, g, G, dvar, plan.cu, plan.slot0, mid.p_slots, dp_bufs, Zs,
                                     pd, tr, shares, sync, scale, H, plan.n_chunks * H, K=K, BP=BKB, C=C, VAR=VAR,
                                     NS=NS, UPDATE_16=bf16_dots(COV_SWEEP_UPDATE_16, k),
                                     Z_16=bf16_dots(COV_SWEEP_Z_16, k),
                                     num_warps=COV_SWEEP_WARPS, num_stages=COV_SWEEP_STAGES)
    dP0 = dp_bufs[:, :, 2]
    dq, dk, dbeta, dnoise = torch.empty_like(q), torch.empty_like(k), torch.empty_like(beta), torch.empty_like(noise)
    F, kpart = Bf, G                                          # scratch, free again after the sweep
    Y = torch.empty(n_tok, H, C, **f32)
    dg_parts = torch.empty(n_kb + 1, B, T, H, **f32)          # K blocks' shares, then the chunk's own
    grid_kb = (n_kb, plan.n_chunks, H)
    launch_staged(
        _bayes_keys_kernel, grid_cc,
        q, k, g, beta, noise, mid.u, mid.w, mid.linv, mid.l, sums["Gs"], sums["dL"], sums["dQS"], sums["EdS"],
        sums["dKt"], sums["dgc"], dvar, Zs, pd, tr, plan.chunks, plan.cu, F, kpart, Y, dbeta, dnoise,
        dg_parts[n_kb], scale, H, plan.n_chunks * H,
        K=K, BKB=BKB, C=C, R_MIN=fm.R_MIN, VAR=VAR, num_warps=KEYS_WARPS[C], num_stages=KEYS_STAGES)
    launch_staged(_keys_fp_kernel, grid_kb, q, k, g, noise, mid.u, sums["dQS"], dvar, mid.p_slots, F, kpart, Y,
                  plan.chunks, plan.cu, plan.slot0, dq, dk, dg_parts, scale, H, n_tok * H,
                  K=K, BKB=BKB, C=C, VAR=VAR, num_warps=KEYS_TILE_WARPS, num_stages=KEYS_STAGES)
    return dq, dk, dg_parts.sum(0).to(g.dtype), dbeta, dnoise, dP0
