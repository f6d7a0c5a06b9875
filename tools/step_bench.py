"""One training step of each model outside the Trainer, as the platform anchors were measured.

    python tools/step_bench.py [--specs transformer_lm llama3 gdn_lm bayes_lm bayes_hybrid]
                               [--flavor 340M] [--batch 8] [--seq-len 4096] [--steps 10]
                               [--warmup 3] [--precision bf16|autocast] [--profile N]

A step is forward, cross-entropy on random tokens (vocabulary 32000), backward and AdamW, timed
with CUDA events after `--warmup` steps; the table gives ms per step, tokens/s and peak
allocated memory. `llama3` is torchtitan's own llama3 model class at the anchor's 340M shape
(dim 1024, 24 layers, 16 heads, SwiGLU 2816): the code the 129.9k tokens/s anchor timed, run
here beside `transformer_lm` (the same shape in our decoder) so the two compare in one process.

Precision: `bf16` (default) holds the weights and AdamW's state in bf16, the anchors' setting.
`autocast` keeps fp32 weights and runs the step under torch.autocast(bf16): what torchtitan's
Trainer does on one GPU, where FSDP (and its mixed-precision policy) is off. Comparing the two
with tools/train_bench.py separates the model's own speed from the Trainer's precision setup.

`--profile N` prints, per spec, the N operators with the most GPU time in one step
(torch.profiler, self time), to show where a model spends what the anchors do not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SPECS = ("transformer_lm", "llama3", "gdn_lm", "bayes_lm", "bayes_hybrid")
VOCAB = 32000


def build_model(spec: str, flavor: str, seq_len: int) -> torch.nn.Module:
    """The spec's model on the GPU, initialised as the Trainer initialises it."""
    if spec == "llama3":
        from torchtitan.models.llama3.model.args import TransformerModelArgs
        from torchtitan.models.llama3.model.model import Transformer

        if flavor != "340M":
            raise SystemExit("--specs llama3 exists only at the anchor's shape: use --flavor 340M")
        args = TransformerModelArgs(dim=1024, n_layers=24, n_heads=16, vocab_size=VOCAB, max_seq_len=seq_len)
        model_cls = Transformer
    else:
        from titan_bayes.models.args import flavors_for
        from titan_bayes.models.model import BayesLM

        flavors = flavors_for(spec)
        if flavor not in flavors:
            raise SystemExit(f"--flavor {flavor}: {spec} has flavors {sorted(flavors)}")
        args = flavors[flavor]
        args.vocab_size, args.max_seq_len = VOCAB, seq_len
        model_cls = BayesLM
    with torch.device("cuda"):
        model = model_cls(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    return model


def make_step(model, precision: str, batch: int, seq_len: int):
    """A closure running one training step on fixed random tokens."""
    if precision == "bf16":
        # Parameters only: llama3's RoPE table is a complex buffer that model.to() would make real.
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    tokens = torch.randint(0, VOCAB, (batch, seq_len + 1), device="cuda")
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "autocast"
           else contextlib.nullcontext())

    def step() -> torch.Tensor:
        with amp:
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step, warmup: int, steps: int) -> float:
    """ms per step, averaged over `steps` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def profile_table(step, rows: int) -> str:
    """The operators with the most GPU self time in one step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=48)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=list(SPECS), choices=SPECS)
    p.add_argument("--flavor", default="340M")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("bf16", "autocast"), default="bf16")
    p.add_argument("--profile", type=int, default=0, metavar="N")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_bench times GPU steps: no CUDA device here")
    torch.manual_seed(0)
    rows, tables = [], []
    for spec in args.specs:
        model = build_model(spec, args.flavor, args.seq_len)
        n_params = sum(p.numel() for p in model.parameters())
        step = make_step(model, args.precision, args.batch, args.seq_len)
        torch.cuda.reset_peak_memory_stats()
        ms = time_steps(step, args.warmup, args.steps)
        loss = float(step())
        peak = torch.cuda.max_memory_allocated() / 2**30
        tokens_per_s = args.batch * args.seq_len / (ms / 1000)
        rows.append(f"| {spec} | {n_params / 1e6:.0f}M | {ms:.1f} | {tokens_per_s:,.0f} | {peak:.1f} | {loss:.3f} |")
        print(rows[-1], flush=True)
        if args.profile:
            tables.append(f"## {spec}\n{profile_table(step, args.profile)}")
        del model, step
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, flavor {args.flavor}, "
          f"batch {args.batch} x {args.seq_len}, precision {args.precision}, "
          f"{args.steps} steps after {args.warmup}\n")
    print("| spec | params | ms/step | tokens/s | peak GiB | loss |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    for table in tables:
        print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
