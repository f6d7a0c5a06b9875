"""Backward of the chunked filter: a reverse sweep over chunks with per-chunk recomputation.

The forward kernels keep the belief at every chunk boundary (the state slots). Going from
the last chunk to the first, each chunk is recomputed from its saved start state by the
PyTorch chunked path (titan_bayes.ops.chunk, itself tested against the float64 token-by-token
filter) and differentiated by autograd, with the incoming adjoints (dO, dS_end, dP_end); the
adjoints of its start state carry to the chunk before. Gradients are exact, only one chunk's
graph is alive at a time, and the saved memory is the boundary states.
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


def chunk_backward(mode, inputs, h_slots, p_slots, cu_seqlens, plan, grads, scale, output_variance, chunk_size):
    """inputs: (q, k, v, g, beta, noise) as given to the forward, [B, T, H, ...];
    grads: (dO, dvar or None, dS_final or None, dP_final or None).
    Returns (dq, dk, dv, dg, dbeta, dnoise, dS0, dP0) in the inputs' layouts (dP0 None for reset)."""
    q = inputs[0]
    B, T, H, K = q.shape
    C = chunk_size
    layout = _Layout(cu_seqlens, T, C)
    packed = layout.pack(*[x.float() for x in inputs])               # [N, H, T', ...]
    d_out, d_var, dS, dP = grads
    d_out = layout._pack_one(d_out.float(), 0.0)
    d_var = layout._pack_one(d_var.float()[..., None], 0.0)[..., 0] if d_var is not None else None
    S_bounds = _boundary_states(h_slots, plan).transpose(1, 2)       # [N, H, n+1, K, V]
    P_bounds = _boundary_states(p_slots, plan).transpose(1, 2) if mode == "bayes" else None
    n_max = plan.max_chunks
    dS = torch.zeros_like(S_bounds[:, :, 0]) if dS is None else dS.float()
    if mode == "bayes":
        dP = torch.zeros_like(P_bounds[:, :, 0]) if dP is None else dP.float()
    pieces = []
    for i in reversed(range(n_max)):
        span = slice(i * C, (i + 1) * C)
        leaves = [x[:, :, span].detach().requires_grad_() for x in packed]
        S_i = S_bounds[:, :, i].detach().requires_grad_()
        P_i = P_bounds[:, :, i].detach().requires_grad_() if mode == "bayes" else None
        with torch.enable_grad():
            o, S, P, var, _ = chunked_filter(mode, *leaves, S_i, P_i, scale, output_variance, C)
        outs, adjoints = [o, S], [d_out[:, :, span], dS]
        if mode == "bayes":
            outs.append(P)
            adjoints.append(dP)
            if d_var is not None:
                outs.append(var)
                adjoints.append(d_var[:, :, span])
        wrt = leaves + [S_i] + ([P_i] if mode == "bayes" else [])
        got = torch.autograd.grad(outs, wrt, adjoints, allow_unused=True)
        got = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(wrt, got)]
        pieces.append(got[:6])
        dS = got[6]
        if mode == "bayes":
            dP = got[7]
    pieces.reverse()
    grads_in = [torch.cat([p[j] for p in pieces], dim=2) for j in range(6)]
    out = []
    for x, gr in zip(inputs, grads_in):
        if gr.dim() == 3:                                            # g, beta, noise [N, H, T']
            gr = layout.unpack(gr[..., None])[..., 0]
        else:
            gr = layout.unpack(gr)
        out.append(gr.to(x.dtype))
    return (*out, dS, dP if mode == "bayes" else None)
