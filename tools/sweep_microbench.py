"""Microbenchmark of the backward covariance sweep's per-chunk work, one part of a group
(kernels/bayes_keys.py: _cov_sweep_kernel; K rows by BP = 64 columns of dP, C = 32), in forms
that differ only in where dP lives and how wide the product operands are. Same math in each,
independent programs (no group barrier), random operands; every form's dP, Z and ⟨P, dP⟩ are
compared with the first's.

    python tools/sweep_microbench.py K GROUPS      (programs = GROUPS · K / 64; one GPU)

It takes the bf16 rounding of operands from the kernel itself (titan_bayes.kernels, installed by
the README's setup), so the `triton_bf16` form rounds exactly as the sweep does.

Per chunk: the Z/W pass  Z = U dP (stored), PD += ⟨P_i, dP⟩;
           the update    dP = g² dP − g Bᵢᵀ Z_j + (Bᵢᵀ W − g Zᵢᵀ) B_j + ½(K̃ᵢᵀ G_j + Gᵢᵀ K̃_j)
Forms: `triton` (dP in global memory, TF32 products: the kernel before COV_SWEEP_UPDATE_16),
`triton_w8` (8 warps), `triton_bf16` (the update's operands rounded to bf16),
`gluon` (Gluon, Triton 3.6's triton.experimental.gluon: the part's dP resident in shared memory,
mma_v2 TF32), `gluon_staged` (also each chunk's [C, K] operands copied to shared memory at once
with cp.async). Gluon is experimental: this needs Triton 3.6's API.

H100, 128 programs (one per SM), µs per chunk at K = 256 (`256 32`) / K = 128 (`128 64`):
triton 21.6 / 13.8, triton_w8 25.7 / 15.8, triton_bf16 18.0 / 10.4, gluon 26.6 / 14.2,
gluon_staged 23.2 / 12.9 (relative differences to `triton`: bf16 2.6e-3, the Gluon forms 2e-4).
So dP's round trip to L2 is not what a chunk waits on; the operands' width is (the kernel's
update pass took bf16 operands after this: COV_SWEEP_UPDATE_16).
"""
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from titan_bayes.kernels.bayes_keys import _bf16_operand  # noqa: E402  (the sweep's own rounding)


@triton.jit
def upd_triton(u_ptr, p_ptr, b_ptr, zin_ptr, kt_ptr, gf_ptr, w_ptr, dp_ptr, zout_ptr, pd_ptr, n_chunks, g,
               K: tl.constexpr, BP: tl.constexpr, C: tl.constexpr, NPART: tl.constexpr, LOW: tl.constexpr = False):
    pid = tl.program_id(0)
    grp, part = pid // NPART, pid % NPART
    idx = tl.arange(0, C)
    pp = tl.arange(0, BP)
    cols = part * BP + pp
    dp = dp_ptr + pid.to(tl.int64) * K * BP
    PD = tl.zeros([BP, BP], dtype=tl.float32)
    for i in range(n_chunks):
        base = (grp * n_chunks + i).to(tl.int64) * C * K
        pbase = p_ptr + (grp * n_chunks + i).to(tl.int64) * K * K
        # Z pass
        Z = tl.zeros([C, BP], dtype=tl.float32)
        for ib in range(0, K, BP):
            r = ib + pp
            tile = tl.load(dp + r[:, None] * BP + pp[None, :])
            PD += tl.load(pbase + r[:, None] * K + cols[None, :]) * tile
            U_i = tl.load(u_ptr + base + idx[:, None] * K + r[None, :])
            Z += tl.dot(U_i, tile)
        tl.store(zout_ptr + base + idx[:, None] * K + cols[None, :], Z)
        W = tl.load(w_ptr + (grp * n_chunks + i) * C * C + idx[:, None] * C + idx[None, :])
        j_off = base + idx[:, None] * K + cols[None, :]
        B_j = tl.load(b_ptr + j_off)
        Z_j = tl.load(zin_ptr + j_off)
        kt_j = tl.load(kt_ptr + j_off)
        G_j = tl.load(gf_ptr + j_off)
        for ib in range(0, K, BP):
            r = ib + pp
            i_off = base + idx[:, None] * K + r[None, :]
            B_i = tl.load(b_ptr + i_off)
            Z_i = tl.load(zin_ptr + i_off)
            kt_i = tl.load(kt_ptr + i_off)
            G_i = tl.load(gf_ptr + i_off)
            tile = tl.load(dp + r[:, None] * BP + pp[None, :])
            WB_i = tl.dot(tl.trans(_bf16_operand(W, LOW)), _bf16_operand(B_i, LOW)) - g * Z_i
            own = 0.5 * (tl.dot(tl.trans(_bf16_operand(kt_i, LOW)), _bf16_operand(G_j, LOW))
                         + tl.dot(tl.trans(_bf16_operand(G_i, LOW)), _bf16_operand(kt_j, LOW)))
            tile = (g * g * tile - g * tl.dot(tl.trans(_bf16_operand(B_i, LOW)), _bf16_operand(Z_j, LOW))
                    + tl.dot(tl.trans(_bf16_operand(WB_i, LOW)), _bf16_operand(B_j, LOW)) + own)
            tl.store(dp + r[:, None] * BP + pp[None, :], tile)
        tl.debug_barrier()
    tl.store(pd_ptr + pid, tl.sum(tl.sum(PD, 1), 0))


