"""Bytes one block saves for backward, per token, by category (CPU, no GPU needed).

    python tools/activation_memory.py [--spec bayes_lm] [--flavor 340M] [--precision bf16|autocast]
                                      [--seq-len 64] [--batch 1] [--doc-len 0] [--detail]

Builds one block (pre-RMSNorm, mixer, pre-RMSNorm, SwiGLU MLP) of the spec's first layer
letter at the flavor's shape, runs a forward pass under `saved_tensors_hooks` and adds up
every storage that autograd keeps for backward. Precisions:
  bf16      bf16 parameters (FSDP2 mixed precision; the per-head filter parameters stay fp32)
  autocast  fp32 parameters under bf16 autocast (what torchtitan runs on a single GPU)

Per token: the block runs at seq_len T and 2T and the difference is divided by the extra
tokens, so per-sequence constants (parameter casts, initial states) drop out. With --doc-len
L, documents of L tokens are packed (doc_starts), so per-document costs are included,
amortised over L tokens.

The filter. On CPU `bayes_filter` takes the chunked PyTorch path, whose autograd graph keeps
every chunk intermediate; on a GPU the Triton custom op (kernels/ops.py) saves its inputs
and each chunk's factors. The block therefore runs the real op without grad and wraps it in a
stand-in that saves what the custom op saves (q, k, v, g, beta, the fp32 process noise, the
initial states, the chunk factors [B·T, H, C] fp32: bayes' packed LDLᵀ factors, reset's L⁻¹,
and bayes' write directions [B·T, H, K], fp16 for 16-bit keys), so these numbers are the
GPU's. `--filter chunked` measures the CPU path instead.

Each storage is counted once (a tensor saved by several ops, e.g. the normed input of the six
projections, is one allocation), charged to the first module that saved it; parameters are
not activations and are left out. `--detail` splits the mixer body by source line.
"""

from __future__ import annotations

import argparse
import contextlib
import linecache
import os
import sys
from collections import defaultdict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from titan_bayes.kernels.chunk_fwd import write_dtype  # noqa: E402
from titan_bayes.models import model as model_module  # noqa: E402
from titan_bayes.models.args import flavors_for, with_overrides  # noqa: E402
from titan_bayes.models.model import Block, HeadParams  # noqa: E402
from titan_bayes.ops import filter_math as fm  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The filter as the GPU runs it (memory-wise)

