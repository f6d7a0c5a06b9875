"""The 340M GPU comparison of issue 4: tokens/s, MFU, peak memory and loss per spec, one machine.

    python tools/train_bench.py [--specs gdn_lm transformer_lm bayes_lm bayes_hybrid]
                                [--steps 50] [--seq-len 4096] [--batch 8] [--out DIR]
                                [--nproc 1] [--tp 1] [--compile] [--ac none|selective|full]

Each spec trains its `train_configs/<spec>_340M.toml` job through the launcher for `--steps`
steps on synthetic MQAR data with a 32000-token vocabulary (the anchors' vocabulary; no
downloads, no tokenizer files), bf16 parameters, fp32 reductions, no validation, no
checkpoints. torchtitan's own metrics are read back from TensorBoard: tokens/s per GPU and
MFU averaged over the steps after `--warmup` (compilation and allocator warm-up excluded;
`--compile` compiles each block as the example configs do),
peak reserved memory, and the last logged loss. The table goes to stdout and to
`<out>/train_bench.md` / `.json`.

On the GPU machines (which lack torchtitan, torchdata, tyro, datasets): first download the
wheels here with ../shared/tools/device-wheels.sh (into .whl/), carry `.whl` to the machine
and install there before running:
    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
    export PYTHONPATH=$PWD/.site:$PWD
    python tools/train_bench.py --out $OUT
Anchors (platform notes, one H100, torch 2.11, no compile): fla GDN-340M 78.0k tokens/s,
torchtitan llama 340M 129.9k tokens/s. 2-GPU FSDP2 + TP: `--nproc 2 --tp 2` (or `--nproc 2`
for FSDP2 alone).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = ("gdn_lm", "transformer_lm", "bayes_lm", "bayes_hybrid")


def scalars(dump: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for run_dir in sorted(glob.glob(os.path.join(dump, "tb", "*"))):
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def run_spec(spec: str, args) -> dict:
    dump = os.path.join(args.out, spec)
    cmd = [
        "-m", "titan_bayes.train",
        "--job.config_file", os.path.join(REPO, "train_configs", f"{spec}_340M.toml"),
        "--job.dump_folder", dump,
        "--model.flavor", args.flavor,
        "--training.dataset", "mqar",
        "--bayes_data.tokenizer", "mqar",
        "--bayes_data.mqar_vocab_size", "32000",
        "--bayes_data.mqar_num_kv_pairs", str(max(1, min(256, args.seq_len // 16))),
        "--training.seq_len", str(args.seq_len),
        "--training.local_batch_size", str(args.batch),
        "--training.global_batch_size", str(args.batch * args.nproc // args.tp),
        "--training.steps", str(args.steps),
        "--lr_scheduler.warmup_steps", "10",
        "--parallelism.tensor_parallel_degree", str(args.tp),
        "--activation_checkpoint.mode", args.ac,
        "--metrics.log_freq", "1",
        "--bayes.backend", args.backend,
        "--bayes.no-diagnostics",
        "--validation.no-enable",
        "--checkpoint.no-enable",
    ]
    cmd += ["--compile.enable"] if args.compile else ["--compile.no-enable"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}"] + cmd
    else:
        cmd = [sys.executable] + cmd
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    with open(os.path.join(args.out, f"{spec}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    row = {"spec": spec, "rc": proc.returncode, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        # The last line is usually a shutdown warning; the cause is the last "...Error: ..." line.
        lines = proc.stderr.strip().splitlines() or ["?"]
        errors = [line for line in lines if "Error:" in line]
        row["error"] = (errors or lines)[-1][-300:]
        return row
    s = scalars(dump)
    steps = [k for k in sorted(s.get("throughput(tps)", {})) if k > args.warmup]
    mean = lambda tag: sum(s[tag][k] for k in steps) / max(len(steps), 1)  # noqa: E731
    row.update({
        "tokens_per_s_per_gpu": round(mean("throughput(tps)")),
        "mfu_pct": round(mean("mfu(%)"), 2),
        "step_s": round(mean("time_metrics/end_to_end(s)"), 4),
        "peak_reserved_gib": round(max(s["memory/max_reserved(GiB)"].values()), 2),
        "loss_first": round(s["loss_metrics/global_avg_loss"][min(s["loss_metrics/global_avg_loss"])], 4),
        "loss_last": round(s["loss_metrics/global_avg_loss"][max(s["loss_metrics/global_avg_loss"])], 4),
        "steps_averaged": len(steps),
    })
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=list(SPECS), choices=SPECS)
    p.add_argument("--flavor", default="340M")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the averages")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ac", default="none", choices=("none", "selective", "full"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(REPO, "outputs", "train_bench")))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    rows = []
    for spec in args.specs:
        row = run_spec(spec, args)
        rows.append(row)
        print(json.dumps(row), flush=True)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [f"device: {device} x{args.nproc} (tp {args.tp}); flavor {args.flavor}; batch {args.batch} x "
             f"seq {args.seq_len}; {args.steps} steps, averages over steps > {args.warmup}; "
             f"ac {args.ac}; compile {args.compile}; backend {args.backend}", "",
             "| spec | tokens/s/GPU | MFU % | step s | peak reserved GiB | loss first → last |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['spec']} | failed (rc {r['rc']}): {r.get('error', '')} | | | | |")
        else:
            lines.append(f"| {r['spec']} | {r['tokens_per_s_per_gpu']:,} | {r['mfu_pct']} | {r['step_s']} | "
                         f"{r['peak_reserved_gib']} | {r['loss_first']} → {r['loss_last']} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "train_bench.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "train_bench.json"), "w") as f:
        json.dump({"device": device, "args": vars(args), "rows": rows}, f, indent=2)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
