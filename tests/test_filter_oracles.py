"""The three design models against recurrences written by others (fla-core's naive PyTorch code).

fla-core's naive functions compute in float32, so agreement is to float32 precision.
"""

import pytest
import torch
from filter_inputs import make_inputs

from titan_bayes.ops import bayes_filter

# fla-core is a test dependency (pyproject's "test" extra): a missing install fails here.
import fla.ops.gated_delta_rule.naive as fla_gdn  # noqa: E402
import fla.ops.linear_attn.naive as fla_linear  # noqa: E402
import fla.ops.mesa_net.naive as fla_mesa  # noqa: E402
import fla.ops.simple_gla.naive as fla_gla  # noqa: E402

TOL32 = 2e-5  # float32 round-off over ~50 steps on O(1) values


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_reset_is_the_gated_delta_rule(backend):
    q, k, v, g, beta = make_inputs(B=2, T=50, H=3, K=8, V=6)
    S0 = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    o, (S, _) = bayes_filter(q, k, v, g, beta, mode="reset", initial_state=S0, output_final_state=True,
                             backend=backend, chunk_size=16)
    o_ref, S_ref = fla_gdn.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=S0,
                                                            output_final_state=True)
    assert max_err(o, o_ref) < TOL32
    assert max_err(S, S_ref) < TOL32


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_additive_is_simple_gla(backend):
    q, k, v, g, beta = make_inputs(B=2, T=50, H=3, K=8, V=6)
    o, (S, _) = bayes_filter(q, k, v, g, beta, mode="additive", output_final_state=True,
                             backend=backend, chunk_size=16)
    # Simple GLA writes v kᵀ unweighted: fold beta into the values.
    o_ref, S_ref = fla_gla.naive_recurrent_simple_gla(q, k, v * beta[..., None], g, output_final_state=True)
    assert max_err(o, o_ref) < TOL32
    assert max_err(S, S_ref) < TOL32


def test_additive_without_decay_is_linear_attention():
    q, k, v, g, beta = make_inputs(B=1, T=40, H=2, K=8, V=8)
    o, (S, _) = bayes_filter(q, k, v, torch.zeros_like(g), torch.ones_like(beta), mode="additive",
                             output_final_state=True, chunk_size=16)
    o_ref, S_ref = fla_linear.naive_recurrent_linear_attn(q, k, v, output_final_state=True)
    assert max_err(o, o_ref) < 1e-4 * max(1.0, o_ref.abs().max().item())
    assert max_err(S, S_ref) < 1e-4 * max(1.0, S_ref.abs().max().item())


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_bayes_without_decay_or_noise_is_mesanet_exact_solve(backend):
    # Design note §3: a = 1, q = 0, P0 = Λ0⁻¹ gives online ridge regression, which is MesaNet's
    # exact solve with its beta = 1/r and lambda = diag(Λ0) (per head, per channel).
    B, T, H, K = 1, 40, 2, 6
    q, k, v, g, beta = make_inputs(B=B, T=T, H=H, K=K, V=K, beta_range=(0.2, 0.8))
    lamb = 0.5 + torch.rand(H, K, dtype=torch.float64)
    P0 = torch.diag_embed(1.0 / lamb).expand(B, H, K, K)
    zeros = torch.zeros_like(g)
    o, _ = bayes_filter(q, k, v, zeros, beta, mode="bayes", process_noise=zeros,
                        initial_state=(None, P0), scale=1.0, backend=backend, chunk_size=16)
    mesa_beta = beta / (1.0 - beta)
    o_ref, _, _ = fla_mesa.naive_mesa_net_exact(q, k, v, zeros, lamb, mesa_beta)
    assert max_err(o, o_ref) < 1e-4 * max(1.0, o_ref.abs().max().item())
