"""Backward of the chunked filter: chunk-local recomputation, all chunks at once, plus two
cheap linear sweeps that carry the state adjoints from chunk to chunk.

The forward kernels keep the belief at every chunk boundary (the state slots). Given its
start state, each chunk is an independent function f_i(S_i, P_i, inputs_i) → (O_i, var_i,
S_{i+1}, P_{i+1}), so all chunks are recomputed in one batched call of the PyTorch chunked
path (titan_bayes.ops.chunk, tested against the float64 token-by-token filter), every chunk
a row of length C, and differentiated by autograd. What couples the chunks is the adjoint of
the carried state, and it obeys two linear recursions with one K × K matrix per chunk, the
chunk's closed-loop transition Φ_i = F_C ⋯ F_1, F_t = a_t (I − u_t k_tᵀ / s_t):
  - the mean map is affine in S_i, S_{i+1} = Φ_i S_i + (terms free of S_i), so
        dS_i = Φ_iᵀ dS_{i+1} + ∂(O_i)/∂S_i · dO_i;
  - with optimal (Kalman) gains the first-order change of the gains drops out of the
    covariance update (d(P̄ − P̄kkᵀP̄/s) = (I − ukᵀ/s) dP̄ (I − ukᵀ/s)ᵀ), so P_{i+1} moves by
    Φ_i dP_i Φ_iᵀ and
        dP_i = Φ_iᵀ dP_{i+1} Φ_i + ∂(O_i, var_i, S_{i+1})/∂P_i · (dO_i, dvar_i, dS_{i+1}).
Φ_i is the chunk's end mean when it starts from S_i = I with zero values. Three VJPs of the
batched recomputation (local terms for S; local terms for P once dS is known; everything once
dP is known) and the two sweeps give the exact gradients. The boundary states come from
a rerun of the forward kernels (ops.py), so the forward saves only its inputs.
"""

from __future__ import annotations

import torch

from titan_bayes.ops.api import _Layout
from titan_bayes.ops.chunk import chunked_filter


def _boundary_states(slots, plan):
    """[n_slots, H, ...] → [N, n_max + 1, H, ...]: chunk i's start state for every document;
    past a document's last chunk (padding) its final state, which padding leaves unchanged."""
    i = torch.arange(plan.max_chunks + 1, device=slots.device)
    index = plan.slot0.long()[:, None] + torch.minimum(i[None, :], plan.per_doc[:, None])
    return slots[index]


class _Rows:
    """[N, H, n·C, ...] (documents, padded to whole chunks) ↔ [N·n, H, C, ...] (one chunk a row)."""

    def __init__(self, N, n, C):
        self.N, self.n, self.C = N, n, C

    def split(self, x):
        N, H = x.shape[:2]
        x = x.reshape(N, H, self.n, self.C, *x.shape[3:]).transpose(1, 2)
        return x.reshape(N * self.n, H, self.C, *x.shape[4:])

    def merge(self, x):
        H = x.shape[1]
        x = x.reshape(self.N, self.n, H, self.C, *x.shape[3:]).transpose(1, 2)
        return x.reshape(self.N, H, self.n * self.C, *x.shape[4:])


def _reverse_sweep(transition, local, final, two_sided):
    """d_i = Φ_iᵀ d_{i+1} (Φ_i if two_sided) + local_i for i = n−1 … 0, d_n = final.

    transition, local: [N, n, H, K, ·]; returns the adjoints d_{i+1} of every chunk's end state."""
    n = transition.shape[1]
    incoming = torch.empty_like(local)
    d = final
    for i in reversed(range(n)):
        incoming[:, i] = d
        Phi_T = transition[:, i].transpose(-1, -2)
        if two_sided:
            d = 0.5 * (d + d.transpose(-1, -2))         # P is symmetrised: only sym(dP) acts
            d = Phi_T @ d @ transition[:, i] + local[:, i]
        else:
            d = Phi_T @ d + local[:, i]
    return incoming


# Documents are independent, so the backward runs over groups of documents whose recomputed
# graphs fit this many bytes (an estimate, see _bytes_per_document): a bound on the transient
# memory of the backward, traded against more, smaller launches.
GROUP_BYTES = 8 * 2**30


def _bytes_per_document(n, H, K, V, C):
    """Rough size of one document's saved graph in the batched recomputation (fp32): about a
    dozen [C, K]/[C, V] tensors, a few [K, V] and [K, K] states and [C, C] chunk matrices per
    chunk and head (measured peak on an H100 is about half of this)."""
    return 4 * n * H * (12 * C * (2 * K + V) + 8 * K * V + 16 * K * K + 20 * C * C)


