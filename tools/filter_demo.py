"""A one-minute tour of the filter op: the collision study and the gain floor of design note §7.

    python tools/filter_demo.py

Two keys that overlap (cosine 0.92) are written one after the other: 20 writes of B, then 200
of A. The Bayesian filter protects B (its covariance is small along k_B, so A's writes go to the
uncertain direction); the covariance-reset filter (Gated DeltaNet) overwrites B; the additive
filter (linear attention) floods the memory.
"""

import math

import torch

from titan_bayes.ops import MODES, bayes_filter
from titan_bayes.ops.filter_math import steady_state_gain


def collision_study(rho=0.92, writes_B=20, writes_A=200, beta=0.9):
    e = torch.eye(2, dtype=torch.float64)
    k_B, k_A = e[0], rho * e[0] + math.sqrt(1 - rho * rho) * e[1]
    keys = torch.stack([k_B] * writes_B + [k_A] * writes_A)[None, :, None]
    values = torch.stack([e[0]] * writes_B + [e[1]] * writes_A)[None, :, None]
    T = keys.shape[1]
    g = torch.zeros(1, T, 1, dtype=torch.float64)
    beta_t = torch.full((1, T, 1), beta, dtype=torch.float64)
    print(f"collision study: cos(k_A, k_B) = {rho}, {writes_B} writes of B then {writes_A} of A, beta = {beta}")
    for mode in MODES:
        noise = torch.zeros_like(g) if mode == "bayes" else None
        _, (S, _) = bayes_filter(keys, keys, values, g, beta_t, mode=mode, process_noise=noise,
                                 output_final_state=True)
        M = S[0, 0].T
        err_B, err_A = (M @ k_B - e[0]).norm().item(), (M @ k_A - e[1]).norm().item()
        print(f"  {mode:9s} |M k_B - v_B| = {err_B:9.4f}   |M k_A - v_A| = {err_A:9.4f}")


def gain_floor(a2=0.9, r=0.1, steps=40):
    e = torch.eye(4, dtype=torch.float64)
    k = e[0].expand(1, steps, 1, 4).contiguous()
    v = e[1].expand(1, steps, 1, 4).contiguous()
    g = torch.full((1, steps, 1), 0.5 * math.log(a2), dtype=torch.float64)
    beta = torch.full((1, steps, 1), 1 / (1 + r), dtype=torch.float64)
    _, _, var = bayes_filter(k, k, v, g, beta, scale=1.0, output_variance=True)
    gains = var[0, :, 0] / r  # posterior variance along the key = r · write gain
    print(f"repeated key, a^2 = {a2}, r = {r}: gains {', '.join(f'{x:.4f}' for x in gains[:5].tolist())}, ... "
          f"{gains[-1].item():.5f} (closed-form floor {steady_state_gain(a2, r):.5f})")


if __name__ == "__main__":
    collision_study()
    gain_floor()
