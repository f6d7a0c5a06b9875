"""Exact chunk-parallel filter in PyTorch (design note §4), differentiable by autograd.

Inside a chunk everything is matrix products plus one C × C Cholesky factorisation and two
unit-triangular solves (filter_math.chunk_covariance / chunk_innovations / chunk_readout);
across chunks the belief (S, P) is carried in a Python loop. Quantities that do not depend on
the carried belief (decays, accumulated noise, the delta-rule system) are computed for all
chunks at once before the loop.
"""

from __future__ import annotations

import torch

from . import filter_math as fm


def chunked_filter(mode, q, k, v, g, beta, noise, S0, P0, scale, output_variance, chunk_size):
    """Same arguments and returns as naive.sequential_filter, plus the chunk size.

    T must be a multiple of chunk_size (api.py pads with tokens that leave the belief alone).
    Also returns the Cholesky status of every chunk (non-zero: lost positive definiteness).
    """
    N, H, T, _ = q.shape
    C = chunk_size
    n_chunks = T // C

    def split(x):  # [N, H, T, ...] → [N, H, n, C, ...]
        return x.reshape(N, H, n_chunks, C, *x.shape[3:])

    q, k, v, g, beta, noise = map(split, (q, k, v, g, beta, noise))
    log_gamma, decay = fm.chunk_decays(g)
    if mode == "bayes":
        d = fm.accumulated_noise(decay, noise)
        r = fm.observation_noise(beta)
    elif mode == "reset":
        L_all = fm.delta_rule_system(k, beta, decay)

    S, P = S0, P0
    outputs, variances, infos = [], [], []
    for i in range(n_chunks):
        q_i, k_i, v_i = q[:, :, i], k[:, :, i], v[:, :, i]
        lg_i, decay_i = log_gamma[:, :, i], decay[:, :, i]
        if mode == "bayes":
            L, w, U, P_next, info = fm.chunk_covariance(k_i, P, lg_i, decay_i, d[:, :, i], r[:, :, i])
            E = fm.chunk_innovations(L, k_i, v_i, S, lg_i)
            infos.append(info)
            if output_variance:
                variances.append(fm.chunk_variance(q_i, P, lg_i, decay_i, d[:, :, i], U, w, scale))
        elif mode == "reset":
            U, w = k_i, beta[:, :, i]
            E = fm.chunk_innovations(L_all[:, :, i], k_i, v_i, S, lg_i)
        else:  # additive: the "innovation" is the value itself
            U, w, E = k_i, beta[:, :, i], v_i
        O, S = fm.chunk_readout(q_i, S, lg_i, decay_i, U, w, E, scale)
        outputs.append(O)
        if mode == "bayes":
            P = P_next

    o = torch.stack(outputs, dim=2).reshape(N, H, T, -1)
    variance = None
    if output_variance:
        variance = (torch.stack(variances, dim=2).reshape(N, H, T) if variances
                    else q.new_zeros(N, H, T))
    info = torch.stack(infos) if infos else None
    return o, S, P, variance, info