# Layouts of the Gluon forms (4 warps): the MMA accumulators of the [BP, ·] tiles and of Z [C, BP],
# their operands, register layouts contiguous along dim 1 (row) or dim 0 (col), shared buffers
# (swizzled for dP, plain for the staged operands).
mma = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8]))
opA = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=mma, k_width=1))
opB = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=mma, k_width=1))
mmaZ = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 2], instr_shape=[16, 8]))
row = gl.constexpr(gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0]))
col = gl.constexpr(gl.BlockedLayout([4, 1], [8, 4], [1, 4], [0, 1]))
shl = gl.constexpr(gl.SwizzledSharedLayout(2, 1, 8, [1, 0]))
opl = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))


@gluon.jit
def _tload(ptr, base, ld: gl.constexpr, R: gl.constexpr, CC: gl.constexpr, layout: gl.constexpr):
    """[R, CC] tile at base with row stride ld, in layout."""
    r = gl.arange(0, R, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, CC, layout=gl.SliceLayout(0, layout))
    return gl.load(ptr + base + r[:, None] * ld + c[None, :])


@gluon.jit
def _tload_t(ptr, base, ld: gl.constexpr, R: gl.constexpr, CC: gl.constexpr, layout: gl.constexpr):
    """Transposed: [R, CC] tile whose element (r, c) is at base + c * ld + r."""
    r = gl.arange(0, R, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, CC, layout=gl.SliceLayout(0, layout))
    return gl.load(ptr + base + c[None, :] * ld + r[:, None])


