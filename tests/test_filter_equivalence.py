"""The chunked filter equals the token-by-token filter (float64), for every option of the op."""

import pytest
import torch
from filter_inputs import make_inputs, random_covariance

from titan_bayes.ops import MODES, bayes_filter

TOL = 1e-10


def run(backend, *args, **kwargs):
    return bayes_filter(*args, backend=backend, output_final_state=True, output_variance=True, **kwargs)


def assert_same(seq, chk, tol=TOL):
    (o1, (S1, P1), var1), (o2, (S2, P2), var2) = seq, chk
    assert (o1 - o2).abs().max().item() <= tol
    assert (S1 - S2).abs().max().item() <= tol
    assert (var1 - var2).abs().max().item() <= tol
    assert (P1 is None) == (P2 is None)
    if P1 is not None:
        assert (P1 - P2).abs().max().item() <= tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_chunked_equals_sequential(mode, chunk_size):
    # T = 37 is a multiple of none of the chunk sizes but 1.
    q, k, v, g, beta = make_inputs(T=37)
    seq = run("sequential", q, k, v, g, beta, mode=mode)
    chk = run("chunked", q, k, v, g, beta, mode=mode, chunk_size=chunk_size)
    assert_same(seq, chk)


@pytest.mark.parametrize("decay_scale", [0.0, 16.0])
def test_no_decay_and_strong_decay(decay_scale):
    # decay_scale 16 reaches Gated DeltaNet's strongest decays (exp(A_log) up to 16): the
    # note's decay-free frame (1/Γ) would overflow here; the stable form must not.
    q, k, v, g, beta = make_inputs(T=70, decay_scale=decay_scale)
    for mode in MODES:
        assert_same(run("sequential", q, k, v, g, beta, mode=mode),
                    run("chunked", q, k, v, g, beta, mode=mode, chunk_size=32))


