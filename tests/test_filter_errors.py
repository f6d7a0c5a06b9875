"""Bad input gives a ValueError that names the argument, never a silent wrong answer."""

import pytest
import torch
from filter_inputs import make_inputs, random_covariance

from titan_bayes.ops import bayes_filter


def inputs():
    return make_inputs(B=1, T=8, H=2, K=4, V=3)


def expect_error(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        bayes_filter(*args, **kwargs)


def test_wrong_ranks_and_shapes():
    q, k, v, g, beta = inputs()
    expect_error("q, k must be", q[0], k, v, g, beta)
    expect_error("k must have q's shape", q, k[..., :3], v, g, beta)
    expect_error("v must be", q, k, v[:, :5], g, beta)
    expect_error("g must be", q, k, v, g[:, :5], beta)
    expect_error("beta must be", q, k, v, g, beta[..., None])
    expect_error("process_noise must be", q, k, v, g, beta, process_noise=torch.zeros(3))
    expect_error("q must be a torch.Tensor", q.tolist(), k, v, g, beta)


def test_mixed_devices():
    q, k, v, g, beta = inputs()
    expect_error("one device", q, k, v, g.to("meta"), beta)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan")])
def test_beta_outside_unit_interval(bad):
    q, k, v, g, beta = inputs()
    beta = beta.clone()
    beta[0, 3, 1] = bad
    expect_error("beta must lie in", q, k, v, g, beta)


def test_beta_equal_to_one_is_allowed():
    q, k, v, g, beta = inputs()
    o, _ = bayes_filter(q, k, v, g, torch.ones_like(beta))
    assert torch.isfinite(o).all()


def test_positive_log_decay():
    q, k, v, g, beta = inputs()
    g = g.clone()
    g[0, 2, 0] = 0.01
    expect_error("g is the log decay", q, k, v, g, beta)


def test_negative_process_noise():
    q, k, v, g, beta = inputs()
    expect_error("process_noise must be >= 0", q, k, v, g, beta, process_noise=-torch.ones_like(g))
    expect_error("only applies to mode='bayes'", q, k, v, g, beta, mode="reset", process_noise=torch.ones_like(g))


def test_cu_seqlens_checks():
    q, k, v, g, beta = inputs()
    expect_error("strictly increase", q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5, 3, 8]))
    expect_error("end at T", q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5, 7]))
    expect_error("start at 0", q, k, v, g, beta, cu_seqlens=torch.tensor([1, 5, 8]))
    expect_error("1-D integer tensor", q, k, v, g, beta, cu_seqlens=torch.tensor([0.0, 8.0]))
    q2, k2, v2, g2, beta2 = make_inputs(B=2, T=8, H=2, K=4, V=3)
    expect_error("B must be 1", q2, k2, v2, g2, beta2, cu_seqlens=torch.tensor([0, 4, 8]))


def test_unknown_mode_backend_and_bad_options():
    q, k, v, g, beta = inputs()
    expect_error("mode must be one of", q, k, v, g, beta, mode="kalman")
    expect_error("backend must be one of", q, k, v, g, beta, backend="cuda")
    expect_error("chunk_size must be", q, k, v, g, beta, chunk_size=0)
    expect_error("prior_scale must be", q, k, v, g, beta, prior_scale=0.0)


def test_initial_state_checks():
    q, k, v, g, beta = inputs()
    M = torch.zeros(1, 2, 4, 3, dtype=torch.float64)
    expect_error("initial_state M must be", q, k, v, g, beta, initial_state=torch.zeros(1, 2, 3, 4))
    expect_error("initial_state P must be", q, k, v, g, beta, initial_state=(M, torch.eye(4)))
    not_pd = -random_covariance(1, 2, 4)
    expect_error("positive definite", q, k, v, g, beta, initial_state=(M, not_pd))
    asym = random_covariance(1, 2, 4) + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1)
    expect_error("symmetric", q, k, v, g, beta, initial_state=(M, asym))
    expect_error("only applies to mode='bayes'", q, k, v, g, beta, mode="reset",
                 initial_state=(M, random_covariance(1, 2, 4)))
    expect_error("initial_state must be", q, k, v, g, beta, initial_state=(M,))


def test_indefinite_covariance_inside_a_chunk_is_reported():
    # check_inputs=False lets an indefinite P through; the chunk factorisation must say so
    # instead of returning NaNs.
    q, k, v, g, beta = inputs()
    M = torch.zeros(1, 2, 4, 3, dtype=torch.float64)
    expect_error("not positive definite", q, k, v, g, beta, initial_state=(M, -10 * random_covariance(1, 2, 4)),
                 check_inputs=False, backend="chunked")
