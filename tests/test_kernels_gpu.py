"""The Triton kernels on a CUDA GPU: `pytest -m gpu tests/test_kernels_gpu.py` on a GPU machine.

bf16 inputs against the fp32 chunked PyTorch backend (itself tested against the float64
token-by-token filter in test_filter_equivalence.py), relative RMS error ≤ 0.005 for outputs
and final states and ≤ 0.01 for gradients (fla's tolerances). The interpreter tests
(test_kernels.py) cannot see Triton's Hopper miscompilations: these are the real proof.
"""

import pytest
import torch
import torch.nn.functional as F

from titan_bayes.ops import bayes_filter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (B, T, H, K, V), document count (cu_seqlens) or None: the shapes of the benchmark.
SHAPES = [
    ((8, 4096, 6, 256, 512), None),
    ((8, 4096, 8, 128, 128), None),
    ((16, 2048, 16, 64, 64), None),
    ((4, 8192, 8, 128, 128), None),
    ((1, 32768, 8, 128, 128), 16),
    ((1, 65536, 8, 128, 128), 16),
]
OUT_TOL, GRAD_TOL = 0.005, 0.01


def rel_rms(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gdn_inputs(B, T, H, K, V, seed=0, dtype=torch.bfloat16):
    """Inputs parametrised like a Gated DeltaNet layer (design note §2): unit q and k,
    log decays −softplus(·) (strong ones included), beta in (0.1, 0.9)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    q = F.normalize(randn(B, T, H, K), dim=-1)
    k = F.normalize(randn(B, T, H, K), dim=-1)
    v = randn(B, T, H, V)
    g = -F.softplus(randn(B, T, H) - 1.0)
    beta = 0.1 + 0.8 * torch.rand(B, T, H, generator=gen, device="cuda")
    return [x.to(dtype) for x in (q, k, v, g, beta)]


def documents(T, n_docs, seed=0):
    """cu_seqlens of n_docs documents of uneven lengths (not multiples of the chunk)."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(T - 1, generator=gen)[: n_docs - 1] + 1
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([T])]).cuda()


def run(backend, inputs, mode, cu_seqlens=None, grads=None, **kw):
    """Forward, and the gradients of <o, dO> + <S, dS> + <P, dP> when `grads` is given."""
    leaves = [x.detach().clone().requires_grad_(grads is not None) for x in inputs]
    o, (S, P), *rest = bayes_filter(*leaves, mode=mode, backend=backend, cu_seqlens=cu_seqlens,
                                    output_final_state=True, **kw)
    if grads is None:
        return o, S, P, rest, None
    dO, dS, dP = grads
    loss = (o.float() * dO).sum() + (S * dS).sum() + ((P * dP).sum() if P is not None else 0)
    loss.backward()
    return o, S, P, rest, [x.grad for x in leaves]