def chunk_backward(mode, inputs, h_slots, p_slots, cu_seqlens, plan, grads, scale, output_variance, chunk_size):
    """inputs: (q, k, v, g, beta, noise) as given to the forward, [B, T, H, ...];
    grads: (dO, dvar or None, dS_final or None, dP_final or None).
    Returns (dq, dk, dv, dg, dbeta, dnoise, dS0, dP0) in the inputs' layouts (dP0 None for reset)."""
    B, T, H, K = inputs[0].shape
    V = inputs[2].shape[-1]
    C, n, N = chunk_size, plan.max_chunks, plan.n_docs
    bayes = mode == "bayes"
    layout = _Layout(cu_seqlens, T, C)
    packed = layout.pack(*[x.float() for x in inputs])                     # [N, H, n·C, ...]
    d_out, d_var, dS_final, dP_final = grads
    d_out = layout._pack_one(d_out.float(), 0.0)
    with_var = bayes and output_variance and d_var is not None
    d_var = layout._pack_one(d_var.float()[..., None], 0.0)[..., 0] if with_var else None
    S_bounds = _boundary_states(h_slots, plan)                               # [N, n + 1, H, K, V]
    P_bounds = _boundary_states(p_slots, plan) if bayes else None
    dS_final = S_bounds.new_zeros(N, H, K, V) if dS_final is None else dS_final.float()
    if bayes:
        dP_final = P_bounds.new_zeros(N, H, K, K) if dP_final is None else dP_final.float()
    group = max(1, min(N, GROUP_BYTES // _bytes_per_document(n, H, K, V, C)))
    pieces = []
    for lo in range(0, N, group):
        docs = slice(lo, min(N, lo + group))
        pieces.append(_documents_backward(
            mode, [x[docs] for x in packed], d_out[docs], d_var[docs] if with_var else None,
            S_bounds[docs, :n], P_bounds[docs, :n] if bayes else None, dS_final[docs],
            dP_final[docs] if bayes else None, scale, C))
    grads_in = [torch.cat([p[j] for p in pieces]) for j in range(8 if bayes else 7)]
    result = []
    for x, gr in zip(inputs, grads_in[:6]):
        gr = layout.unpack(gr[..., None])[..., 0] if gr.dim() == 3 else layout.unpack(gr)
        result.append(gr.to(x.dtype).contiguous())       # the layout the fake kernel promises
    return (*result, grads_in[6].contiguous(), grads_in[7].contiguous() if bayes else None)


def _documents_backward(mode, packed, d_out, d_var, S_starts, P_starts, dS_final, dP_final, scale, C):
    """The backward of a group of documents, packed [N, H, n·C, ...] with chunk start states
    [N, n, H, ...]. Returns the packed input gradients, dS0 and (bayes) dP0."""
    N, n = S_starts.shape[:2]
    bayes = mode == "bayes"
    rows = _Rows(N, n, C)
    packed = [rows.split(x) for x in packed]
    d_out = rows.split(d_out)
    d_var = rows.split(d_var) if d_var is not None else None
    S_i = S_starts.reshape(N * n, *S_starts.shape[2:]).detach().requires_grad_()
    P_i = P_starts.reshape(N * n, *P_starts.shape[2:]).detach().requires_grad_() if bayes else None
    leaves = [x.detach().requires_grad_() for x in packed]
    with torch.enable_grad():
        o, S_end, P_end, var, _ = chunked_filter(mode, *leaves, S_i, P_i, scale, d_var is not None, C)
    transition = _transition(mode, packed, P_i, scale, C)

    def per_doc(x):  # [N·n, H, ...] → [N, n, H, ...]
        return x.reshape(N, n, *x.shape[1:])

    local_out, local_adj = [o], [d_out]
    if d_var is not None:
        local_out.append(var)
        local_adj.append(d_var)
    # 1. The mean adjoints: local terms, then the sweep over chunks.
    (local_S,) = torch.autograd.grad(local_out, [S_i], local_adj, retain_graph=True, allow_unused=True)
    local_S = torch.zeros_like(S_i) if local_S is None else local_S
    dS_next = _reverse_sweep(per_doc(transition), per_doc(local_S), dS_final, two_sided=False)
    outs, adjs = local_out + [S_end], local_adj + [dS_next.flatten(0, 1)]
    if bayes:
        # 2. The covariance adjoints: local terms (now including dS_{i+1}), then the sweep.
        (local_P,) = torch.autograd.grad(outs, [P_i], adjs, retain_graph=True)
        dP_next = _reverse_sweep(per_doc(transition), per_doc(local_P), dP_final, two_sided=True)
        outs, adjs = outs + [P_end], adjs + [dP_next.flatten(0, 1)]
    # 3. Everything, with every chunk's end-state adjoints known.
    wrt = leaves + [S_i] + ([P_i] if bayes else [])
    got = torch.autograd.grad(outs, wrt, adjs, allow_unused=True)
    got = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(wrt, got)]
    out = [rows.merge(gr) for gr in got[:6]] + [per_doc(got[6])[:, 0]]
    if bayes:
        out.append(per_doc(got[7])[:, 0])
    return out


@torch.no_grad()
def _transition(mode, packed, P_i, scale, C):
    """Φ_i of every chunk: its end mean when started from S = I with zero values."""
    q, k, v, g, beta, noise = packed
    R, H, _, K = k.shape
    eye = torch.eye(K, dtype=k.dtype, device=k.device).expand(R, H, K, K).contiguous()
    zeros = torch.zeros(R, H, C, K, dtype=k.dtype, device=k.device)
    P0 = P_i.detach() if P_i is not None else None
    _, Phi, _, _, _ = chunked_filter(mode, zeros, k, zeros, g, beta, noise, eye, P0, scale, False, C)
    return Phi
