"""Backward of the chunked filter: Triton kernels for everything that touches values (V),
autograd for the small per-chunk graph of the keys, decays and gains.

1. The forward's first two passes rerun (chunk_fwd.chunk_states) and give the chunk-boundary
   states, the write directions U, gains w, L⁻¹ and innovations E; the forward saves only
   its inputs.
2. chunk_bwd.py: the adjoint of the mean runs backwards over the chunks (`_dstate_kernel`),
   then chunk-parallel kernels form every sum over V: the adjoints dA, dL, dw, dQ_S, dU_S,
   dK̃, dΓ_C of the chunk's key-side quantities (see that module), and dV = dR.
3. Those quantities are functions of (q, k, g, beta) alone for reset, and of (q, k, g, beta,
   process noise, P_i) for bayes: filter_math rebuilds them for all chunks at once under
   autograd and one vector-Jacobian product turns their adjoints into input gradients.
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

from .chunk_bwd import _dstate_kernel, _local_kernel, _square_kernel
from .chunk_fwd import _block_v, chunk_states

FILLS = {"q": 0.0, "k": 0.0, "g": 0.0, "beta": 0.5, "noise": 0.0}   # api._Layout's padding tokens


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
    C, N = chunk_size, plan.n_docs
    bayes = mode == "bayes"
    d_out, d_var, dS_final, dP_final = grads
    mid = chunk_states(mode, q, k, v, g, beta, noise, S0, P0, plan, False, C)
    sums = _value_sums(q, k, g, d_out.contiguous(), mid, plan, dS_final, scale, C)
    dh_slots = sums.pop("dh_slots")
    layout = _Layout(cu_seqlens, T, C)
    n = layout.padded // C

    def chunked(x, fill=0.0):  # token-major [B, T, H, ...] → [N, H, n, C, ...] fp32
        x = layout._pack_one(x.float(), fill)
        return x.reshape(x.shape[0], H, n, C, *x.shape[3:])

    leaves = {name: chunked(x, FILLS[name]).requires_grad_()
              for name, x in (("q", q), ("k", k), ("g", g), ("beta", beta), ("noise", noise))}
    adjoints = {name: chunked(sums[name].view(B, T, H, -1)) for name in ("dA", "dL", "dQS", "dUS", "dKt")}
    adjoints["dw"] = chunked(sums["dw"].view(B, T, H))
    adjoints["dgc"] = sums["dgc"]
    if bayes:
        P_i = _boundary_states(mid.p_slots, plan)[:, :n].transpose(1, 2).contiguous().requires_grad_()   # [N, H, n, K, K]
        if d_var is not None and output_variance:
            adjoints["dvar"] = chunked(d_var.view(B, T, H))
        dP_final = P_i.new_zeros(N, H, K, K) if dP_final is None else dP_final.float()
    with torch.enable_grad():
        outs, adjs, graph = _key_side_graph(mode, leaves, P_i if bayes else None, adjoints, scale)
        wrt = [leaves[name] for name in ("q", "k", "g", "beta")] + ([leaves["noise"]] if bayes else [])
        dP0 = None
        if bayes:
            (own_P,) = torch.autograd.grad(outs, [P_i], adjs, retain_graph=True)
            dP_ends, dP0 = _covariance_sweep(graph, own_P, dP_final)
            outs, adjs = outs + [graph["P_C"]], adjs + [dP_ends]
        got = torch.autograd.grad(outs, wrt, adjs, allow_unused=True)
    got = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(wrt, got)]

    def unchunked(gr, like):
        gr = gr.reshape(gr.shape[0], H, n * C, *gr.shape[4:])
        gr = layout.unpack(gr if gr.dim() == 4 else gr[..., None])
        return (gr if like.dim() == 4 else gr[..., 0]).to(like.dtype).contiguous()

    dq, dk, dg, dbeta = (unchunked(gr, x) for gr, x in zip(got[:4], (q, k, g, beta)))
    dnoise = unchunked(got[4], noise) if bayes else torch.zeros_like(noise)
    dv = sums["dR"].view(B, T, H, V).to(v.dtype)
    dS0 = dh_slots[plan.slot0.long()].contiguous()
    return dq, dk, dv, dg, dbeta, dnoise, dS0, dP0


def _value_sums(q, k, g, d_out, mid, plan, dS_final, scale, C):
    """Run the kernels of chunk_bwd.py. Returns token-major fp32 adjoints (see that module):
    dA, dL [B·T, H, C], dQS, dUS, dKt [B·T, H, K], dw [B·T, H], dR [B·T, H, V] (= dV), dgc
    [N, H, n_max] (per chunk, zero past a document's end) and dh_slots (the state adjoints)."""
    B, T, H, K = q.shape
    V = d_out.shape[-1]
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    n_tok, N = B * T, plan.n_docs
    BK = max(16, triton.next_power_of_2(K))
    BV = _block_v(K, V)
    dS_final = torch.zeros(N, H, K, V, **f32) if dS_final is None else dS_final.float().contiguous()
    dh_slots = torch.empty_like(mid.h_slots)
    dW = torch.empty(n_tok, H, V, **f32)
    dR = torch.empty(n_tok, H, V, **f32)
    _dstate_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, g, mid.u, mid.w, mid.linv, d_out, dS_final, plan.cu, plan.slot0, dh_slots, dW, dR, scale, H,
        K=K, V=V, BK=BK, BV=BV, C=C, num_warps=4, num_stages=1)
    BKB = min(BK, 64)
    n_kb = triton.cdiv(K, BKB)
    dQS, dUS, dKt = (torch.empty(n_tok, H, K, **f32) for _ in range(3))
    dgc_blocks = torch.empty(n_kb, plan.n_chunks, H, **f32)
    BVL = min(64, max(16, triton.next_power_of_2(V)))
    _local_kernel[(n_kb, plan.n_chunks, H)](
        mid.w, mid.e, d_out, dR, mid.h_slots, dh_slots, plan.chunks, plan.cu, plan.slot0,
        dQS, dUS, dKt, dgc_blocks, scale, H, plan.n_chunks, K=K, V=V, BKB=BKB, BV=BVL, C=C, num_warps=4)
    dA, dL = torch.empty(n_tok, H, C, **f32), torch.empty(n_tok, H, C, **f32)
    dw = torch.empty(n_tok, H, **f32)
    _square_kernel[(plan.n_chunks, H)](mid.w, mid.e, d_out, dR, dW, plan.chunks, plan.cu, dA, dL, dw, scale, H,
                                       V=V, BV=BVL, C=C, num_warps=4)
    dgc = torch.zeros(N, plan.max_chunks, H, **f32)
    chunks = plan.chunks.long()
    dgc[chunks[:, 0], chunks[:, 1]] = dgc_blocks.sum(0)
    return dict(dA=dA, dL=dL, dQS=dQS, dUS=dUS, dKt=dKt, dw=dw, dR=dR, dgc=dgc.transpose(1, 2),
                dh_slots=dh_slots)


