"""The Triton kernels of the B/D layer's short convolutions and gated norm (kernels/layer.py)
against the plain PyTorch formulas of test_recompute.py in float64.

CPU: the kernels run in Triton's interpreter (a subprocess, see interpreter.py) on fp32 inputs.
GPU (`pytest -m gpu`): the model's autograd Functions on CUDA, which call these kernels, with
bf16 inputs at the 340M layer's widths.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from interpreter import cases_of, check_case, print_case_results, run_interpreted  # noqa: E402
from test_recompute import _doc_starts, plain_gated_rms_norm, plain_rope, plain_short_conv_silu, rope_frequencies  # noqa: E402,E501

from titan_bayes.models.recompute import doc_positions  # noqa: E402

FP32_TOL = 1e-5


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _conv_inputs(B, T, C, W, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    w = 0.5 * torch.randn(C, 1, W, generator=g, dtype=torch.float64)
    dy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return x.to(device), w.to(device), dy.to(device)


def _conv_reference(x, w, dy, starts, norm_dim):
    x, w = x.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    y = plain_short_conv_silu(x, w, starts, norm_dim)
    dx, dw = torch.autograd.grad(y, (x, w), dy.double().cpu())
    return y, dx, dw


def _compare_conv(B, T, C, W, norm_dim, with_docs, seed):
    """Errors of kernels/layer.py's short convolution (fp32) against the float64 formula."""
    from titan_bayes.kernels.layer import short_conv_backward, short_conv_forward

    x, w, dy = _conv_inputs(B, T, C, W, seed)
    starts = _doc_starts(B, T, seed) if with_docs else None
    pos = doc_positions(starts) if with_docs else None
    y = short_conv_forward(x.float(), w.float(), pos, norm_dim)
    dx, dw = short_conv_backward(x.float(), w.float(), pos, norm_dim, dy.float())
    y64, dx64, dw64 = _conv_reference(x, w, dy, starts, norm_dim)
    return {"y": rel(y, y64), "dx": rel(dx, dx64), "dw": rel(dw, dw64)}


def _compare_gated_norm(shape, seed, eps=1e-6):
    from titan_bayes.kernels.layer import gated_norm_backward, gated_norm_forward

    g = torch.Generator().manual_seed(seed)
    o, gate, dy = (torch.randn(*shape, generator=g, dtype=torch.float64) * s for s in (1.0, 2.0, 1.0))
    w = 1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    y, rstd = gated_norm_forward(o.float(), gate.float(), w.float(), eps)
    do, dgate, dw = gated_norm_backward(o.float(), gate.float(), w.float(), rstd, dy.float())
    ref_in = [t.clone().requires_grad_() for t in (o, gate, w)]
    y64 = plain_gated_rms_norm(*ref_in, eps)
    grads = torch.autograd.grad(y64, ref_in, dy)
    return {"y": rel(y, y64), **{n: rel(a, b) for n, a, b in zip(("do", "dgate", "dw"), (do, dgate, dw), grads)}}


def _compare_rope(shape, seed):
    """kernels/layer.py's RoPE (fp32) and its inverse against the float64 formula."""
    from titan_bayes.kernels.layer import rope

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    inv_freq = rope_frequencies(shape[-1])
    return {"y": rel(rope(x.float(), inv_freq.float()), plain_rope(x, inv_freq)),
            "inverse": rel(rope(x.float(), inv_freq.float(), inverse=True), plain_rope(x, -inv_freq))}


def case_conv_rows():
    # T not a multiple of the kernel's token block, C not a multiple of its channel block.
    return _compare_conv(B=2, T=45, C=48, W=4, norm_dim=0, with_docs=False, seed=1), FP32_TOL


def case_conv_documents():
    return _compare_conv(B=2, T=70, C=24, W=4, norm_dim=0, with_docs=True, seed=2), FP32_TOL


def case_conv_l2_norm_documents():
    return _compare_conv(B=2, T=40, C=64, W=4, norm_dim=16, with_docs=True, seed=3), FP32_TOL


def case_conv_l2_norm_width_2():
    return _compare_conv(B=1, T=33, C=96, W=2, norm_dim=32, with_docs=False, seed=4), FP32_TOL


def case_gated_norm():
    return _compare_gated_norm((2, 19, 3, 32), seed=5), FP32_TOL


