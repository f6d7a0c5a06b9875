"""Closed-form predictions of design note §7, each computed here independently of the op."""

import math

import pytest
import torch
from filter_inputs import make_inputs

from titan_bayes.ops import bayes_filter
from titan_bayes.ops.filter_math import steady_state_gain


def one_head(keys, values, queries=None, g=0.0, beta=0.9):
    """Tensors [1, T, 1, ·] for a single head from lists of vectors."""
    k = torch.stack(keys)[None, :, None].double()
    v = torch.stack(values)[None, :, None].double()
    q = k.clone() if queries is None else torch.stack(queries)[None, :, None].double()
    T = k.shape[1]
    return q, k, v, torch.full((1, T, 1), g, dtype=torch.float64), torch.full((1, T, 1), beta, dtype=torch.float64)


def scalar_riccati_gains(a2, r, steps):
    """p̄_t = a² p_{t−1} + 1 − a², gain p̄ / (r + p̄), p_t = r p̄ / (r + p̄), from p_0 = 1."""
    gains, p = [], 1.0
    for _ in range(steps):
        p_bar = a2 * p + 1.0 - a2
        gains.append(p_bar / (r + p_bar))
        p = r * p_bar / (r + p_bar)
    return gains


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_repeated_key_gain_follows_scalar_riccati_and_its_floor(backend):
    # One unit key written 60 times with a² = 0.9, r = 0.1, stationary noise; the gain of each
    # write is read off the posterior variance along the key: p_t = r · gain_t (with scale 1).
    a2, r, steps, K = 0.9, 0.1, 60, 4
    e = torch.eye(K, dtype=torch.float64)
    q, k, v, g, beta = one_head([e[0]] * steps, [e[1]] * steps, g=0.5 * math.log(a2), beta=1 / (1 + r))
    _, _, var = bayes_filter(q, k, v, g, beta, scale=1.0, output_variance=True, backend=backend, chunk_size=16)
    measured_gains = (var[0, :, 0] / r).tolist()
    expected = scalar_riccati_gains(a2, r, steps)
    assert max(abs(m - x) for m, x in zip(measured_gains, expected)) < 1e-12
    # The floor quoted by the note (0.60732), reached by the filter and by the quadratic.
    assert abs(measured_gains[-1] - 0.60732) < 5e-6
    assert abs(steady_state_gain(a2, r) - 0.60732) < 5e-6


def test_orthogonal_direction_keeps_unit_variance_and_fresh_key_gets_beta():
    a2, r, K = 0.9, 0.1, 4
    e = torch.eye(K, dtype=torch.float64)
    # 30 writes of e0 read along e1 (the untouched direction), then one write of e1.
    keys = [e[0]] * 30 + [e[1]]
    queries = [e[1]] * 30 + [e[1]]
    q, k, v, g, beta = one_head(keys, [e[2]] * 31, queries=queries, g=0.5 * math.log(a2), beta=1 / (1 + r))
    _, _, var = bayes_filter(q, k, v, g, beta, scale=1.0, output_variance=True, chunk_size=8)
    assert (var[0, :30, 0] - 1.0).abs().max() < 1e-12
    gain_fresh = var[0, 30, 0].item() / r
    assert abs(gain_fresh - 1 / (1 + r)) < 1e-12


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_ridge_identity(backend):
    # a = 1, q = 0: the posterior mean is the ridge solution (Σ v kᵀ/r)(Λ0 + Σ k kᵀ/r)⁻¹ after
    # every prefix; outputs are that mean applied to the query.
    T, K, V, prior = 30, 5, 3, 0.8
    q, k, v, _, beta = make_inputs(B=1, T=T, H=1, K=K, V=V, beta_range=(0.2, 0.9))
    zeros = torch.zeros(1, T, 1, dtype=torch.float64)
    o, (S, _) = bayes_filter(q, k, v, zeros, beta, process_noise=zeros, prior_scale=prior, scale=1.0,
                             output_final_state=True, backend=backend, chunk_size=8)
    r = ((1 - beta) / beta)[0, :, 0]
    k0, v0, q0 = k[0, :, 0], v[0, :, 0], q[0, :, 0]
    for t in range(T):
        precision = torch.eye(K, dtype=torch.float64) / prior + (k0[:t + 1].T / r[:t + 1]) @ k0[:t + 1]
        cross = (v0[:t + 1].T / r[:t + 1]) @ k0[:t + 1]                      # V × K
        M_ridge = torch.linalg.solve(precision, cross.T).T                 # cross · precision⁻¹
        assert (o[0, t, 0] - M_ridge @ q0[t]).abs().max() < 1e-10
    assert (S[0, 0].T - M_ridge).abs().max() < 1e-10


def collision_errors(mode):
    """Note §7: k_B = e1 written 20 times, then k_A = ρ e1 + √(1−ρ²) e2 200 times."""
    rho = 0.92
    e = torch.eye(2, dtype=torch.float64)
    k_B, k_A = e[0], rho * e[0] + math.sqrt(1 - rho * rho) * e[1]
    v_B, v_A = e[0], e[1]
    q, k, v, g, beta = one_head([k_B] * 20 + [k_A] * 200, [v_B] * 20 + [v_A] * 200, g=0.0, beta=0.9)
    noise = torch.zeros_like(g) if mode == "bayes" else None
    _, (S, _) = bayes_filter(q, k, v, g, beta, mode=mode, process_noise=noise, output_final_state=True)
    M = S[0, 0].T
    return (M @ k_B - v_B).norm().item(), (M @ k_A - v_A).norm().item()


def test_collision_bayes_protects_the_first_memory():
    err_B, err_A = collision_errors("bayes")
    # Note §7 measured 0.047 and 0.005 in float64.
    assert err_B < 0.05 and abs(err_B - 0.047) < 5e-4
    assert err_A < 0.01 and abs(err_A - 0.005) < 5e-4


def test_collision_reset_overwrites_the_first_memory():
    err_B, err_A = collision_errors("reset")
    assert abs(err_B - 1.25) < 5e-3  # note §7: B is overwritten
    assert err_A < 1e-12             # the delta rule fits the last key exactly after many writes


def test_collision_additive_floods_the_memory():
    err_B, _ = collision_errors("additive")
    # Additive memory is Σ beta v kᵀ: M k_B − v_B = (20·0.9 − 1) v_B + 200·0.9·ρ v_A.
    expected = math.hypot(20 * 0.9 - 1, 200 * 0.9 * 0.92)
    assert abs(err_B - expected) < 1e-9
    assert err_B > 50
