"""torch.compile of the model's blocks on a GPU, as the example configs run them
(`[compile] enable = true`, infra/parallelize.apply_compile, inductor).

The blocks call Triton kernels two ways: the filter through registered custom ops (opaque to
inductor) and the layer kernels (short convolutions, gated norm, RoPE) from autograd
Functions, which inductor traces and launches itself. The second way once failed only here:
inductor passes Python floats to user kernels as fp64 scalars. The CPU suite compiles with
aot_eager, which launches nothing itself, so these tests are the proof.
"""

import copy

import pytest
import torch

from titan_bayes.infra.parallelize import apply_compile
from titan_bayes.models.args import BayesModelArgs
from titan_bayes.models.model import BayesLM

pytestmark = pytest.mark.gpu

# Inductor's fused elementwise code rounds differently, and the filter kernels' tf32 / bf16
# dots turn that into differences of their own precision (6e-4 between compiled and eager in
# fp32, 1e-2 under autocast, in a first run). So both are compared with the same model in
# float64 (PyTorch paths, no kernels): compiled may be off by at most RATIO × eager's error.
RATIO = 1.5
FLOOR = 1e-5               # errors this small are rounding, not evidence either way
REFERENCE_SANITY = 0.05     # eager against float64: a broken reference fails here first


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _model():
    args = BayesModelArgs(dim=256, n_layers=3, layout="BDA", n_heads=2, head_k_dim=64, head_v_dim=128,
                          attn_n_heads=4, vocab_size=1000, multiple_of=64, max_seq_len=512)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BayesLM(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    return model


def _batch(B=2, T=512):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 1000, (B, T + 1), generator=g)
    doc_starts = torch.zeros(B, T, dtype=torch.bool)
    doc_starts[:, 0] = True
    doc_starts[0, 200] = doc_starts[1, 77] = doc_starts[1, 300] = True  # documents inside rows
    return tokens[:, :-1].cuda(), tokens[:, 1:].cuda(), doc_starts.cuda()


def _loss_and_grads(model, inputs, labels, doc_starts, autocast):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs, doc_starts)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    # apply_compile wraps each block: its parameters are named ..._orig_mod.... there
    grads = {name.replace("_orig_mod.", ""): p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _errors(grads, loss, grads64, loss64):
    """(loss error, whole-gradient error, worst weight-matrix error) against float64."""
    flat = lambda g: torch.cat([g[name].double().flatten() for name in sorted(g)])  # noqa: E731
    matrices = [name for name in grads64 if grads64[name].dim() >= 2]
    assert len(matrices) >= 20
    return (rel(loss, loss64), rel(flat(grads), flat(grads64)),
            max(rel(grads[name], grads64[name]) for name in matrices))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_compiled_blocks_match_eager(autocast):
    """B, D and A blocks compiled per block (inductor), with documents inside rows, fp32 weights
    (bf16 autocast: what the Trainer runs on one GPU): the loss, the whole gradient and the worst
    weight matrix's gradient are as close to the float64 model as the eager run's are."""
    eager = _model()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, "inductor")
    reference = copy.deepcopy(eager).double()
    batch = _batch()
    loss64, grads64 = _loss_and_grads(reference, *batch, autocast=False)
    loss, grads = _loss_and_grads(eager, *batch, autocast)
    eager_err = _errors(grads, loss, grads64, loss64)
    assert max(eager_err) <= REFERENCE_SANITY, eager_err
    for _ in range(2):  # the second call runs the cached graphs
        loss, grads = _loss_and_grads(compiled, *batch, autocast)
        compiled_err = _errors(grads, loss, grads64, loss64)
        for what, c, e in zip(("loss", "gradient", "worst matrix"), compiled_err, eager_err):
            assert c <= RATIO * e + FLOOR, (what, c, e)
