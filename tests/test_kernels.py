"""The Triton kernels on CPU, in Triton's interpreter, against the float64 token-by-token filter.

The kernel cases run in one subprocess under TRITON_INTERPRET=1 (tests/interpreter.py says
why), which prints the measured errors as JSON; the tests below read them. Argument checks run
in-process: they raise before any kernel is launched.
"""

import os
import sys

import pytest
import torch

from titan_bayes.ops import bayes_filter

sys.path.insert(0, os.path.dirname(__file__))
from filter_inputs import make_inputs, random_covariance  # noqa: E402
from interpreter import cases_of, check_case, print_case_results, run_interpreted  # noqa: E402

FP32_TOL = 1e-5      # fp32 kernels vs the float64 filter: round-off only
BF16_TOL = 1e-2      # bf16 inputs and outputs (8 mantissa bits), same rounded inputs on both sides
FP16_TOL = 5e-3      # fp16 (11-bit significands, unit round-off 4.9e-4) operands and outputs: ~10 round-offs


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(mode, inputs, *, dtype=torch.float32, grads=True, cu_seqlens=None, initial_state=None,
             process_noise=None, chunk_size=16, output_variance=True):
    """Errors of backend="triton" (inputs cast to dtype) against backend="sequential" in float64,
    forward and the gradients of one random linear functional of all outputs."""
    extra = [x for x in (initial_state if isinstance(initial_state, tuple) else (initial_state,))
             if x is not None] + ([process_noise] if process_noise is not None else [])
    gen = torch.Generator().manual_seed(11)
    results = {}
    for backend, dt in (("triton", dtype), ("sequential", torch.float64)):
        xs = [x.detach().to(dtype).to(dt).requires_grad_(grads) for x in inputs]  # same rounded values
        ex = [x.detach().to(torch.float32 if dt != torch.float64 else dt).requires_grad_(grads) for x in extra]
        it = iter(ex)
        init = None
        if isinstance(initial_state, tuple):
            init = tuple(next(it) if x is not None else None for x in initial_state)
        elif initial_state is not None:
            init = next(it)
        noise = next(it) if process_noise is not None else None
        o, (S, P), *var = bayes_filter(*xs, mode=mode, backend=backend, cu_seqlens=cu_seqlens,
                                       initial_state=init, process_noise=noise, chunk_size=chunk_size,
                                       output_final_state=True, output_variance=output_variance)
        results[backend] = {"o": o, "S": S}
        if output_variance:
            results[backend]["var"] = var[0]
        if P is not None:
            results[backend]["P"] = P
        if grads:
            gen.manual_seed(11)
            loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum()
                       for t in results[backend].values())
            loss.backward()
            names = ["dq", "dk", "dv", "dg", "dbeta"] + [f"dextra{i}" for i in range(len(ex))]
            results[backend].update({n: x.grad for n, x in zip(names, xs + ex)})
    return {name: rel(results["triton"][name], ref) for name, ref in results["sequential"].items()}


def case_bayes_forward_and_gradients():
    return _compare("bayes", make_inputs(B=2, T=45, H=2, K=16, V=32, seed=1)), FP32_TOL


def case_bayes_varlen_initial_state_given_noise():
    inputs = make_inputs(B=1, T=70, H=2, K=16, V=16, seed=2)
    cu = torch.tensor([0, 9, 40, 70])
    S0 = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = 0.1 * torch.rand(1, 70, 2, generator=torch.Generator().manual_seed(4))
    return _compare("bayes", inputs, cu_seqlens=cu, initial_state=(S0, random_covariance(3, 2, 16)),
                    process_noise=noise), FP32_TOL


def case_bayes_strong_decays_chunk_32():
    # Gated DeltaNet's decays reach g ≈ −16 per token: the 1/Γ form would overflow in fp32.
    # dg is then a sum of large cancelling terms: the fp32 chunked PyTorch path measures the
    # same 1.3e-5 relative error on dg here, so this case allows 5e-5 (fp32 conditioning).
    inputs = make_inputs(B=1, T=100, H=2, K=32, V=16, seed=5, decay_scale=8.0)
    return _compare("bayes", inputs, chunk_size=32), 5 * FP32_TOL


def case_bayes_covariance_adjoint_crosses_chunks():
    # Weak decays (Γ_C ≈ 0.9 per chunk, not e^-5 as above) and weak writes: the covariance adjoint
    # carried by the backward's sweep (dP_i = Φ_iᵀ dP_{i+1} Φ_i + own_i) reaches chunks far from the
    # end, so an error in its propagation shows in every chunk's gradients, not only in dP_0.
    inputs = make_inputs(B=1, T=96, H=2, K=32, V=16, seed=19, decay_scale=0.02, beta_range=(0.05, 0.3))
    return _compare("bayes", inputs), FP32_TOL