@gluon.jit
def _z_pass(u_ptr, p_ptr, zout_ptr, dP, PD, base, pbase, part, K: gl.constexpr, BP: gl.constexpr,
            C: gl.constexpr, mma: gl.constexpr, mmaZ: gl.constexpr, row: gl.constexpr):
    """Z = U dP for this part's columns (stored), and PD += ⟨P_i, dP⟩ by rows, from dP in shared memory."""
    opAZ: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mmaZ, k_width=1)
    opBZ: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mmaZ, k_width=1)
    Z = gl.zeros([C, BP], gl.float32, mmaZ)
    for ib in range(K // BP):
        tile = dP.index(ib).load(mma)
        PD += gl.sum(gl.convert_layout(_tload(p_ptr, pbase + ib * BP * K, K, BP, BP, row), mma) * tile, 1)
        U_i = gl.convert_layout(_tload(u_ptr, base + ib * BP, K, C, BP, row), opAZ)
        Z = mma_v2(U_i, dP.index(ib).load(opBZ), Z, input_precision="tf32")
    zr = gl.arange(0, C, layout=gl.SliceLayout(1, mmaZ))
    zc = gl.arange(0, BP, layout=gl.SliceLayout(0, mmaZ))
    gl.store(zout_ptr + base + zr[:, None] * K + part * BP + zc[None, :], Z)
    return PD


@gluon.jit
def _write_back(dp, dP, pd_ptr, PD, BP: gl.constexpr, NB: gl.constexpr, mma: gl.constexpr):
    """The part's final dP columns from shared memory to dp, and its ⟨P, dP⟩ sum to pd_ptr."""
    r = gl.arange(0, BP, layout=gl.SliceLayout(1, mma))
    c = gl.arange(0, BP, layout=gl.SliceLayout(0, mma))
    for t in gl.static_range(NB):
        gl.store(dp + t * BP * BP + r[:, None] * BP + c[None, :], dP.index(t).load(mma))
    gl.store(pd_ptr, gl.sum(PD, 0))


@gluon.jit
def upd_gluon(u_ptr, p_ptr, b_ptr, zin_ptr, kt_ptr, gf_ptr, w_ptr, dp_ptr, zout_ptr, pd_ptr, n_chunks, g,
              K: gl.constexpr, BP: gl.constexpr, C: gl.constexpr, NPART: gl.constexpr):
    pid = gl.program_id(0)
    grp = pid // NPART
    part = pid % NPART
    NB: gl.constexpr = K // BP
    dP = gl.allocate_shared_memory(gl.float32, [NB, BP, BP], shl)
    j_s = gl.allocate_shared_memory(gl.float32, [4, C, BP], shl)       # B_j, Z_j, K̃_j, G_j
    w_s = gl.allocate_shared_memory(gl.float32, [C, C], shl)
    dp = dp_ptr + pid.to(gl.int64) * K * BP
    for t in gl.static_range(NB):
        dP.index(t).store(_tload(dp, t * BP * BP, BP, BP, BP, mma))
    PD = gl.zeros([BP], gl.float32, gl.SliceLayout(1, mma))
    for i in range(n_chunks):
        base = (grp * n_chunks + i).to(gl.int64) * C * K
        pbase = (grp * n_chunks + i).to(gl.int64) * K * K + part * BP
        PD = _z_pass(u_ptr, p_ptr, zout_ptr, dP, PD, base, pbase, part, K, BP, C, mma, mmaZ, row)
        gl.thread_barrier()                     # last chunk's readers of the j operands are done
        w_s.store(_tload(w_ptr, (grp * n_chunks + i) * C * C, C, C, C, row))
        jb = base + part * BP
        j_s.index(0).store(_tload(b_ptr, jb, K, C, BP, row))
        j_s.index(1).store(_tload(zin_ptr, jb, K, C, BP, row))
        j_s.index(2).store(_tload(kt_ptr, jb, K, C, BP, row))
        j_s.index(3).store(_tload(gf_ptr, jb, K, C, BP, row))
        gl.thread_barrier()
        for ib in range(NB):
            ioff = base + ib * BP
            B_iT = gl.convert_layout(_tload_t(b_ptr, ioff, K, BP, C, col), opA)        # [BP, C]
            Z_iT = gl.convert_layout(_tload_t(zin_ptr, ioff, K, BP, C, col), mma)
            WB_iT = mma_v2(B_iT, w_s.load(opB), -g * Z_iT, input_precision="tf32")  # Bᵢᵀ W − g Zᵢᵀ
            tile = dP.index(ib).load(mma) * (g * g)
            tile = mma_v2(B_iT * (-g), j_s.index(1).load(opB), tile, input_precision="tf32")
            tile = mma_v2(gl.convert_layout(WB_iT, opA), j_s.index(0).load(opB), tile, input_precision="tf32")
            kt_iT = gl.convert_layout(_tload_t(kt_ptr, ioff, K, BP, C, col), opA)
            tile = mma_v2(kt_iT * 0.5, j_s.index(3).load(opB), tile, input_precision="tf32")
            G_iT = gl.convert_layout(_tload_t(gf_ptr, ioff, K, BP, C, col), opA)
            tile = mma_v2(G_iT * 0.5, j_s.index(2).load(opB), tile, input_precision="tf32")
            dP.index(ib).store(tile)
        gl.thread_barrier()
    _write_back(dp, dP, pd_ptr + pid, PD, BP, NB, mma)


@gluon.jit
def upd_gluon_staged(u_ptr, p_ptr, b_ptr, zin_ptr, kt_ptr, gf_ptr, w_ptr, dp_ptr, zout_ptr, pd_ptr, n_chunks, g,
                     K: gl.constexpr, BP: gl.constexpr, C: gl.constexpr, NPART: gl.constexpr):
    """upd_gluon, with each chunk's [C, K] operands B, Z, K̃, G (and W) copied to shared memory
    at once (cp.async, one round trip per chunk instead of one per tile)."""
    pid = gl.program_id(0)
    grp = pid // NPART
    part = pid % NPART
    NB: gl.constexpr = K // BP
    dP = gl.allocate_shared_memory(gl.float32, [NB, BP, BP], shl)
    ops = gl.allocate_shared_memory(gl.float32, [4 * NB, C, BP], opl)    # B, Z, K̃, G by column block
    w_s = gl.allocate_shared_memory(gl.float32, [C, C], opl)
    dp = dp_ptr + pid.to(gl.int64) * K * BP
    for t in gl.static_range(NB):
        dP.index(t).store(_tload(dp, t * BP * BP, BP, BP, BP, mma))
    PD = gl.zeros([BP], gl.float32, gl.SliceLayout(1, mma))
    rr = gl.arange(0, C, layout=gl.SliceLayout(1, row))
    cb = gl.arange(0, BP, layout=gl.SliceLayout(0, row))
    offs = rr[:, None] * K + cb[None, :]
    cw = gl.arange(0, C, layout=gl.SliceLayout(0, row))
    offw = rr[:, None] * C + cw[None, :]
    for i in range(n_chunks):
        base = (grp * n_chunks + i).to(gl.int64) * C * K
        pbase = (grp * n_chunks + i).to(gl.int64) * K * K + part * BP
        gl.thread_barrier()                     # the last chunk's readers of ops are done
        for n in gl.static_range(NB):
            async_copy.async_copy_global_to_shared(ops.index(0 * NB + n), b_ptr + base + n * BP + offs)
            async_copy.async_copy_global_to_shared(ops.index(1 * NB + n), zin_ptr + base + n * BP + offs)
            async_copy.async_copy_global_to_shared(ops.index(2 * NB + n), kt_ptr + base + n * BP + offs)
            async_copy.async_copy_global_to_shared(ops.index(3 * NB + n), gf_ptr + base + n * BP + offs)
        async_copy.async_copy_global_to_shared(w_s, w_ptr + (grp * n_chunks + i) * C * C + offw)
        async_copy.commit_group()
        PD = _z_pass(u_ptr, p_ptr, zout_ptr, dP, PD, base, pbase, part, K, BP, C, mma, mmaZ, row)
        async_copy.wait_group(0)
        gl.thread_barrier()
        B_j = ops.index(0 * NB + part).load(opB)
        for ib in range(NB):
            B_iT = ops.index(0 * NB + ib).permute([1, 0]).load(opA)          # [BP, C]
            Z_iT = ops.index(1 * NB + ib).permute([1, 0]).load(mma)
            WB_iT = mma_v2(B_iT, w_s.load(opB), -g * Z_iT, input_precision="tf32")
            tile = dP.index(ib).load(mma) * (g * g)
            tile = mma_v2(B_iT * (-g), ops.index(1 * NB + part).load(opB), tile, input_precision="tf32")
            tile = mma_v2(gl.convert_layout(WB_iT, opA), B_j, tile, input_precision="tf32")
            kt_iT = ops.index(2 * NB + ib).permute([1, 0]).load(opA)
            tile = mma_v2(kt_iT * 0.5, ops.index(3 * NB + part).load(opB), tile, input_precision="tf32")
            G_iT = ops.index(3 * NB + ib).permute([1, 0]).load(opA)
            tile = mma_v2(G_iT * 0.5, ops.index(2 * NB + part).load(opB), tile, input_precision="tf32")
            dP.index(ib).store(tile)
        gl.thread_barrier()
    _write_back(dp, dP, pd_ptr + pid, PD, BP, NB, mma)


def main():
    torch.manual_seed(0)
    dev = "cuda"
    K, BP, C, NPART, groups, n_chunks = 256, 64, 32, 4, 48, 128
    if len(sys.argv) > 1:
        K, groups = int(sys.argv[1]), int(sys.argv[2])
        NPART = K // BP
    g = 0.9
    rnd = lambda *s: (0.1 * torch.randn(*s, device=dev)).contiguous()
    u = rnd(groups, n_chunks, C, K)
    b, zin, kt, gf = (rnd(groups, n_chunks, C, K) for _ in range(4))
    w = rnd(groups, n_chunks, C, C)
    p = rnd(groups, n_chunks, K, K)
    dp0 = rnd(groups * NPART, K, BP)
    outs = {}
    variants = [("triton", upd_triton, 4, {}), ("triton_w8", upd_triton, 8, {}),
                ("triton_bf16", upd_triton, 4, {"LOW": True}),
                ("gluon", upd_gluon, 4, {}), ("gluon_staged", upd_gluon_staged, 4, {})]
    for name, kern, warps, extra in variants:
        dp = dp0.clone()
        zout = torch.zeros_like(u)
        pd = torch.zeros(groups * NPART, device=dev)
        args = (u, p, b, zin, kt, gf, w, dp, zout, pd, n_chunks, g)
        kern[(groups * NPART,)](*args, K=K, BP=BP, C=C, NPART=NPART, num_warps=warps, **extra)
        torch.cuda.synchronize()
        outs[name] = (dp.clone(), zout.clone(), pd.clone())
        times = []
        for _ in range(5):
            dp.copy_(dp0)
            torch.cuda.synchronize()
            t = time.perf_counter()
            kern[(groups * NPART,)](*args, K=K, BP=BP, C=C, NPART=NPART, num_warps=warps, **extra)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        ms = sorted(times)[2]
        print(f"K={K} {name}: {ms:.3f} ms for {n_chunks} chunks, {1e3 * ms / n_chunks:.2f} us/chunk")
    for other in ("triton_w8", "triton_bf16", "gluon", "gluon_staged"):
        for a, bb, what in zip(outs["triton"], outs[other], ("dP", "Z", "PD")):
            err = ((a - bb).norm() / a.norm()).item()
            print(f"  {what}: rel diff {other} vs triton {err:.2e}")


if __name__ == "__main__":
    main()