def _key_side_graph(mode, leaves, P_i, adjoints, scale):
    """Rebuild, for all chunks at once ([N, H, n, C, ...]), every quantity the value sums are
    adjoints of, from the chunked inputs (filter_math: the same formulas as the forward).
    Returns (outputs, their adjoints, the graph's tensors the covariance sweep needs)."""
    q, k, g, beta = (leaves[name] for name in ("q", "k", "g", "beta"))
    log_gamma, decay = fm.chunk_decays(g)
    gamma = log_gamma.exp()
    graph = {}
    if mode == "bayes":
        d = fm.accumulated_noise(decay, leaves["noise"])
        L, w, U, P_C, _ = fm.chunk_covariance(k, P_i, log_gamma, decay, d, fm.observation_noise(beta))
        graph.update(L=L.detach(), w=w.detach(), U=U.detach(), P_C=P_C)
    else:
        L, w, U = fm.delta_rule_system(k, beta, decay), beta, k
    last = decay[..., -1, :]                                       # Λ_C,s
    outs = [(q @ U.transpose(-1, -2)) * decay, L, w, gamma[..., None] * q, last[..., None] * U,
            gamma[..., None] * k, gamma[..., -1]]
    adjs = [adjoints[name] for name in ("dA", "dL", "dw", "dQS", "dUS", "dKt", "dgc")]
    if "dvar" in adjoints:
        outs.append(fm.chunk_variance(q, P_i, log_gamma, decay, d, U, w, scale))
        adjs.append(adjoints["dvar"])
    if mode == "bayes":
        graph.update(gamma=gamma.detach(), last=last.detach(), k=k.detach())
    return outs, adjs, graph


@torch.no_grad()
def _covariance_sweep(graph, own_P, dP_final):
    """dP_i = Φ_iᵀ sym(dP_{i+1}) Φ_i + own_i for i = n−1 … 0, from dP_n = dP_final.

    Φ = Γ_C I − Uᵀ B with B = diag(Λ_C· w) L⁻¹ K̃ [C, K]: a rank-C change of a multiple of I,
    so Φᵀ X Φ costs four [C, K] × [K, K] products instead of two K × K × K ones.
    Returns (the adjoints of every chunk's end covariance [N, H, n, K, K], dP_0)."""
    U, L, gamma = graph["U"], graph["L"], graph["gamma"]
    k_tilde = gamma[..., None] * graph["k"]
    B = (graph["last"] * graph["w"])[..., None] * torch.linalg.solve_triangular(
        L, k_tilde, upper=False, unitriangular=True)
    gamma_C = gamma[..., -1, None, None]
    ends = torch.empty_like(own_P)
    d = dP_final
    for i in reversed(range(own_P.shape[2])):
        ends[:, :, i] = d
        d = 0.5 * (d + d.transpose(-1, -2))            # P is symmetrised: only sym(dP) acts
        U_i, B_i, g_i = U[:, :, i], B[:, :, i], gamma_C[:, :, i]
        right = g_i * d - (d @ U_i.transpose(-1, -2)) @ B_i             # dP Φ
        d = g_i * right - B_i.transpose(-1, -2) @ (U_i @ right) + own_P[:, :, i]
    return ends, d