def case_bayes_chunk_64_full_chunks():
    return _compare("bayes", make_inputs(B=1, T=128, H=1, K=32, V=32, seed=6), chunk_size=64), FP32_TOL


def case_reset_varlen_initial_state():
    inputs = make_inputs(B=1, T=60, H=2, K=16, V=32, seed=7)
    S0 = torch.randn(2, 2, 16, 32, generator=torch.Generator().manual_seed(8))
    return _compare("reset", inputs, cu_seqlens=torch.tensor([0, 23, 60]), initial_state=S0,
                    output_variance=False), FP32_TOL


def case_reset_batch():
    return _compare("reset", make_inputs(B=2, T=50, H=2, K=32, V=16, seed=9), chunk_size=32), FP32_TOL


def case_reset_chunk_64_documents_end_mid_chunk():
    # Full 64-token chunks and a document that ends inside one (its rows past the end belong
    # to the next document).
    inputs = make_inputs(B=1, T=128, H=2, K=32, V=16, seed=10)
    return _compare("reset", inputs, cu_seqlens=torch.tensor([0, 37, 128]), chunk_size=64,
                    output_variance=False), FP32_TOL


def case_bayes_bf16_inputs():
    return _compare("bayes", make_inputs(B=1, T=64, H=2, K=16, V=16, seed=10), dtype=torch.bfloat16,
                    grads=False), BF16_TOL


def case_bayes_fp16_inputs_gradients():
    # 16-bit keys are dot operands in the state sweeps (KEY_DOTS) and bayes keeps a 16-bit copy of
    # U for them (U_COPY): under the interpreter only fp16 takes that path (its bf16 dots are wrong).
    inputs = make_inputs(B=1, T=48, H=2, K=16, V=16, seed=12)
    return _compare("bayes", inputs, dtype=torch.float16, cu_seqlens=torch.tensor([0, 20, 48])), FP16_TOL


def case_final_state_not_rounded_to_16_bits():
    # With 16-bit keys the chunk-boundary state slots are bf16 (unit round-off 3.9e-3), but the
    # returned final state must come from the fp32 loop (9e-7 measured here; 3e-3 when the
    # final state is rounded to bf16 on its way out).
    inputs = make_inputs(B=1, T=48, H=2, K=16, V=16, seed=12)
    errors = _compare("reset", inputs, dtype=torch.float16, grads=False, output_variance=False)
    return {"S": errors["S"]}, 1e-3


def case_bayes_keys_several_key_blocks_varlen_variance():
    # K = 80 > 64: the key-side backward kernels loop over two K blocks (one partial) and over
    # 2 × 2 tiles of P and dP, as at K = 128 / 256; with P0, learned noise, variance and documents.
    inputs = make_inputs(B=1, T=50, H=1, K=80, V=16, seed=15)
    cu = torch.tensor([0, 21, 50])
    noise = 0.1 * torch.rand(1, 50, 1, generator=torch.Generator().manual_seed(16))
    return _compare("bayes", inputs, cu_seqlens=cu, initial_state=(None, random_covariance(2, 1, 80)),
                    process_noise=noise), FP32_TOL


def case_reset_several_key_blocks_varlen():
    # K = 80 > 64: reset's fused local and key kernel runs per K block (two, one partial), and
    # each block's parts of dg and dbeta are summed afterwards; with documents and S0.
    inputs = make_inputs(B=1, T=50, H=2, K=80, V=16, seed=17)
    S0 = torch.randn(2, 2, 80, 16, generator=torch.Generator().manual_seed(18))
    return _compare("reset", inputs, cu_seqlens=torch.tensor([0, 29, 50]), initial_state=S0,
                    chunk_size=32, output_variance=False), FP32_TOL


def case_bayes_odd_head_sizes():
    return _compare("bayes", make_inputs(B=1, T=40, H=1, K=20, V=24, seed=12)), FP32_TOL