def test_given_process_noise_and_prior_scale():
    q, k, v, g, beta = make_inputs(T=45)
    noise = 0.3 * torch.rand(g.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kwargs = dict(mode="bayes", process_noise=noise, prior_scale=2.5, scale=0.7)
    assert_same(run("sequential", q, k, v, g, beta, **kwargs),
                run("chunked", q, k, v, g, beta, chunk_size=16, **kwargs))


@pytest.mark.parametrize("mode", MODES)
def test_initial_state(mode):
    q, k, v, g, beta = make_inputs(B=2, T=21, H=2, K=6, V=4)
    S0 = torch.randn(2, 2, 6, 4, dtype=torch.float64)
    P0 = random_covariance(2, 2, 6) if mode == "bayes" else None
    state = (S0, P0)
    assert_same(run("sequential", q, k, v, g, beta, mode=mode, initial_state=state),
                run("chunked", q, k, v, g, beta, mode=mode, initial_state=state, chunk_size=8))


def test_final_state_continues_the_sequence():
    # Running [0, T) in two pieces, the second started from the first's final state, equals one run.
    q, k, v, g, beta = make_inputs(T=40)
    o_full, (S_full, P_full), var_full = run("chunked", q, k, v, g, beta, chunk_size=16)
    cut = 23
    o1, state1, var1 = run("chunked", *(x[:, :cut] for x in (q, k, v, g, beta)), chunk_size=16)
    o2, (S2, P2), var2 = run("chunked", *(x[:, cut:] for x in (q, k, v, g, beta)), chunk_size=16,
                             initial_state=state1)
    assert (torch.cat([o1, o2], 1) - o_full).abs().max() <= TOL
    assert (torch.cat([var1, var2], 1) - var_full).abs().max() <= TOL
    assert (S2 - S_full).abs().max() <= TOL and (P2 - P_full).abs().max() <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_cu_seqlens_equals_separate_documents(mode, backend):
    # Oracle: each document run alone by the sequential filter, from the prior or its own
    # initial state.
    lengths = [5, 17, 1, 30]
    cu = torch.tensor([0, 5, 22, 23, 53])
    q, k, v, g, beta = make_inputs(B=1, T=53, H=2, K=4, V=3)
    S0 = torch.randn(4, 2, 4, 3, dtype=torch.float64)
    P0 = random_covariance(4, 2, 4) if mode == "bayes" else None
    o, (S, P), var = run(backend, q, k, v, g, beta, mode=mode, cu_seqlens=cu, chunk_size=8,
                         initial_state=(S0, P0))
    start = 0
    for n, length in enumerate(lengths):
        doc = [x[:, start:start + length] for x in (q, k, v, g, beta)]
        init = (S0[n:n + 1], None if P0 is None else P0[n:n + 1])
        o_n, (S_n, P_n), var_n = run("sequential", *doc, mode=mode, initial_state=init)
        assert (o[:, start:start + length] - o_n).abs().max() <= TOL
        assert (var[:, start:start + length] - var_n).abs().max() <= TOL
        assert (S[n] - S_n[0]).abs().max() <= TOL
        if P is not None:
            assert (P[n] - P_n[0]).abs().max() <= TOL
        start += length


def test_cu_seqlens_without_initial_state_restarts_from_prior():
    cu = torch.tensor([0, 9, 20])
    q, k, v, g, beta = make_inputs(B=1, T=20, H=1, K=4, V=3)
    o, _, _ = run("chunked", q, k, v, g, beta, cu_seqlens=cu, chunk_size=4, prior_scale=1.7)
    o_second, _, _ = run("sequential", *(x[:, 9:] for x in (q, k, v, g, beta)), prior_scale=1.7)
    assert (o[:, 9:] - o_second).abs().max() <= TOL


def test_variance_and_covariance_outside_bayes():
    q, k, v, g, beta = make_inputs(T=10)
    for mode in ("reset", "additive"):
        o, (S, P), var = run("chunked", q, k, v, g, beta, mode=mode)
        assert P is None
        assert torch.count_nonzero(var) == 0


def test_state_is_none_unless_requested_and_auto_is_chunked_on_cpu():
    q, k, v, g, beta = make_inputs(T=12)
    o, state = bayes_filter(q, k, v, g, beta)
    assert state is None
    o_chunked, _ = bayes_filter(q, k, v, g, beta, backend="chunked")
    assert torch.equal(o, o_chunked)


def test_low_precision_inputs_keep_fp32_state():
    q, k, v, g, beta = make_inputs(T=33, dtype=torch.bfloat16)
    o, (S, P), var = run("chunked", q, k, v, g, beta)
    assert o.dtype == torch.bfloat16 and var.dtype == torch.bfloat16
    assert S.dtype == torch.float32 and P.dtype == torch.float32
    # Against the float64 run of the same (bf16-rounded) inputs.
    o64, _, _ = run("sequential", *(x.double() for x in (q, k, v, g, beta)))
    assert ((o.double() - o64).norm() / o64.norm()).item() < 1e-2


# ---- gradients --------------------------------------------------------------------------------
def _tiny(requires_grad=True, **kw):
    return make_inputs(B=1, T=5, H=1, K=3, V=2, beta_range=(0.3, 0.8), requires_grad=requires_grad, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_chunked(mode):
    q, k, v, g, beta = _tiny()
    S0 = torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    extra = [S0]
    if mode == "bayes":
        noise = (0.2 * torch.rand(1, 5, 1, dtype=torch.float64) + 0.05).requires_grad_()
        P0 = random_covariance(1, 1, 3).requires_grad_()
        extra += [noise, P0]

    def f(q, k, v, g, beta, S0, noise=None, P0=None):
        o, (S, P), var = bayes_filter(q, k, v, g, beta, mode=mode, process_noise=noise,
                                      initial_state=(S0, P0), output_final_state=True,
                                      output_variance=True, backend="chunked", chunk_size=2)
        outs = (o, S, var) if P is None else (o, S, P, var)
        return outs

    assert torch.autograd.gradcheck(f, (q, k, v, g, beta, *extra), eps=1e-6, atol=1e-7)


def test_gradcheck_chunked_cu_seqlens_stationary_noise():
    q, k, v, g, beta = make_inputs(B=1, T=7, H=1, K=3, V=2, beta_range=(0.3, 0.8), requires_grad=True)
    cu = torch.tensor([0, 3, 7])

    def f(q, k, v, g, beta):
        o, (S, P), var = bayes_filter(q, k, v, g, beta, cu_seqlens=cu, output_final_state=True,
                                      output_variance=True, backend="chunked", chunk_size=2)
        return o, S, P, var

    assert torch.autograd.gradcheck(f, (q, k, v, g, beta), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_gradients_equal_sequential_gradients(mode):
    inputs = make_inputs(B=2, T=29, H=2, K=5, V=4, requires_grad=True)
    weights = torch.randn(2, 29, 2, 4, dtype=torch.float64)
    grads = []
    for backend in ("sequential", "chunked"):
        o, (S, P), var = run(backend, *inputs, mode=mode, chunk_size=8)
        loss = (o * weights).sum() + S.square().sum() + var.sum()
        if P is not None:
            loss = loss + P.sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-9
