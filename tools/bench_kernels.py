"""Benchmark of the filter kernels (issue 3), all timings from one run on one GPU.

    python tools/bench_kernels.py [--shapes all|small|targets|long] [--no-pytorch] [--out table.md]

For every shape (B, T, H, K, V) it times forward and forward+backward of
  - ours: bayes_filter(mode="bayes") and mode="reset" with backend="triton",
  - fla's chunk_gated_delta_rule (if fla-core is installed; its Hopper guard for Triton
    < 3.7.1 is bypassed for timing only: its gradients there are known to be wrong),
  - our PyTorch chunked path (bayes, forward only: its backward is autograd through a Python loop),
  - SDPA causal attention (head dim K for q, k and v; per document for varlen shapes),
and prints ms, ratios against fla GDN, forward+backward also queued back to back (`queued`:
what a training step sees, where the host launches ahead of the GPU), achieved TFLOP/s by the
design note's FLOP count (§5: GDN ≈ 6·K·V per token and head forward, bayes adds ≈ 6·K²;
forward+backward counted as 3× forward), peak memory of forward+backward, and the memory saved
for backward (allocated after the forward minus before it, outputs included).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from titan_bayes.ops import bayes_filter  # noqa: E402

SHAPES = [  # (B, T, H, K, V, documents)
    (8, 4096, 6, 256, 512, None),
    (8, 4096, 8, 128, 128, None),
    (16, 2048, 16, 64, 64, None),
    (4, 8192, 8, 128, 128, None),
    (1, 32768, 8, 128, 128, 16),
    (1, 65536, 8, 128, 128, 16),
]


def inputs(B, T, H, K, V, docs):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1).bfloat16()
    k = F.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(B, T, H, V, device="cuda").bfloat16()
    g = -F.softplus(torch.randn(B, T, H, device="cuda") - 1.0)
    beta = (0.1 + 0.8 * torch.rand(B, T, H, device="cuda")).bfloat16()
    cu = None
    if docs:
        cu = torch.linspace(0, T, docs + 1, device="cuda").round().long()
    return [x.requires_grad_() for x in (q, k, v, g, beta)], cu


def timed(fn, reps=5, calls=1):
    """Median ms per call of fn(), each of reps timings covering `calls` calls issued back to
    back, after two warm-up calls. calls = 1 times a call on an idle GPU, which also counts the
    host's time to launch it; with more, the host queues the next call while the GPU runs this
    one, as a training step's layers do (`queued`). At the small shapes that difference decides
    the time: fla's fwd+bwd at (8, 4096, 8, 128, 128) takes ~2.5 ms to launch on the H100
    machines, about its GPU time."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def memory(forward):
    """(peak MiB of forward+backward, MiB kept alive by the forward for its backward)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = forward()
    saved = torch.cuda.memory_allocated() - before
    out.float().sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20, saved / 2**20


def ours(mode, xs, cu, chunk_size=None):
    def forward():
        return bayes_filter(*xs, mode=mode, backend="triton", cu_seqlens=cu, chunk_size=chunk_size,
                            check_inputs=False)[0]
    return forward


def pytorch_chunked(xs, cu):
    def forward():
        return bayes_filter(*xs, mode="bayes", backend="chunked", cu_seqlens=cu, check_inputs=False)[0]
    return forward


def fla_gdn(xs, cu):
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True     # bypass the Hopper guard: timing only
    q, k, v, g, beta = xs

    def forward():
        return chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)[0]
    return forward


def sdpa(xs, cu, B, T, H, K):
    q, k, _, _, _ = xs
    docs = 1 if cu is None else cu.numel() - 1
    # Per-document causal attention: equal documents folded into the batch (the benchmark's
    # documents are equal up to one token; the remainder is dropped).
    L = T // docs
    shape = (B * docs, L, H, K)
    qa = q[:, : docs * L].reshape(shape).transpose(1, 2).detach().requires_grad_()
    ka = k[:, : docs * L].reshape(shape).transpose(1, 2).detach().requires_grad_()
    va = ka.detach().clone().requires_grad_()

    def forward():
        return F.scaled_dot_product_attention(qa, ka, va, is_causal=True)
    return forward, [qa, ka, va]


def measure(forward, params, backward=True):
    fwd_ms = timed(lambda: forward())
    row = {"fwd": fwd_ms}
    if backward:
        def both():
            out = forward()
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        row["fwdbwd"] = timed(both)
        row["queued"] = timed(both, reps=3, calls=10)
        row["peak"], row["saved"] = memory(forward)
    return row


PEAK_GBPS = {"H100": 3350, "H200": 4800}   # HBM3 / HBM3e bandwidth of the SXM parts, GB/s


def bench_decode(lines):
    """The one-token step at batch 64: time per step and the bandwidth of reading and writing
    (M, P) once (fp32), against the GPU's peak. The step is captured in a CUDA graph, as a
    decoding loop runs it (torch.compile's reduce-overhead mode does the same): a step takes
    tens of microseconds, less than the Python that launches it."""
    from titan_bayes.kernels.recurrent import bayes_filter_step

    name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in PEAK_GBPS.items() if key in name), None)
    lines += ["", "| decode step (B=64) | mode | us / step | GB/s (M, P read + written) | % of peak |",
              "|---|---|---|---|---|"]
    for H, K, V in [(8, 128, 128), (6, 256, 512)]:
        B = 64
        q = F.normalize(torch.randn(B, H, K, device="cuda"), dim=-1).bfloat16()
        k = F.normalize(torch.randn(B, H, K, device="cuda"), dim=-1).bfloat16()
        v = torch.randn(B, H, V, device="cuda").bfloat16()
        g = -F.softplus(torch.randn(B, H, device="cuda") - 1.0)
        beta = (0.1 + 0.8 * torch.rand(B, H, device="cuda")).bfloat16()
        for mode in ("bayes", "reset"):
            M = torch.zeros(B, H, K, V, device="cuda")
            P = torch.eye(K, device="cuda").expand(B, H, K, K).contiguous() if mode == "bayes" else None
            bayes_filter_step(q, k, v, g, beta, (M, P), mode=mode)       # compile before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                bayes_filter_step(q, k, v, g, beta, (M, P), mode=mode)
            ms = timed(graph.replay, reps=50)
            state_bytes = M.numel() * 4 + (P.numel() * 4 if P is not None else 0)
            gbps = 2 * state_bytes / ms / 1e6
            pct = f"{100 * gbps / peak:.0f}%" if peak else "—"
            line = f"| H={H}, K={K}, V={V} | {mode} | {1000 * ms:.1f} | {gbps:.0f} | {pct} |"
            lines.append(line)
            print(line, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="all", choices=["all", "small", "targets", "long"],
                        help="targets: the issue's two target shapes; long: the T >= 8192 ones")
    parser.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch chunked path")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--decode-only", action="store_true", help="only the one-token step")
    args = parser.parse_args()
    shapes = {"all": SHAPES, "small": SHAPES[1:3], "targets": SHAPES[:2], "long": SHAPES[3:]}[args.shapes]
    shapes = [] if args.decode_only else shapes
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    lines = ["| shape (B,T,H,K,V) | impl | fwd ms | fwd+bwd ms | fwd / fla | fwd+bwd / fla | "
             "fwd+bwd queued ms | queued / fla | fwd TFLOP/s | peak MiB | saved MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for B, T, H, K, V, docs in shapes:
        xs, cu = inputs(B, T, H, K, V, docs)
        tokens = B * T * H
        flops = {"bayes": 6 * tokens * (K * V + K * K), "reset": 6 * tokens * K * V,
                 "fla GDN": 6 * tokens * K * V, "pytorch chunked bayes": 6 * tokens * (K * V + K * K),
                 "SDPA causal": 4 * B * H * T * (T // (docs or 1)) * K / 2}
        rows = {}
        fla = fla_gdn(xs, cu)
        if fla is not None:
            rows["fla GDN"] = measure(fla, xs)
        rows["bayes"] = measure(ours("bayes", xs, cu), xs)
        rows["reset"] = measure(ours("reset", xs, cu), xs)
        if not args.no_pytorch:
            rows["pytorch chunked bayes"] = measure(pytorch_chunked(xs, cu), xs, backward=False)
        rows["SDPA causal"] = measure(*sdpa(xs, cu, B, T, H, K))
        base = rows.get("fla GDN")
        label = f"{B},{T},{H},{K},{V}" + (f" ({docs} docs)" if docs else "")
        for name, r in rows.items():
            ratio_f = f"{r['fwd'] / base['fwd']:.2f}" if base else "—"
            ratio_b = f"{r['fwdbwd'] / base['fwdbwd']:.2f}" if base and "fwdbwd" in r else "—"
            ratio_q = f"{r['queued'] / base['queued']:.2f}" if base and "queued" in r else "—"
            line = (f"| {label} | {name} | {r['fwd']:.2f} | {r.get('fwdbwd', float('nan')):.2f} | {ratio_f} | "
                    f"{ratio_b} | {r.get('queued', float('nan')):.2f} | {ratio_q} | "
                    f"{flops[name] / r['fwd'] / 1e9:.1f} | {r.get('peak', float('nan')):.0f} | "
                    f"{r.get('saved', float('nan')):.0f} |")
            lines.append(line)
            print(line, flush=True)
        if "pytorch chunked bayes" in rows:
            print(f"  bayes forward speed-up over the PyTorch chunked path: "
                  f"{rows['pytorch chunked bayes']['fwd'] / rows['bayes']['fwd']:.1f}x", flush=True)
        del xs
        torch.cuda.empty_cache()
    bench_decode(lines)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