def output_adjoints(B, T, N, H, K, V, seed):
    """Random adjoints (dO, dS, dP) of the outputs and the N final states, for `run`."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(B, T, H, V, generator=gen, device="cuda"),
            torch.randn(N, H, K, V, generator=gen, device="cuda"),
            torch.randn(N, H, K, K, generator=gen, device="cuda"))


def exact_writes(monkeypatch, chunk_fwd):
    """Keep bayes' saved write directions in fp32 (chunk_fwd.write_dtype), for the tests that
    compare two launches of the same kernels: with fp16 storage a difference of summation order
    (1e-7) flips the rounding of some directions (5e-4 each), which the backward carries into
    dg at ~1e-3 (measured in Triton's interpreter with fp32 inputs: dg 6.8e-7 → 8.8e-4 against
    the float64 filter). The fp16 storage itself is covered by test_matches_fp32_reference."""
    monkeypatch.setattr(chunk_fwd, "write_dtype", lambda k: torch.float32)


def run_differences(first, second):
    """Relative RMS differences between two `run` results with gradients, by name."""
    (o, S, P, _, d), (o_2, S_2, P_2, _, d_2) = first, second
    return {name: rel_rms(a, b) for name, a, b in
            zip(("o", "S", "P", "dq", "dk", "dv", "dg", "dbeta"), [o, S, P] + d, [o_2, S_2, P_2] + d_2)}


@pytest.mark.parametrize("mode", ["bayes", "reset"])
@pytest.mark.parametrize("shape,n_docs", SHAPES, ids=lambda s: str(s))
def test_matches_fp32_reference(mode, shape, n_docs):
    B, T, H, K, V = shape
    inputs = gdn_inputs(*shape)
    cu = documents(T, n_docs) if n_docs else None
    N = B if cu is None else n_docs
    grads = output_adjoints(B, T, N, H, K, V, seed=1)
    o, S, P, _, d = run("triton", inputs, mode, cu, grads)
    o_ref, S_ref, P_ref, _, d_ref = run("chunked", [x.float() for x in inputs], mode, cu, grads)
    errors = {"o": rel_rms(o, o_ref), "S": rel_rms(S, S_ref)}
    if mode == "bayes":
        errors["P"] = rel_rms(P, P_ref)
    grad_errors = {name: rel_rms(a, b) for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), d, d_ref)}
    print(mode, shape, n_docs, errors, grad_errors)
    assert all(e <= OUT_TOL for e in errors.values()), errors
    assert all(e <= GRAD_TOL for e in grad_errors.values()), grad_errors


@pytest.mark.parametrize("mode", ["bayes", "reset"])
def test_initial_state_variance_and_given_noise(mode):
    B, T, H, K, V = 2, 1000, 4, 128, 64
    inputs = gdn_inputs(B, T, H, K, V, seed=2)
    gen = torch.Generator(device="cuda").manual_seed(3)
    S0 = torch.randn(B, H, K, V, generator=gen, device="cuda")
    A = torch.randn(B, H, K, K, generator=gen, device="cuda") / K ** 0.5
    P0 = A @ A.transpose(-1, -2) + 0.5 * torch.eye(K, device="cuda")
    kw = dict(output_variance=True, initial_state=(S0, P0) if mode == "bayes" else S0)
    if mode == "bayes":
        kw["process_noise"] = 0.05 * torch.rand(B, T, H, generator=gen, device="cuda")
    o, S, P, (var,), _ = run("triton", inputs, mode, **kw)
    o_ref, S_ref, P_ref, (var_ref,), _ = run("chunked", [x.float() for x in inputs], mode, **kw)
    assert rel_rms(o, o_ref) <= OUT_TOL and rel_rms(S, S_ref) <= OUT_TOL
    if mode == "bayes":
        assert rel_rms(P, P_ref) <= OUT_TOL and rel_rms(var, var_ref) <= OUT_TOL
    else:
        assert P is None and bool((var == 0).all())


@pytest.mark.parametrize("K,V", [(128, 64), (256, 128)])
def test_bayes_gradients_with_variance_initial_state_given_noise_and_documents(K, V):
    """Every input gradient of bayes (the key-side kernels' variance, P0 and learned-noise paths)
    for a loss on o, the variance and the final (S, P), with documents."""
    T, H = 1500, 2
    inputs = gdn_inputs(1, T, H, K, V, seed=10)
    cu = documents(T, 3, seed=11)
    gen = torch.Generator(device="cuda").manual_seed(12)
    S0 = torch.randn(3, H, K, V, generator=gen, device="cuda")
    A = torch.randn(3, H, K, K, generator=gen, device="cuda") / K ** 0.5
    P0 = A @ A.transpose(-1, -2) + 0.5 * torch.eye(K, device="cuda")
    noise = 0.05 * torch.rand(1, T, H, generator=gen, device="cuda")
    dO = torch.randn(1, T, H, V, generator=gen, device="cuda")
    dvar = torch.randn(1, T, H, generator=gen, device="cuda")
    dS = torch.randn(3, H, K, V, generator=gen, device="cuda")
    dP = torch.randn(3, H, K, K, generator=gen, device="cuda")

    def grads(backend, xs):
        leaves = [x.detach().clone().requires_grad_() for x in list(xs) + [S0, P0, noise]]
        q, k, v, g, beta, s0, p0, nz = leaves
        o, (S, P), var = bayes_filter(q, k, v, g, beta, mode="bayes", backend=backend, cu_seqlens=cu,
                                      initial_state=(s0, p0), process_noise=nz, output_final_state=True,
                                      output_variance=True)
        loss = (o.float() * dO).sum() + (var.float() * dvar).sum() + (S * dS).sum() + (P * dP).sum()
        loss.backward()
        return [x.grad for x in leaves]

    got = grads("triton", inputs)
    ref = grads("chunked", [x.float() for x in inputs])
    names = ("dq", "dk", "dv", "dg", "dbeta", "dS0", "dP0", "dnoise")
    errors = {n: rel_rms(a, b) for n, a, b in zip(names, got, ref)}
    print(K, V, errors)
    assert all(e <= GRAD_TOL for e in errors.values()), errors


@pytest.mark.parametrize("K,V", [(128, 128), (256, 256)])
def test_bayes_gradients_where_the_covariance_carries_across_chunks(K, V):
    """gdn_inputs' decays average Γ_C ≈ e^-13 over a chunk of 32, so P_{i+1} = Γ_C² P_i + ... and the
    backward's dP_i = Φ_iᵀ dP_{i+1} Φ_i + own_i carry little from chunk to chunk there. Weak
    decays (Γ_C ≈ 0.8) and weak writes make every chunk's gradients, and those of the initial
    state, depend on what the sweeps carry. (On such inputs at K = 128 the fp32 chunked
    reference is within 4e-7 of the float64 filter in every output and gradient, measured on a
    CPU. On an H100, dropping the backward sweep's −Γ_C B_iᵀ Z_j term failed both cases here,
    and also test_matches_fp32_reference at (8, 4096, 6, 256, 512), which Triton's interpreter's
    strong-decay case does not see.)"""
    B, T, H = 2, 2048, 2
    inputs = gdn_inputs(B, T, H, K, V, seed=21)
    inputs[3] = inputs[3] * 0.02
    inputs[4] = inputs[4] * 0.3
    gen = torch.Generator(device="cuda").manual_seed(22)
    S0 = torch.randn(B, H, K, V, generator=gen, device="cuda")
    A = torch.randn(B, H, K, K, generator=gen, device="cuda") / K ** 0.5
    P0 = A @ A.transpose(-1, -2) + 0.5 * torch.eye(K, device="cuda")
    dO, dS, dP = output_adjoints(B, T, B, H, K, V, seed=23)

    def outputs_and_grads(backend, xs):
        leaves = [x.detach().clone().requires_grad_() for x in list(xs) + [S0, P0]]
        q, k, v, g, beta, s0, p0 = leaves
        o, (S, P) = bayes_filter(q, k, v, g, beta, mode="bayes", backend=backend, initial_state=(s0, p0),
                                 output_final_state=True)
        ((o.float() * dO).sum() + (S * dS).sum() + (P * dP).sum()).backward()
        return [o, S, P], [x.grad for x in leaves]

    outs, grads = outputs_and_grads("triton", inputs)
    outs_ref, grads_ref = outputs_and_grads("chunked", [x.float() for x in inputs])
    errors = {n: rel_rms(a, b) for n, a, b in zip(("o", "S", "P"), outs, outs_ref)}
    grad_errors = {n: rel_rms(a, b) for n, a, b in
                   zip(("dq", "dk", "dv", "dg", "dbeta", "dS0", "dP0"), grads, grads_ref)}
    print(K, V, errors, grad_errors)
    assert all(e <= OUT_TOL for e in errors.values()), errors
    assert all(e <= GRAD_TOL for e in grad_errors.values()), grad_errors


@pytest.mark.parametrize("mode", ["bayes", "reset"])
def test_varlen_equals_per_document_runs(mode):
    T, H, K, V = 3000, 4, 64, 64
    inputs = gdn_inputs(1, T, H, K, V, seed=4)
    cu = documents(T, 5, seed=5)
    o, S, P, _, _ = run("triton", inputs, mode, cu)
    bounds = cu.tolist()
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_n, S_n, P_n, _, _ = run("triton", [x[:, a:b] for x in inputs], mode)
        assert rel_rms(o[:, a:b], o_n) <= 1e-5 and rel_rms(S[n], S_n[0]) <= 1e-5
        if mode == "bayes":
            assert rel_rms(P[n], P_n[0]) <= 1e-5


def test_covariance_split_over_programs_matches_one_program(monkeypatch):
    """The covariance sweeps (forward and backward) split over several programs per (document,
    head) (chunk_fwd.cov_split) give what one program per (document, head) gives, up to the order
    in which S and the backward's W are summed, and P stays exactly symmetric."""
    from titan_bayes.kernels import chunk_fwd
    T, H, K, V = 2000, 3, 256, 128
    exact_writes(monkeypatch, chunk_fwd)
    inputs = gdn_inputs(1, T, H, K, V, seed=13)
    cu = documents(T, 2, seed=14)
    assert chunk_fwd.cov_split(K, chunk_fwd.COV_BLOCK, 2 * H, "cuda", chunk_fwd.COV_PER_SM) == 4
    grads = output_adjoints(1, T, 2, H, K, V, seed=15)
    split = run("triton", inputs, "bayes", cu, grads)
    monkeypatch.setattr(chunk_fwd, "COV_SPLIT", 1)
    errors = run_differences(split, run("triton", inputs, "bayes", cu, grads))
    P = split[2]
    assert torch.equal(P, P.transpose(-1, -2))
    print(errors)
    # Summation order alone moves these by ~1e-4 (tf32 products); a lost share or a stale read by O(1).
    assert all(e <= 1e-3 for e in errors.values()), errors


def test_covariance_kernel_warps_do_not_change_results(monkeypatch):
    """cov_launch gives the forward covariance kernel COV_WARPS_ALONE warps where every program has
    an SM to itself (as here) and COV_WARPS elsewhere: both launches compute the same filter."""
    from titan_bayes.kernels import chunk_fwd
    T, H, K, V = 1000, 3, 128, 64
    exact_writes(monkeypatch, chunk_fwd)
    inputs = gdn_inputs(1, T, H, K, V, seed=16)
    cu = documents(T, 2, seed=17)
    assert chunk_fwd.COV_WARPS_ALONE != chunk_fwd.COV_WARPS
    assert chunk_fwd.cov_launch(K, chunk_fwd.COV_BLOCK, 2 * H, "cuda")[1] == chunk_fwd.COV_WARPS_ALONE
    grads = output_adjoints(1, T, 2, H, K, V, seed=18)
    eight = run("triton", inputs, "bayes", cu, grads)
    monkeypatch.setattr(chunk_fwd, "COV_WARPS_ALONE", chunk_fwd.COV_WARPS)
    four = run("triton", inputs, "bayes", cu, grads)
    errors = run_differences(eight, four)
    P_4 = four[2]
    assert torch.equal(P_4, P_4.transpose(-1, -2))
    print(errors)
    # Only the order in which the tile products sum differs, carried through the sweep (as in the
    # split test above: up to ~1e-4 on an H100); a wrong layout or a lost tile moves them by O(1).
    assert all(e <= 1e-3 for e in errors.values()), errors


def covariances_from_writes(writes, g, noise, cu, P0, C):
    """Every chunk's start covariance, float64, from the saved write directions Ũ = diag(√w) U:
    P_{i+1} = Γ_C² P_i + d_C I − Ũ_iᵀ diag(Λ_C·²) Ũ_i per document (the oracle of the forward's
    sweep and of the backward's replay, which both take P from Ũ in TF32 products).
    Returns [the start covariance of every chunk of every document, in plan order, then the
    final ones], each [H, K, K]."""
    H, K = writes.shape[1], writes.shape[2]
    eye = torch.eye(K, dtype=torch.float64, device="cuda")
    starts, finals = [], []
    bounds = cu.tolist()
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        P = P0[n].double()
        for c0 in range(bos, eos, C):
            starts.append(P)
            rows = slice(c0, min(c0 + C, eos))
            lg = g[0, rows].double().cumsum(0)                               # [rows, H]
            weight = torch.exp(2 * (lg[-1] - lg))
            d_C = (weight * noise[0, rows].double()).sum(0)
            U = writes[rows].double()                                        # [rows, H, K]
            P = (torch.exp(2 * lg[-1])[:, None, None] * P + d_C[:, None, None] * eye
                 - torch.einsum("th,thk,thl->hkl", weight, U, U))
        finals.append(P)
    return starts, finals


@pytest.mark.parametrize("K", [256, 128])
def test_forward_and_replay_covariances_follow_the_writes(K):
    """The forward's sweep keeps only its two current covariances and the final one; the
    backward's rerun replays every chunk's P from the saved write directions in parallel over
    P's tiles (chunk_fwd._cov_replay_kernel) and unpacks the saved factors (_unpack_kernel).
    Both must follow the float64 recursion on those directions over documents of uneven
    lengths (chunks that end early), and the rerun must hand the backward kernels the forward's
    factors and write directions unchanged."""
    from titan_bayes.kernels import chunk_fwd
    from titan_bayes.ops import filter_math as fm
    T, H, V = 3000, 3, 64
    q, k, v, g, beta = gdn_inputs(1, T, H, K, V, seed=19)
    cu = documents(T, 3, seed=20)
    plan = chunk_fwd.plan_for(1, T, cu, 32, "cuda")
    noise = fm.stationary_process_noise(g.float())
    S0 = torch.zeros(3, H, K, V, device="cuda")
    P0 = torch.eye(K, device="cuda").expand(3, H, K, K).contiguous()
    fwd = chunk_fwd.chunk_states("bayes", q, k, v, g, beta, noise, S0, P0, plan, False, 32)
    rerun = chunk_fwd.chunk_states("bayes", q, k, v, g, beta, noise, S0, P0, plan, False, 32,
                                   factors=fwd.packed, writes=fwd.writes)
    assert fwd.writes.dtype == torch.float16 and fwd.u is None and fwd.p_slots is None
    starts, finals = covariances_from_writes(fwd.writes, g.float(), noise, cu, P0, 32)
    slots = torch.ones(plan.n_slots, dtype=torch.bool, device="cuda")
    slots[plan.final_slots()] = False
    replayed = rerun.p_slots[slots].double()
    # TF32 products (operands rounded to 2^-11 relative) summed over a chunk's rows, carried across
    # chunks with decay: P is O(1), its errors O(1e-4).
    replay_error = (replayed - torch.stack(starts)).abs().max().item()
    final_error = (fwd.p_final.double() - torch.stack(finals)).abs().max().item()
    replay_final = rerun.p_slots[plan.final_slots()].double()
    replay_final_error = (replay_final - torch.stack(finals)).abs().max().item()
    print(f"K={K}: replay {replay_error:.2e}, forward final {final_error:.2e}, "
          f"replay final {replay_final_error:.2e}")
    assert max(replay_error, final_error, replay_final_error) <= 2e-3
    assert torch.equal(rerun.p_slots, rerun.p_slots.transpose(-1, -2))
    assert torch.equal(fwd.p_final, fwd.p_final.transpose(-1, -2))
    for name in ("w", "linv", "l", "u_dots", "s_final", "e"):
        assert torch.equal(getattr(rerun, name), getattr(fwd, name)), name
    assert torch.equal(rerun.h_slots[slots], fwd.h_slots[slots])  # a document's last h slot stays unwritten
    # U in fp32 is what the forward rounded for the value kernels, before that rounding.
    assert torch.equal(rerun.u.to(fwd.u_dots.dtype), fwd.u_dots)


def test_covariance_stays_positive_definite_over_65536_tokens():
    B, T, H, K, V = 1, 65536, 4, 128, 128
    inputs = gdn_inputs(B, T, H, K, V, seed=6)
    inputs[3] = inputs[3] * 0.01          # weak decay: P keeps shrinking over the whole sequence
    o, S, P, _, _ = run("triton", inputs, "bayes")
    assert torch.isfinite(o).all() and torch.equal(P, P.transpose(-1, -2))
    assert torch.linalg.eigvalsh(P.double()).min().item() > 0
    o_ref, S_ref, P_ref, _, _ = run("chunked", [x.float() for x in inputs], "bayes")
    assert rel_rms(o, o_ref) <= OUT_TOL and rel_rms(P, P_ref) <= OUT_TOL


def test_forward_with_gradients_leaves_the_pivot_check_to_the_backward():
    """With gradients to come, bayes' forward must not wait for the GPU (torch's sync debug mode
    raises on any wait); its pivot check is read in the backward (kernels/pivot_check.py),
    which raises for an indefinite initial covariance. Without gradients the forward raises."""
    B, T, H, K, V = 2, 512, 2, 128, 128
    inputs = gdn_inputs(B, T, H, K, V, seed=8)
    indefinite = -torch.eye(K, device="cuda").expand(B, H, K, K)

    def forward(P0=None):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        o, _ = bayes_filter(*leaves, mode="bayes", backend="triton", initial_state=(None, P0),
                            check_inputs=False)
        return o, leaves

    forward()[0].float().square().sum().backward()       # compile and warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, _ = forward()
        o_bad, leaves = forward(indefinite)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    o.float().square().sum().backward()
    with pytest.raises(ValueError, match="not positive definite"):
        o_bad.float().square().sum().backward()
    assert all(x.grad is None for x in leaves)
    with torch.no_grad(), pytest.raises(ValueError, match="not positive definite"):
        forward(indefinite)


def test_auto_backend_picks_the_kernel_and_compiles_as_one_op():
    inputs = gdn_inputs(2, 256, 2, 64, 64, seed=7)

    def layer(q, k, v, g, beta):
        o, _ = bayes_filter(q, k, v, g, beta, mode="bayes", check_inputs=False)
        return o

    compiled = torch.compile(layer, fullgraph=True)
    eager = layer(*inputs)
    o_ref, *_ = run("triton", inputs, "bayes")
    assert torch.equal(eager, o_ref)
    assert rel_rms(compiled(*inputs), eager) <= 1e-6


@pytest.mark.parametrize("mode", ["bayes", "reset"])
@pytest.mark.parametrize("K,V,H", [(128, 128, 8), (256, 512, 6)])
def test_step_kernel_matches_one_token_filter_at_batch_64(mode, K, V, H):
    from titan_bayes.kernels.recurrent import bayes_filter_step
    from titan_bayes.ops import filter_math as fm

    B = 64
    q, k, v, g, beta = [x[:, 0] for x in gdn_inputs(B, 1, H, K, V, seed=8)]
    gen = torch.Generator(device="cuda").manual_seed(9)
    M = torch.randn(B, H, K, V, generator=gen, device="cuda")
    A = torch.randn(B, H, K, K, generator=gen, device="cuda") / K ** 0.5
    P = (A @ A.transpose(-1, -2) + 0.5 * torch.eye(K, device="cuda")) if mode == "bayes" else None
    noise = fm.stationary_process_noise(g.float()) if mode == "bayes" else torch.zeros_like(g.float())
    M_ref, P_ref, o_ref, var_ref = fm.filter_step(mode, M.clone(), None if P is None else P.clone(), q.float(),
                                                  k.float(), v.float(), g.float().exp(), beta.float(), noise,
                                                  K ** -0.5)
    o, var = bayes_filter_step(q, k, v, g, beta, (M, P), mode=mode, output_variance=True)
    assert rel_rms(o, o_ref) <= OUT_TOL and rel_rms(M, M_ref) <= OUT_TOL
    if mode == "bayes":
        assert rel_rms(P, P_ref) <= OUT_TOL and rel_rms(var, var_ref) <= OUT_TOL
