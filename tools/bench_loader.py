"""Loader throughput: tokens/s of one DP rank's dataloader (read, tokenize, pack, batch).

Default: cl100k_base (offline rank file) on the WikiText-2 text in ../shared/data/wikitext-2,
seq_len 2048, batch 8, the process pinned to one CPU core and one torch thread, the loader
in the main process (num_workers = 0), so the figure is tokens/s per core.

    python tools/bench_loader.py [--path ../shared/data/wikitext-2] [--seconds 10]
        [--encoding cl100k_base] [--seq-len 2048] [--batch 8] [--workers 0]

The text is small (about 0.5M cl100k tokens), so the loader runs for several epochs: each
epoch re-tokenizes every document, nothing is cached.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from titan_bayes.data import build_dataloader, build_tokenizer  # noqa: E402
from titan_bayes.data.testing import make_job_config  # noqa: E402

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default=DEFAULT_PATH, help="file or folder of .txt/.jsonl/.parquet")
    parser.add_argument("--encoding", default="cl100k_base", choices=["gpt2", "cl100k_base", "o200k_base"])
    parser.add_argument("--rank-file", default="", help="tiktoken rank file (gpt2 needs one)")
    parser.add_argument("--text-split", default="wikitext", help="how .txt files split into documents")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="measure for about this long")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU core")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not os.path.exists(args.path):
        sys.exit(f"bench_loader: {args.path!r} does not exist; pass --path to a text file or folder")
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    # One "starting epoch" line per pass over the small text would drown the result.
    logging.getLogger("titan_bayes.data.packing").setLevel(logging.ERROR)

    job = make_job_config("local_text", seq_len=args.seq_len, batch=args.batch,
                          dataset_path=args.path, tokenizer="tiktoken",
                          tiktoken_encoding=args.encoding, tiktoken_rank_file=args.rank_file,
                          text_split=args.text_split)
    job.training.dataloader.num_workers = args.workers
    tokenizer = build_tokenizer(job)
    loader = build_dataloader(1, 0, tokenizer, job)

    batches = iter(loader)
    next(batches)  # warm-up: file reading and the first documents
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < args.seconds:
        inputs, _ = next(batches)
        tokens += inputs["input"].numel()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # this process's CPU time, all its threads

    cores = 1 if not args.no_pin else len(os.sched_getaffinity(0))
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, cores used: {cores}, loader workers: {args.workers}")
    print(f"data: {args.path} ({args.text_split} documents), tokenizer: tiktoken {args.encoding}, "
          f"seq_len {args.seq_len}, batch {args.batch}")
    print(f"{tokens:,} tokens in {elapsed:.2f} s: {tokens / elapsed:,.0f} tokens/s per rank; "
          f"{cpu:.2f} CPU-s in this process: {tokens / cpu:,.0f} tokens per CPU-second")


if __name__ == "__main__":
    main()
