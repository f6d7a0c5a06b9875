"""Token-by-token reference of the filter: the ground truth every other path is tested against.

It loops over time and calls filter_math.filter_step; any dtype works, and float64 inputs
give a float64 run. Inputs arrive in the internal layout of api.py (head-major, batch N).
"""

from __future__ import annotations

import torch

from .filter_math import filter_step


def sequential_filter(mode, q, k, v, g, beta, noise, S0, P0, scale, output_variance):
    """q, k [N, H, T, K]; v [N, H, T, V]; g, beta, noise [N, H, T]; S0 [N, H, K, V];
    P0 [N, H, K, K] or None. Returns (o [N, H, T, V], S, P, variance [N, H, T] or None)."""
    S, P = S0, P0
    outputs, variances = [], []
    a = g.exp()
    for t in range(q.shape[2]):
        S, P, o_t, var_t = filter_step(
            mode, S, P, q[:, :, t], k[:, :, t], v[:, :, t], a[:, :, t], beta[:, :, t],
            noise[:, :, t], scale)
        outputs.append(o_t)
        variances.append(var_t)
    o = torch.stack(outputs, dim=2)
    variance = torch.stack(variances, dim=2) if output_variance else None
    return o, S, P, variance
