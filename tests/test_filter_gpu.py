"""The PyTorch backends on a CUDA GPU (run with `pytest -m gpu` on a GPU machine)."""

import pytest
import torch
from filter_inputs import make_inputs

from titan_bayes.ops import MODES, bayes_filter

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_on_cuda_matches_float64_cpu(mode, dtype):
    inputs = [x.to(dtype) for x in make_inputs(B=2, T=300, H=4, K=64, V=64, seed=3)]
    o, (S, P), var = bayes_filter(*(x.cuda() for x in inputs), mode=mode, backend="chunked",
                                  output_final_state=True, output_variance=True)
    o64, (S64, P64), var64 = bayes_filter(*(x.double() for x in inputs), mode=mode, backend="sequential",
                                          output_final_state=True, output_variance=True)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16 outputs are rounded to 8 mantissa bits
    assert rel(o, o64) < tol and rel(S, S64) < 1e-4
    if mode == "bayes":
        assert rel(P, P64) < 1e-4 and rel(var, var64) < tol
