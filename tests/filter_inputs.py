"""Random inputs for filter tests, parametrised like a Gated DeltaNet layer (design note §2)."""

import torch
import torch.nn.functional as F


def make_inputs(B=2, T=37, H=3, K=8, V=5, dtype=torch.float64, seed=0, decay_scale=1.0,
                beta_range=(0.1, 0.9), requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = randn(B, T, H, K)
    k = F.normalize(randn(B, T, H, K), dim=-1)            # L2-normalised keys, as in the layer
    v = randn(B, T, H, V)
    # g = −exp(A_log)·softplus(x): log decays ≤ 0, strong for large decay_scale.
    g = -decay_scale * F.softplus(randn(B, T, H) - 1.0)
    lo, hi = beta_range
    beta = lo + (hi - lo) * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    out = [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v, g, beta)]
    return out


def random_covariance(N, H, K, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(N, H, K, K, generator=gen, dtype=torch.float64) / K ** 0.5
    return (A @ A.transpose(-1, -2) + 0.5 * torch.eye(K, dtype=torch.float64)).to(dtype)
