"""Where a fwd+bwd of the filter kernels spends its time, kernel by kernel (one GPU).

    python tools/profile_kernels.py [--shapes targets|all] [--modes bayes reset fla]
                                    [--set NAME=VALUE ...] [--chunk-size C] [--forward] [--resources]

For each shape and mode it runs forward+backward under torch.profiler and prints the CUDA time
per Triton kernel (ms per step, summed over launches), their sum, and the step's wall time timed
as bench_kernels times it (without the profiler): the difference is time the GPU sat idle, waiting
for the host (launches, and anything that makes the host wait for the GPU).
`--set` overrides the kernels' launch constants (module constants of kernels/chunk_fwd.py and
kernels/backward.py, e.g. `--set COV_WARPS=4 OWN_WARPS=8`); every output and gradient is then
compared with a run at the defaults in the same process, so a setting that miscompiles (Triton
3.6 on Hopper returns NaNs for some) shows up as an error instead of a speed-up. Only the two
target shapes by default.
`--resources` prints, per compiled kernel, its registers per thread, spilled registers, shared
memory and warps (spills and one program per SM are what make a kernel slow here).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import SHAPES, fla_gdn, inputs, ours, timed  # noqa: E402


def launch_modules():
    import titan_bayes.kernels.backward as backward
    import titan_bayes.kernels.chunk_fwd as chunk_fwd
    return chunk_fwd, backward


def apply_settings(settings):
    """Set launch constants; returns the previous values."""
    previous = {}
    for name, value in settings.items():
        module = next((m for m in launch_modules() if hasattr(m, name)), None)
        if module is None or not name.isupper():
            raise SystemExit(f"--set {name}: no launch constant of that name in kernels/chunk_fwd.py "
                             "or kernels/backward.py")
        previous[name] = getattr(module, name)
        if isinstance(previous[name], dict):          # a setting per chunk size: set it for all
            value = value if isinstance(value, dict) else dict.fromkeys(previous[name], value)
        setattr(module, name, value)
    return previous


def step_fn(mode, xs, cu, chunk_size, forward_only=False):
    forward = fla_gdn(xs, cu) if mode == "fla" else ours(mode, xs, cu, chunk_size)

    def step():
        if forward_only:
            return [forward()]
        out = forward()
        return [out] + list(torch.autograd.grad(out.float().sum(), xs, allow_unused=True))
    return step


def kernel_times(step, reps=3):
    """ms per step of every CUDA kernel whose name starts with '_' (ours) or contains 'kernel'."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name[:60]] += event.device_time_total / reps / 1000
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def compiled_resources():
    """(kernel name, registers, spills, shared bytes, warps) of every compiled variant of our
    Triton kernels so far (Triton keeps them in each JITFunction's per-device cache)."""
    import triton
    rows = []
    for module in launch_modules() + kernel_modules():
        for name, fn in vars(module).items():
            if not isinstance(fn, triton.runtime.jit.JITFunction) or not hasattr(fn, "device_caches"):
                continue
            for entry in fn.device_caches.values():
                for compiled in entry[0].values():
                    compiled._init_handles()
                    rows.append((name, compiled.n_regs, compiled.n_spills, compiled.metadata.shared,
                                 compiled.metadata.num_warps))
    return sorted(set(rows))


def kernel_modules():
    import titan_bayes.kernels.bayes_keys as bayes_keys
    import titan_bayes.kernels.chunk_bwd as chunk_bwd
    return bayes_keys, chunk_bwd


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="targets", choices=["targets", "all"])
    parser.add_argument("--modes", nargs="+", default=["bayes", "reset"], choices=["bayes", "reset", "fla"])
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="the filter's chunk_size (default: the op's default for each mode)")
    parser.add_argument("--forward", action="store_true", help="time the forward only")
    parser.add_argument("--resources", action="store_true",
                        help="print registers, spills and shared memory of the compiled kernels")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="launch constants to override (integers)")
    args = parser.parse_args()
    settings = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"--set {item}: expected NAME=INTEGER, e.g. COV_WARPS=4")
        settings[name] = int(value)
    apply_settings(apply_settings(settings))      # unknown names fail here, before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, chunk_size {args.chunk_size}, "
          f"settings: {settings or 'defaults'}")
    for B, T, H, K, V, docs in (SHAPES[:2] if args.shapes == "targets" else SHAPES):
        xs, cu = inputs(B, T, H, K, V, docs)
        for mode in args.modes:
            step = step_fn(mode, xs, cu, args.chunk_size, args.forward)
            if mode == "fla" and step is None:
                print("fla-core is not installed")
                continue
            errors = ""
            previous = None
            try:
                if settings and mode != "fla":
                    reference = [t.detach().clone() for t in step()]
                    previous = apply_settings(settings)
                    errors = " ".join(f"{rel(a, b):.1e}" for a, b in zip(step(), reference))
                times = kernel_times(step)
                wall = timed(step)
            except Exception as err:  # e.g. a setting that needs more shared memory than the GPU has
                print(f"({B},{T},{H},{K},{V}{f', {docs} docs' if docs else ''}) {mode}: FAILED "
                      f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
                continue
            finally:
                if previous is not None:
                    apply_settings(previous)
            parts = " ".join(f"{name}={ms:.2f}" for name, ms in times.items() if ms >= 0.01)
            busy = sum(times.values())
            print(f"({B},{T},{H},{K},{V}{f', {docs} docs' if docs else ''}) {mode}: "
                  f"{busy:.2f} ms of kernels, {wall:.2f} ms wall ({wall - busy:.2f} idle) | {parts}",
                  flush=True)
            if errors:
                print(f"    against the defaults [o dq dk dv dg dbeta]: {errors}", flush=True)
        del xs
        torch.cuda.empty_cache()
    if args.resources:
        print("kernel: registers/thread, spilled registers, shared bytes, warps (every compiled variant)")
        for name, regs, spills, shared, warps in compiled_resources():
            print(f"  {name}: {regs} regs, {spills} spills, {shared} B shared, {warps} warps")


if __name__ == "__main__":
    main()