class _SavesLikeKernel(torch.autograd.Function):
    """Output of the real filter; saves the tensors kernels/ops.py's custom op saves."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, noise, S0, P0, factors, writes, o):
        ctx.save_for_backward(q, k, v, g, beta, noise, S0, P0, factors, writes)
        return o.clone()

    @staticmethod
    def backward(ctx, d_o):  # measurement only
        raise RuntimeError("activation_memory's stand-in filter has no backward")


def kernel_like_filter(q, k, v, g, beta, *, mode, process_noise=None, prior_scale=1.0,
                       cu_seqlens=None, chunk_size=None, **kw):
    """bayes_filter with the custom op's saved tensors (built as triton_bayes_filter builds
    them: contiguous inputs, fp32 noise, fp32 zero mean and prior covariance per sequence)."""
    from titan_bayes.ops.api import DEFAULT_CHUNK_SIZES, _initial_belief

    chunk_size = chunk_size or DEFAULT_CHUNK_SIZES[mode]

    with torch.no_grad():
        o, _ = _real_filter(q, k, v, g, beta, mode=mode, process_noise=process_noise,
                            prior_scale=prior_scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size, **kw)
    B, T, H, K = q.shape
    if mode == "bayes":
        noise = fm.stationary_process_noise(g.float()) if process_noise is None else process_noise.float()
    else:
        noise = torch.zeros(B, T, H, dtype=torch.float32)
    S0, P0 = _initial_belief(None, mode, cu_seqlens, B, H, K, v.shape[-1], prior_scale,
                             torch.float32, q.device)
    P0 = torch.empty(0) if P0 is None else P0
    inputs = [t.contiguous() for t in (q, k, v, g, beta, noise, S0, P0)]
    factors = torch.empty(B * T, H, chunk_size)
    writes = torch.empty(B * T, H, K, dtype=write_dtype(k)) if mode == "bayes" else torch.empty(0)
    return _SavesLikeKernel.apply(*inputs, factors, writes, o), None


_real_filter = model_module.bayes_filter


# ---------------------------------------------------------------------------------------------
# Counting

class SavedTensorCounter:
    """saved_tensors_hooks that charge each saved storage once, to the module that saved it."""

    def __init__(self, root: torch.nn.Module, detail: bool = False):
        self.root, self.detail = root, detail
        self.stack: list[str] = []
        self.params = {p.untyped_storage().data_ptr() for p in root.parameters()}
        self.seen: dict[int, torch.Tensor] = {}
        self.bytes: dict[str, int] = defaultdict(int)
        self.dtype_bytes: dict[tuple[str, torch.dtype], int] = defaultdict(int)

    @contextlib.contextmanager
    def counting(self):
        def enter(name):
            return lambda module, args: self.stack.append(name)  # returns None: input unchanged

        def leave(module, args, output):
            self.stack.pop()  # (a hook that returned the popped name would replace the output)

        handles = []
        for name, module in self.root.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.params or ptr in self.seen or storage.nbytes() == 0:
            return t
        self.seen[ptr] = t  # keep it alive so its address is not reused while counting
        label = self._label()
        self.bytes[label] += storage.nbytes()
        self.dtype_bytes[(label, t.dtype)] += storage.nbytes()
        return t

    def _label(self) -> str:
        module = self.stack[-1] if self.stack else ""
        if not self.detail:
            return module
        return f"{module}: {_model_source_line()}"


def _model_source_line() -> str:
    """The innermost line of titan_bayes/models/model.py on the stack: which statement saved it."""
    frame = sys._getframe(2)
    model_py = os.path.join("titan_bayes", "models", "model.py")
    while frame is not None:
        if frame.f_code.co_filename.endswith(model_py):
            text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            return f"{frame.f_code.co_name}:{frame.f_lineno} {text[:60]}"
        frame = frame.f_back
    return "?"


# ---------------------------------------------------------------------------------------------
# One block

def build_block(spec: str, flavor: str, precision: str, letter: str | None = None,
                **overrides) -> Block:
    args = flavors_for(spec)[flavor]
    if overrides:
        args = with_overrides(args, **overrides)
    letter = letter or args.full_layout[0]
    torch.manual_seed(0)
    block = Block(0, letter, args)
    block.init_weights()
    if precision == "bf16":
        # FSDP2's policy (infra/parallelize.py): bf16 compute, HeadParams kept in fp32.
        block.to(torch.bfloat16)
        for m in block.modules():
            if isinstance(m, HeadParams):
                m.float()
    elif precision != "autocast":
        raise ValueError(f"precision must be 'bf16' or 'autocast', got {precision!r}")
    return block


def saved_bytes(block: Block, precision: str, batch: int, seq_len: int, doc_len: int = 0,
                filter_impl: str = "kernel", detail: bool = False) -> SavedTensorCounter:
    """Run one forward of `block` and count what autograd saves (the graph is then dropped)."""
    dim = block.attn_norm.weight.shape[0]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(1)
    x = torch.randn(batch, seq_len, dim, dtype=dtype, requires_grad=True)
    doc_starts = None
    if doc_len:
        doc_starts = torch.zeros(batch, seq_len, dtype=torch.bool)
        doc_starts[:, ::doc_len] = True
    counter = SavedTensorCounter(block, detail=detail)
    if filter_impl == "kernel":
        model_module.bayes_filter = kernel_like_filter
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    try:
        with counter.counting(), amp:
            out = block(x, doc_starts)
    finally:
        model_module.bayes_filter = _real_filter
    del out
    return counter


def per_token(block: Block, precision: str, batch: int, seq_len: int, doc_len: int = 0,
              filter_impl: str = "kernel", detail: bool = False):
    """Bytes per token by label (and by (label, dtype)): the slope between T and 2T tokens."""
    small = saved_bytes(block, precision, batch, seq_len, doc_len, filter_impl, detail)
    large = saved_bytes(block, precision, batch, 2 * seq_len, doc_len, filter_impl, detail)
    tokens = batch * seq_len

    def slope(a, b):
        return {key: (b.get(key, 0) - a.get(key, 0)) / tokens for key in set(a) | set(b)}

    return slope(small.bytes, large.bytes), slope(small.dtype_bytes, large.dtype_bytes)


def group(label: str) -> str:
    """Report groups: the block's norms, the mixer, the MLP."""
    module = label.split(":")[0]
    if module.startswith("attn"):
        return "attn_norm" if module == "attn_norm" else "mixer"
    return module.split(".")[0] or "block"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="bayes_lm")
    parser.add_argument("--flavor", default="340M")
    parser.add_argument("--letter", default=None, help="B, D or A (default: the spec's first layer)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "autocast"))
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--doc-len", type=int, default=0, help="pack documents of this many tokens")
    parser.add_argument("--filter", default="kernel", choices=("kernel", "chunked"),
                        help="kernel: save what the GPU custom op saves; chunked: the CPU path")
    parser.add_argument("--detail", action="store_true", help="split by source line")
    a = parser.parse_args(argv)

    block = build_block(a.spec, a.flavor, a.precision, a.letter)
    by_label, by_dtype = per_token(block, a.precision, a.batch, a.seq_len, a.doc_len, a.filter, a.detail)
    print(f"{a.spec} {a.flavor} layer {block.letter}, precision {a.precision}, filter {a.filter}, "
          f"T = {a.seq_len} -> {2 * a.seq_len}" + (f", documents of {a.doc_len}" if a.doc_len else ""))
    print(f"{'saved for backward (KB = 1000 B per token)':<78} {'total':>7} {'fp32':>7}")
    fp32 = defaultdict(float)
    for (label, dtype), n in by_dtype.items():
        if dtype == torch.float32:
            fp32[label] += n
    for label in sorted(by_label, key=lambda s: (group(s), s)):
        if abs(by_label[label]) >= 1:
            print(f"  {label:<76} {by_label[label] / 1e3:7.2f} {fp32[label] / 1e3:7.2f}")
    groups = defaultdict(lambda: [0.0, 0.0])
    for label, n in by_label.items():
        groups[group(label)][0] += n
        groups[group(label)][1] += fp32[label]
    for name in sorted(groups):
        print(f"{'= ' + name:<78} {groups[name][0] / 1e3:7.2f} {groups[name][1] / 1e3:7.2f}")
    layer = groups["attn_norm"][0] + groups["mixer"][0]
    total = sum(v[0] for v in groups.values())
    print(f"{'= mixer layer (attn_norm + mixer)':<78} {layer / 1e3:7.2f}")
    print(f"{'= block':<78} {total / 1e3:7.2f} {sum(v[1] for v in groups.values()) / 1e3:7.2f}")


if __name__ == "__main__":
    main()