def case_gated_norm_odd_width():
    return _compare_gated_norm((3, 7, 2, 24), seed=6), FP32_TOL


def case_rope():
    # Rows not a multiple of the kernel's row block; positions up to 36 (angles of many turns).
    return _compare_rope((2, 37, 3, 16), seed=9), FP32_TOL


CASES = cases_of(globals())


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_match_float64_formulas(interpreted, name):
    check_case(interpreted[name])


# ---------------------------------------------------------------------------------------------
# GPU: the model's Functions take the kernels for CUDA tensors (bf16 as in training)

BF16_OUT_TOL, BF16_GRAD_TOL = 0.005, 0.01  # relative RMS, the filter kernels' GPU tolerances


@pytest.mark.gpu
@pytest.mark.parametrize("norm_dim,with_docs", [(0, False), (256, False), (256, True), (0, True)])
def test_gpu_short_conv_bf16(norm_dim, with_docs):
    from titan_bayes.models.recompute import short_conv_silu

    B, T, C, W = 2, 1500, 1536, 4
    x, w, dy = _conv_inputs(B, T, C, W, seed=7, device="cuda")
    x = x.bfloat16()  # the reference sees the same rounded inputs
    starts = _doc_starts(B, T, seed=8).cuda() if with_docs else None
    xs, ws = x.clone().requires_grad_(), w.float().clone().requires_grad_()
    y = short_conv_silu(xs, ws, doc_positions(starts) if with_docs else None, norm_dim)
    y.backward(dy.bfloat16())
    assert y.dtype == torch.bfloat16 and xs.grad.dtype == torch.bfloat16 and ws.grad.dtype == torch.float32
    y64, dx64, dw64 = _conv_reference(x, w.float(), dy.bfloat16(), None if starts is None else starts.cpu(), norm_dim)
    assert rel(y.cpu(), y64) <= BF16_OUT_TOL
    assert rel(xs.grad.cpu(), dx64) <= BF16_GRAD_TOL
    assert rel(ws.grad.cpu(), dw64) <= BF16_GRAD_TOL


@pytest.mark.gpu
def test_gpu_gated_norm_bf16():
    from titan_bayes.models.recompute import gated_rms_norm

    g = torch.Generator().manual_seed(9)
    shape = (2, 1500, 6, 512)
    o, gate, dy = (torch.randn(*shape, generator=g).bfloat16() for _ in range(3))
    w = 1 + 0.3 * torch.randn(512, generator=g)
    ins = [t.cuda().requires_grad_() for t in (o, gate, w)]
    y = gated_rms_norm(*ins, 1e-6)
    y.backward(dy.cuda().to(y.dtype))
    ref_in = [t.double().requires_grad_() for t in (o, gate, w)]
    y64 = plain_gated_rms_norm(*ref_in, 1e-6)
    grads = torch.autograd.grad(y64, ref_in, dy.double())
    assert y.dtype == torch.float32  # bf16 o and gate with an fp32 weight promote, as the formula does
    assert rel(y.cpu(), y64) <= BF16_OUT_TOL
    for t, ref in zip(ins, grads):
        assert rel(t.grad.cpu(), ref) <= BF16_GRAD_TOL


if __name__ == "__main__":
    print_case_results(CASES)


@pytest.mark.gpu
def test_gpu_rope_bf16():
    """The attention layer's RoPE Function on CUDA (the kernel both ways) at the 340M head width."""
    from titan_bayes.models.recompute import rope

    g = torch.Generator().manual_seed(10)
    x, dy = (torch.randn(2, 1500, 16, 64, generator=g, dtype=torch.float64) for _ in range(2))
    x, dy = x.bfloat16(), dy.bfloat16()
    inv_freq = rope_frequencies(64)
    xs = x.cuda().requires_grad_()
    y = rope(xs, inv_freq.float().cuda())
    y.backward(dy.cuda())
    ref_in = x.double().requires_grad_()
    y64 = plain_rope(ref_in, inv_freq)
    (dx64,) = torch.autograd.grad(y64, ref_in, dy.double())
    assert y.dtype == torch.bfloat16 and xs.grad.dtype == torch.bfloat16
    assert rel(y.cpu(), y64) <= BF16_OUT_TOL
    assert rel(xs.grad.cpu(), dx64) <= BF16_GRAD_TOL
