"""Model arguments and flavors of the layer-layout decoder.

One decoder family, four TrainSpecs. A model is a stack of `n_layers` blocks whose mixers are
given by a layout string over the letters

    B  Bayesian Layer          (the filter with mode="bayes": exact Kalman write)
    D  Gated DeltaNet layer    (the same layer, mode="reset": the gated delta rule)
    A  causal softmax attention (RoPE, grouped-query, SDPA)

each followed by a SwiGLU MLP, with pre-RMSNorm and residuals. A layout shorter than
`n_layers` is repeated ("BBBA" over 21 layers gives BBBA BBBA BBBA BBBA BBBA B).

The B/D layer has exactly Gated DeltaNet's parameters (design note §2), so the 340M flavor is
fla's standard GDN-340M shape: hidden 1024, 21 layers, 6 heads of K = 256, V = 512, MLP ratio 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import nn
from torchtitan.protocols.model import BaseModelArgs

from titan_bayes.ops.api import DEFAULT_CHUNK_SIZES

LAYER_KINDS = {"B": "Bayesian Layer", "D": "Gated DeltaNet", "A": "causal attention"}
FILTER_MODES = ("bayes", "reset", "additive")
PROCESS_NOISE = ("stationary", "zero", "learned")
BACKENDS = ("auto", "chunked", "sequential", "triton")
# Vocabulary rows are padded to a multiple of this (never targeted, only computed): keeps the
# embedding and the output layer divisible by any tensor-parallel degree up to 64 and GEMMs aligned.
VOCAB_MULTIPLE = 64


def mlp_hidden_dim(dim: int, ratio: float, multiple_of: int) -> int:
    """SwiGLU width: 2/3 of ratio·dim (three matrices instead of two), rounded up to multiple_of.

    This is the convention of fla's GatedMLP and of llama, so that "MLP ratio 4" at hidden 1024
    gives 2816, the width of the published GDN-340M checkpoints.
    """
    hidden = int(dim * ratio * 2 / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def expand_layout(layout: str, n_layers: int) -> str:
    """Repeat `layout` to n_layers letters; raise a ValueError naming any unknown letter."""
    bad = sorted({c for c in layout if c not in LAYER_KINDS})
    if not layout or bad:
        raise ValueError(
            f"layout {layout!r} is invalid: "
            + (f"unknown letter(s) {bad}; " if bad else "it is empty; ")
            + "use B (Bayesian Layer), D (Gated DeltaNet) or A (attention), e.g. layout = \"BBBA\"")
    if len(layout) > n_layers:
        raise ValueError(f"layout {layout!r} has {len(layout)} letters but the model has n_layers = "
                         f"{n_layers}; give at most n_layers letters (a shorter layout is repeated)")
    return (layout * (n_layers // len(layout) + 1))[:n_layers]


@dataclass
class BayesModelArgs(BaseModelArgs):
    dim: int = 1024
    n_layers: int = 21
    layout: str = "B"
    vocab_size: int = 32000
    norm_eps: float = 1e-6

    # Filter (B / D) layers: Gated DeltaNet's shapes.
    n_heads: int = 6
    head_k_dim: int = 256
    head_v_dim: int = 512
    conv_size: int = 4

    # Attention (A) layers.
    attn_n_heads: int = 16
    attn_n_kv_heads: int | None = None
    rope_theta: float = 10000.0

    # MLP after every mixer.
    mlp_ratio: float = 4.0
    multiple_of: int = 256

    # Filter options, set from the [bayes] TOML section by update_from_config.
    mode: str = ""  # "" keeps the layout letters' modes; else overrides every B/D layer
    chunk_size: int = 0     # 0: DEFAULT_CHUNK_SIZES of the layer's mode (chunk_size_for)
    backend: str = "auto"
    process_noise: str = "stationary"
    prior_scale: float = 1.0

    max_seq_len: int = 4096

    # ---------------------------------------------------------------------------------------
    @property
    def full_layout(self) -> str:
        return expand_layout(self.layout, self.n_layers)

    @property
    def mlp_dim(self) -> int:
        return mlp_hidden_dim(self.dim, self.mlp_ratio, self.multiple_of)

    def chunk_size_for(self, mode: str) -> int:
        """Chunk length of a filter layer of `mode`: [bayes] chunk_size, or the op's default for the mode."""
        return self.chunk_size or DEFAULT_CHUNK_SIZES[mode]

    def layer_mode(self, letter: str) -> str:
        """The filter mode of a B or D layer."""
        if self.mode:
            return self.mode
        return "bayes" if letter == "B" else "reset"

    def validate(self) -> None:
        """Raise a ValueError naming the first bad value and how to fix it."""
        self.full_layout  # checks the letters
        if self.mode not in ("",) + FILTER_MODES:
            raise ValueError(f"[bayes] mode = {self.mode!r} is unknown; use one of {FILTER_MODES} "
                             "or \"\" (keep each layer's letter: B = bayes, D = reset)")
        if self.backend not in BACKENDS:
            raise ValueError(f"[bayes] backend = {self.backend!r} is unknown; use one of {BACKENDS}")
        if self.process_noise not in PROCESS_NOISE:
            raise ValueError(f"[bayes] process_noise = {self.process_noise!r} is unknown; use one of "
                             f"{PROCESS_NOISE}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ValueError(f"[bayes] chunk_size = {self.chunk_size!r} must be a positive integer (e.g. 64), "
                             f"or 0 for each design model's default {DEFAULT_CHUNK_SIZES}")
        if not self.prior_scale > 0:
            raise ValueError(f"[bayes] prior_scale = {self.prior_scale!r} must be > 0 (the prior "
                             "covariance is prior_scale * I)")
        if self.dim % self.attn_n_heads and "A" in self.full_layout:
            raise ValueError(f"dim {self.dim} is not divisible by attn_n_heads {self.attn_n_heads}")
        kv = self.attn_n_kv_heads or self.attn_n_heads
        if self.attn_n_heads % kv:
            raise ValueError(f"attn_n_heads {self.attn_n_heads} must be a multiple of attn_n_kv_heads {kv}")
        if self.backend == "triton" and any(c in "BD" for c in self.full_layout):
            from titan_bayes import kernels

            max_k, max_v = getattr(kernels, "MAX_K", 256), getattr(kernels, "MAX_V", 512)
            if self.head_k_dim > max_k or self.head_v_dim > max_v:
                raise ValueError(
                    f"[bayes] backend = \"triton\" supports head K <= {max_k} and V <= {max_v}, but the "
                    f"model has head_k_dim = {self.head_k_dim}, head_v_dim = {self.head_v_dim}; use "
                    "backend = \"chunked\" or smaller heads")
            chunks = getattr(kernels, "CHUNK_SIZES", None)
            if chunks is not None and self.chunk_size and self.chunk_size not in chunks:
                raise ValueError(f"[bayes] backend = \"triton\" supports chunk_size in {tuple(chunks)} "
                                 f"(or 0: each design model's default), got {self.chunk_size}")
            modes = getattr(kernels, "KERNEL_MODES", FILTER_MODES)
            used = {self.layer_mode(c) for c in self.full_layout if c in "BD"}
            if used - set(modes):
                raise ValueError(f"[bayes] backend = \"triton\" has kernels for modes {tuple(modes)}, "
                                 f"not {sorted(used - set(modes))}; use backend = \"chunked\"")

    def update_from_config(self, job_config, **kwargs) -> None:
        """Apply the [bayes] section and the tokenizer's vocabulary.

        The TrainSpec hands out a fresh copy of the flavor for every lookup (train_specs.py), so
        this may mutate freely.
        """
        bayes = getattr(job_config, "bayes", None)
        if bayes is not None:
            if bayes.layout:
                self.layout = bayes.layout
            self.mode = bayes.mode
            self.chunk_size = bayes.chunk_size
            self.backend = bayes.backend
            self.process_noise = bayes.process_noise
            self.prior_scale = bayes.prior_scale
            for key in ("n_heads", "head_k_dim", "head_v_dim"):
                value = getattr(bayes, key)
                if value < 0:
                    raise ValueError(f"[bayes] {key} = {value} must be >= 0 (0 keeps the flavor's)")
                if value:
                    setattr(self, key, value)
        self.max_seq_len = job_config.training.seq_len
        tokenizer_vocab = kwargs.get("tokenizer_vocab_size") or _tokenizer_vocab_size(job_config)
        if tokenizer_vocab:
            # The model's vocabulary follows the tokenizer, padded (see VOCAB_MULTIPLE).
            self.vocab_size = VOCAB_MULTIPLE * math.ceil(tokenizer_vocab / VOCAB_MULTIPLE)
        if bayes is not None and bayes.vocab_size:
            if tokenizer_vocab and bayes.vocab_size < tokenizer_vocab:
                raise ValueError(f"[bayes] vocab_size = {bayes.vocab_size} is smaller than the tokenizer's "
                                 f"{tokenizer_vocab} tokens; raise it or set it to 0 (follow the tokenizer)")
            self.vocab_size = bayes.vocab_size
        self.validate()

    # ---------------------------------------------------------------------------------------
    def filter_flops_per_token(self, mode: str) -> int:
        """Forward FLOPs per token of one filter layer's recurrence (all heads), design note §5.

        Chunk size C: GDN-type modes ("reset", "additive") do the intra-chunk products KKᵀ and QKᵀ
        (2·C·K each) and apply them to V (2·C·V), and three state products with the chunk's keys,
        queries and values (≈ 6·K·V). "bayes" adds the covariance work, ≈ 6·K² (K̃P₀, the
        query-side P products and ZᵀD⁻¹Z), the Z = L⁻¹X solve (2·C·K) and the C×C LDLᵀ factor
        (C³/3 per chunk = C²/3 per token).
        """
        K, V, C = self.head_k_dim, self.head_v_dim, self.chunk_size_for(mode)
        per_head = 6 * K * V + 2 * C * (2 * K + V)
        if mode == "bayes":
            per_head += 6 * K * K + 2 * C * K + C * C // 3
        return self.n_heads * per_head

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Parameters, and training FLOPs per token (forward + backward = 3 × forward).

        Matrix multiplies: 6 per non-embedding parameter (the embedding is a lookup). Attention
        layers: torchtitan's convention, 12 · heads · head_dim · seq_len (scores and values, no
        causal discount). Filter layers: 3 × filter_flops_per_token (the recurrence has no
        parameters, so the 6N term misses it; this is what makes MFU honest for B and D layers).
        """
        nparams = sum(p.numel() for p in model.parameters())
        nparams_embedding = sum(p.numel() for p in model.tok_embeddings.parameters()) \
            if getattr(model, "tok_embeddings", None) is not None else 0
        flops = 6 * (nparams - nparams_embedding)
        head_dim = self.dim // self.attn_n_heads
        for letter in self.full_layout:
            if letter == "A":
                flops += 12 * self.attn_n_heads * head_dim * seq_len
            else:
                flops += 3 * self.filter_flops_per_token(self.layer_mode(letter))
        return nparams, flops


def _tokenizer_vocab_size(job_config) -> int | None:
    """The vocabulary of the tokenizer the job will use (the Trainer does not pass it here).

    Building the tokenizer a second time is cheap (bytes: nothing; tiktoken / HF: one file read).
    Returns None while the data package has no tokenizer builder.
    """
    try:
        from titan_bayes.data import build_tokenizer
    except ImportError:
        return None
    tokenizer = build_tokenizer(job_config)
    return None if tokenizer is None else tokenizer.get_vocab_size()


# ---------------------------------------------------------------------------------------------
# Flavors. Each spec gets its own copies (update_from_config mutates them in place).

# 340M / 1.3B: fla's GDN shapes. The K = 128 variants keep the projection widths (H·K and H·V)
# with twice the heads, so parameter counts barely change while the per-head covariance P is
# 128 × 128 (fits on chip, design note §5).
_FILTER_FLAVORS = {
    # A few seconds per step on a laptop CPU: 4 layers (one BBBA period for the hybrid).
    "debugmodel": dict(dim=128, n_layers=4, n_heads=2, head_k_dim=32, head_v_dim=64,
                       attn_n_heads=4, vocab_size=320, multiple_of=64),
    # Two layers, for the synthetic MQAR recall task.
    "mqar": dict(dim=128, n_layers=2, n_heads=2, head_k_dim=64, head_v_dim=64,
                 attn_n_heads=4, vocab_size=8192, multiple_of=64),
    # GPT-2-small size class (hidden 768, 12 layers) with GDN's width ratios (H·K = dim,
    # H·V = 2·dim), K = 128: the WikiText-103 single-GPU configs of issue 5.
    "125M": dict(dim=768, n_layers=12, n_heads=6, head_k_dim=128, head_v_dim=256),
    "340M": dict(dim=1024, n_layers=21, n_heads=6, head_k_dim=256, head_v_dim=512),
    "340M_k128": dict(dim=1024, n_layers=21, n_heads=12, head_k_dim=128, head_v_dim=256),
    # Same heads as 340M at twice the width (H·K = 0.75·dim, H·V = 1.5·dim): 1.39B at vocab 32000.
    "1.3B": dict(dim=2048, n_layers=21, n_heads=6, head_k_dim=256, head_v_dim=512),
    "1.3B_k128": dict(dim=2048, n_layers=21, n_heads=12, head_k_dim=128, head_v_dim=256),
}

# The attention baseline at the same size class: the llama 340M shape of the platform anchor
# (24 layers, 16 heads of 64) and a 1.3B shape (24 layers, 32 heads of 64 at hidden 2048).
_ATTN_FLAVORS = {
    "debugmodel": dict(dim=128, n_layers=4, attn_n_heads=4, vocab_size=320, multiple_of=64),
    "mqar": dict(dim=128, n_layers=2, attn_n_heads=4, vocab_size=8192, multiple_of=64),
    "125M": dict(dim=768, n_layers=12, attn_n_heads=12),
    "340M": dict(dim=1024, n_layers=24, attn_n_heads=16),
    "340M_k128": dict(dim=1024, n_layers=24, attn_n_heads=16),
    "1.3B": dict(dim=2048, n_layers=24, attn_n_heads=32),
    "1.3B_k128": dict(dim=2048, n_layers=24, attn_n_heads=32),
}

SPEC_LAYOUTS = {"bayes_lm": "B", "bayes_hybrid": "BBBA", "gdn_lm": "D", "transformer_lm": "A"}


def flavors_for(spec_name: str) -> dict[str, BayesModelArgs]:
    layout = SPEC_LAYOUTS[spec_name]
    table = _ATTN_FLAVORS if layout == "A" else _FILTER_FLAVORS
    return {name: BayesModelArgs(layout=layout, **kw) for name, kw in table.items()}


def with_overrides(args: BayesModelArgs, **kw) -> BayesModelArgs:
    return replace(args, **kw)
