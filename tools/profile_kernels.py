"""Where a fwd+bwd of the filter kernels spends its time, kernel by kernel (one GPU).

    python tools/profile_kernels.py [--shapes targets|all] [--modes bayes reset fla]
                                    [--set NAME=VALUE ...]

For each shape and mode it runs forward+backward under torch.profiler and prints the CUDA time
per Triton kernel (ms per step, summed over launches). `--set` overrides the kernels' launch
constants (module constants of kernels/chunk_fwd.py and kernels/backward.py, e.g.
`--set COV_WARPS=4 OWN_WARPS=8`); every output and gradient is then compared with a run at the
defaults in the same process, so a setting that miscompiles (Triton 3.6 on Hopper returns NaNs
for some) shows up as an error instead of a speed-up. Only the two target shapes by default.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import SHAPES, fla_gdn, inputs, ours  # noqa: E402


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
        setattr(module, name, value)
    return previous


def step_fn(mode, xs, cu):
    forward = fla_gdn(xs, cu) if mode == "fla" else ours(mode, xs, cu)

    def step():
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


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="targets", choices=["targets", "all"])
    parser.add_argument("--modes", nargs="+", default=["bayes", "reset"], choices=["bayes", "reset", "fla"])
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
    print(f"device: {torch.cuda.get_device_name()}, settings: {settings or 'defaults'}")
    for B, T, H, K, V, docs in (SHAPES[:2] if args.shapes == "targets" else SHAPES):
        xs, cu = inputs(B, T, H, K, V, docs)
        for mode in args.modes:
            step = step_fn(mode, xs, cu)
            if mode == "fla" and step is None:
                print("fla-core is not installed")
                continue
            errors = ""
            if settings and mode != "fla":
                reference = [t.detach().clone() for t in step()]
                previous = apply_settings(settings)
                errors = " ".join(f"{rel(a, b):.1e}" for a, b in zip(step(), reference))
            times = kernel_times(step)
            if settings and mode != "fla":
                apply_settings(previous)
            parts = " ".join(f"{name}={ms:.2f}" for name, ms in times.items() if ms >= 0.01)
            print(f"({B},{T},{H},{K},{V}{f', {docs} docs' if docs else ''}) {mode}: "
                  f"{sum(times.values()):.2f} ms | {parts}", flush=True)
            if errors:
                print(f"    against the defaults [o dq dk dv dg dbeta]: {errors}", flush=True)
        del xs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