def _prefill_then_steps(mode, K, V):
    """Chunked prefill (kernels) of 21 tokens, then 4 decoding steps (step kernel) from its final
    state, against the float64 filter over all 25 tokens."""
    from titan_bayes.kernels.recurrent import bayes_filter_step

    T, steps = 25, 4
    inputs = make_inputs(B=2, T=T, H=2, K=K, V=V, seed=13)
    noise = 0.1 * torch.rand(2, T, 2, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    given = dict(process_noise=noise) if mode == "bayes" else {}
    o64, (S64, P64), var64 = bayes_filter(*inputs, mode=mode, backend="sequential", output_final_state=True,
                                          output_variance=True, **given)
    xs = [x.float() for x in inputs]
    pre = {k: v[:, :T - steps].float() for k, v in given.items()}
    _, (M, P) = bayes_filter(*[x[:, :T - steps] for x in xs], mode=mode, backend="triton", chunk_size=16,
                             output_final_state=True, **pre)
    errors = {}
    for t in range(T - steps, T):
        step_noise = dict(process_noise=noise[:, t].float()) if mode == "bayes" else {}
        o, var = bayes_filter_step(*[x[:, t] for x in xs], (M, P), mode=mode, output_variance=True, **step_noise)
        errors[f"o{t}"] = rel(o, o64[:, t])
        if mode == "bayes":
            errors[f"var{t}"] = rel(var, var64[:, t])
    errors["M"] = rel(M, S64)
    if mode == "bayes":
        errors["P"] = rel(P, P64)
    return errors


def case_step_bayes_continues_prefill():
    return _prefill_then_steps("bayes", K=16, V=32), FP32_TOL


def case_step_reset_continues_prefill_odd_sizes():
    return _prefill_then_steps("reset", K=20, V=24), FP32_TOL


def case_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake kernels (what torch.compile
    traces with) and AOT dispatch of the chunk op in both modes and of the decoding step."""
    import titan_bayes.kernels.ops  # noqa: F401  (registers torch.ops.titan_bayes.*)
    from titan_bayes.kernels.recurrent import filter_step_op

    q, k, v, g, beta = make_inputs(B=2, T=20, H=2, K=16, V=16, dtype=torch.float32, requires_grad=True)
    noise = (-torch.expm1(2 * g)).detach().requires_grad_()
    S0 = torch.zeros(2, 2, 16, 16, requires_grad=True)
    P0 = random_covariance(2, 2, 16, dtype=torch.float32).requires_grad_()
    failures = {}
    for mode, P in (("bayes", P0), ("reset", None)):
        args = (q, k, v, g, beta, noise, S0, P, None, mode, 0.25, mode == "bayes", 16, 2 * 3, True)
        report = torch.library.opcheck(torch.ops.titan_bayes.chunk_fwd.default, args)
        failures.update({f"{mode}:{name}": float(r != "SUCCESS") for name, r in report.items()})
    M = torch.zeros(2, 2, 16, 16)
    P = torch.eye(16).expand(2, 2, 16, 16).contiguous()
    step_args = [x[:, 0].detach() for x in (q, k, v, g, beta, noise)] + [M, P, 0.25, True]
    report = torch.library.opcheck(filter_step_op, tuple(step_args))
    failures.update({f"step:{name}": float(r != "SUCCESS") for name, r in report.items()})
    return failures, 0.0


def case_indefinite_initial_covariance_raises():
    """Unchecked inputs (check_inputs=False) with P0 = −I: the kernels' pivots turn negative and
    the op raises, as the chunked path does, instead of returning garbage."""
    inputs = make_inputs(B=1, T=20, H=1, K=16, V=16, dtype=torch.float32)
    P0 = -torch.eye(16).expand(1, 1, 16, 16)
    raised = {}
    for backend in ("triton", "chunked"):
        try:
            bayes_filter(*inputs, backend=backend, chunk_size=16, initial_state=(None, P0), check_inputs=False)
            raised[backend] = 1.0
        except ValueError as exc:
            raised[backend] = 0.0 if "not positive definite" in str(exc) else 1.0
    return raised, 0.0


def case_indefinite_covariance_raises_in_the_backward():
    """With gradients to come the forward leaves its pivot check to the backward
    (kernels/pivot_check.py): P0 = −I then passes the forward, eager and compiled, and the
    backward raises before any gradient reaches the inputs. Also: a sound forward's check is
    consumed by its backward, so none is left behind."""
    from titan_bayes.kernels.pivot_check import _PENDING

    xs = make_inputs(B=1, T=20, H=1, K=16, V=16, dtype=torch.float32, requires_grad=True)
    indefinite = -torch.eye(16).expand(1, 1, 16, 16)

    def loss(*xs, P0=None):
        o, _ = bayes_filter(*xs, backend="triton", chunk_size=16, initial_state=(None, P0), check_inputs=False)
        return o.square().sum()

    pending_before = len(_PENDING)
    loss(*xs, P0=torch.eye(16).expand(1, 1, 16, 16)).backward()
    failures = {"sound check left behind": float(len(_PENDING) != pending_before)}
    for name, fn in (("eager", loss), ("compiled", torch.compile(loss, fullgraph=True))):
        for x in xs:
            x.grad = None
        try:
            value = fn(*xs, P0=indefinite)
        except ValueError:
            failures[f"{name}: forward raised"] = 1.0
            continue
        try:
            value.backward()
            failures[f"{name}: backward passed"] = 1.0
        except ValueError as exc:
            failures[f"{name}: message"] = 0.0 if "not positive definite" in str(exc) else 1.0
        failures[f"{name}: gradients written"] = float(any(x.grad is not None for x in xs))
    return failures, 0.0


def case_overflowing_write_directions_raise():
    """bf16 inputs with a prior variance of 1e12: the saved write directions P̄k/√s (about 1e6,
    fp16 for 16-bit keys: chunk_fwd.write_dtype) overflow, and the op says so instead of
    returning infinite covariances or blaming positive definiteness."""
    inputs = make_inputs(B=1, T=40, H=1, K=16, V=16, dtype=torch.bfloat16)
    try:
        bayes_filter(*inputs, backend="triton", chunk_size=16, prior_scale=1e12, check_inputs=False)
        return {"raised": 1.0}, 0.0
    except ValueError as exc:
        return {"raised": 0.0 if "overflowed float16" in str(exc) else 1.0}, 0.0


def case_compiled_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a block calling the filter: forward and backward are the
    custom ops, and the gradients match the eager ones."""
    xs = make_inputs(B=2, T=40, H=2, K=16, V=16, dtype=torch.float32, requires_grad=True)

    def block(q, k, v, g, beta):
        o, (S, P) = bayes_filter(q, k, v, g, beta, backend="triton", chunk_size=16, check_inputs=False,
                                 output_final_state=True)
        return (o * o).sum() + S.square().sum() + P.sum()

    torch.compile(block, fullgraph=True)(*xs).backward()
    compiled = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    block(*xs).backward()
    return {f"d{name}": rel(a, x.grad) for name, a, x in zip("qkvgb", compiled, xs)}, FP32_TOL


CASES = cases_of(globals())


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_match_float64_filter(interpreted, name):
    check_case(interpreted[name])


@pytest.mark.parametrize("change,argument", [
    (dict(K=320), "K"), (dict(V=640), "V"), (dict(mode="additive"), "mode"),
    (dict(chunk_size=48), "chunk_size"), (dict(dtype=torch.float64), "q"),
])
def test_unsupported_arguments_raise_value_error(change, argument):
    shape = dict(B=1, T=8, H=1, K=change.get("K", 16), V=change.get("V", 16))
    inputs = make_inputs(**shape, dtype=change.get("dtype", torch.float32))
    with pytest.raises(ValueError, match=argument):
        bayes_filter(*inputs, mode=change.get("mode", "bayes"), backend="triton",
                     chunk_size=change.get("chunk_size", 16))


def test_cpu_tensors_without_interpreter_raise_value_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    with pytest.raises(ValueError, match="CUDA"):
        bayes_filter(*make_inputs(B=1, T=8, H=1, K=16, V=16, dtype=torch.float32), backend="triton")


def test_auto_backend_keeps_cpu_tensors_on_the_chunked_path():
    from titan_bayes.kernels import kernel_supports

    q = torch.zeros(1, 4, 1, 16)
    assert not kernel_supports("bayes", q) and not kernel_supports("additive", q)


def test_kernel_supports_names_the_kernels_limits():
    from titan_bayes.kernels import kernel_supports

    class FakeCuda:  # only the attributes kernel_supports reads
        def __init__(self, last, dtype=torch.bfloat16):
            self.shape, self.dtype, self.is_cuda = (1, 4, 1, last), dtype, True

    q = FakeCuda(128)
    assert kernel_supports("bayes", q, v=FakeCuda(512)) and kernel_supports("reset", q)
    assert not kernel_supports("bayes", q, v=FakeCuda(1024))            # V > 512
    assert not kernel_supports("bayes", FakeCuda(512))                  # K > 256
    assert not kernel_supports("bayes", q, chunk_size=128)
    assert not kernel_supports("bayes", FakeCuda(128, torch.float64))


if __name__ == "__main__":
    print_case_results(CASES)
