"""Long sequences: fp32 covariance math with bf16 inputs stays positive definite and accurate."""

import pytest
import torch
from filter_inputs import make_inputs

from titan_bayes.ops import bayes_filter


@pytest.mark.parametrize("memory", ["gated", "ridge"])
def test_65k_tokens_bf16_inputs_match_float64(memory):
    # "gated": Gated DeltaNet-like decays with stationary noise. "ridge": no decay and no
    # process noise, so evidence accumulates over all 65k tokens and P shrinks to ~1e-4: the
    # hardest case for fp32 covariance math.
    T = 65_536
    q, k, v, g, beta = make_inputs(B=1, T=T, H=2, K=16, V=16, seed=7, beta_range=(0.05, 0.95))
    q, k, v, g, beta = (x.to(torch.bfloat16) for x in (q, k, v, g, beta))
    noise = None
    if memory == "ridge":
        g = torch.zeros_like(g)
        noise = torch.zeros_like(g)
    o32, (S32, P32) = bayes_filter(q, k, v, g, beta, process_noise=noise, output_final_state=True,
                                   backend="chunked")
    # Oracle: the same bf16-rounded inputs in float64 (chunked float64 equals the sequential
    # filter to ~1e-15, tests/test_filter_equivalence.py).
    inputs64 = [x.double() for x in (q, k, v, g, beta)]
    o64, (S64, P64) = bayes_filter(*inputs64, process_noise=None if noise is None else noise.double(),
                                   output_final_state=True, backend="chunked")
    assert P32.dtype == torch.float32
    # Symmetric and positive definite at the end (every chunk's Cholesky succeeded, or the op
    # would have raised).
    assert torch.equal(P32, P32.transpose(-1, -2))
    assert torch.linalg.eigvalsh(P32.double()).min().item() > 0
    rel_o = ((o32.double() - o64).norm() / o64.norm()).item()
    rel_S = ((S32.double() - S64).norm() / S64.norm()).item()
    rel_P = ((P32.double() - P64).norm() / P64.norm()).item()
    assert rel_o <= 1e-2 and rel_S <= 1e-2 and rel_P <= 1e-2, (rel_o, rel_S, rel_P)
