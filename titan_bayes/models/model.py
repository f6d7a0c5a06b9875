"""The layer-layout decoder: Bayesian (B), Gated DeltaNet (D) and attention (A) blocks.

Top-level names follow torchtitan's llama (`tok_embeddings`, `layers` as a ModuleDict, `norm`,
`output`) so torchtitan's FSDP, activation checkpointing, compile and pipeline helpers apply.
Inside a block the names follow fla's Gated DeltaNet (`attn_norm`, `attn`, `mlp_norm`, `mlp`;
`q_proj` ... `o_proj`, `q_conv1d`, `o_norm`), so a GDN checkpoint maps onto a D or B layer
parameter for parameter (only `A_log` and `dt_bias` sit one level down, in `attn.head_params`,
because FSDP keeps that module in fp32).

Under tensor parallelism the mixers see plain local tensors holding their rank's heads (the
projections are colwise/rowwise sharded); parameters that are themselves DTensors (per-head
parameters, convolution channels, the shared per-head norm weight) are turned into local
tensors by `_local` at the point of use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from titan_bayes.ops import bayes_filter
from titan_bayes.ops import filter_math as fm

from .args import BayesModelArgs
from .recompute import doc_positions, gated_rms_norm, rms_norm, rope, short_conv_silu, swiglu


def _local(p: torch.Tensor, replicated: bool = False) -> torch.Tensor:
    """The rank-local part of a (possibly DTensor) parameter.

    A replicated parameter used on head-sharded activations gets a different gradient on every
    tensor-parallel rank (each sees its own heads): declare that gradient Partial so DTensor
    sums it over the ranks instead of trusting one of them.
    """
    if isinstance(p, DTensor):
        if replicated:
            return p.to_local(grad_placements=[Partial()] * p.device_mesh.ndim)
        return p.to_local()
    return p


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 → fp32; fp64 stays fp64, for exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cu_seqlens_from_doc_starts(doc_starts: torch.Tensor) -> torch.Tensor:
    """Boundaries of the flattened [1, B*T] stream: every row start and every document start."""
    B, T = doc_starts.shape
    starts = doc_starts.clone()
    starts[:, 0] = True
    idx = starts.reshape(-1).nonzero().flatten()
    end = torch.tensor([B * T], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, end]).to(torch.int64)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same math) that keeps its input for backward, not an fp32
    copy of it and of the normalised rows (recompute.rms_norm).

    On CUDA, F.rms_norm is already one fused kernel that saves only the input and a per-row
    reciprocal norm, and it is faster than the recomputing Function (measured on an H100: a
    340M transformer_lm step took 0.47 s with the Function, 0.42 s with the fused kernel, both
    with an fp32 SwiGLU Function; 0.31 s once that computed in bf16), so the Function serves
    the other devices, where F.rms_norm decomposes into fp32 ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:  # elementwise_affine=False: nothing of ours to save
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if isinstance(x, DTensor):
            # Sequence parallel: every rank normalises its own rows; the replicated weight's
            # gradient is then a sum over the ranks (Partial, see _local).
            y = self._norm(x.to_local(), _local(self.weight, replicated=True), eps)
            return DTensor.from_local(y, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())
        return self._norm(x, self.weight, eps)

    def _norm(self, x, weight, eps):
        if x.is_cuda:
            return F.rms_norm(x, self.normalized_shape, weight, eps)
        return rms_norm(x, weight, eps)


def _autocast_once(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, each nn.Linear casts an fp32 input to bf16 itself and keeps its own
    copy for backward: six copies of the normed input for a B/D layer's projections. Cast
    once here (the same values) so they share one."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.amp.is_autocast_available(device) \
            and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, then SiLU (fla's ShortConvolution semantics).

    weight [C, 1, W] as nn.Conv1d stores it; weight[:, 0, W-1] multiplies the current token.
    Taps never reach into a previous document: with doc_pos (each token's position in its
    document), lag j is dropped where doc_pos < j, so a document's outputs equal those of
    running it alone. With norm_dim the output is also L2-normalised per head of norm_dim
    channels (fla's l2norm of q and k), inside the same recomputing Function.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))

    def forward(self, x: torch.Tensor, doc_pos: torch.Tensor | None = None,
                norm_dim: int = 0) -> torch.Tensor:
        # Saves only x for backward: a per-op formula kept the SiLU input and output (and, with
        # documents, one masked copy of x per lag, which ran the 340M models out of memory).
        return short_conv_silu(x, _local(self.weight), doc_pos, norm_dim)

    def reset_parameters(self):
        # nn.Conv1d's default: uniform(±1/sqrt(fan_in)), fan_in = W for a depthwise conv.
        bound = 1.0 / math.sqrt(self.width)
        nn.init.uniform_(self.weight, -bound, bound)


class HeadParams(nn.Module):
    """Per-head filter parameters (Gated DeltaNet's decay, optional learned process noise).

    A separate module so FSDP can keep it in fp32 under bf16 mixed precision: exp(A_log) and
    the softplus bias set the memory's time constant and lose too much in 8 mantissa bits.
    """

    def __init__(self, n_heads: int, learned_noise: bool):
        super().__init__()
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        # q_t = exp(noise_log) · (1 − a_t²): 0 at init gives the stationary choice.
        self.noise_log = nn.Parameter(torch.empty(n_heads)) if learned_noise else None

    def forward(self):
        """(A_log, dt_bias, noise_log or None) as local fp32 tensors of this rank's heads.

        Read through a call, not as attributes: FSDP gathers a module's parameters in its
        forward pre-hook, and this module is an FSDP unit of its own (infra/parallelize.py).
        """
        noise = None if self.noise_log is None else _up(_local(self.noise_log))
        return _up(_local(self.A_log)), _up(_local(self.dt_bias)), noise

    def reset_parameters(self):
        # GDN/Mamba-2 init: A ~ U(1, 16) (decay rates), dt ~ logU(1e-3, 1e-1) through softplus⁻¹.
        with torch.no_grad():
            A = torch.empty_like(self.A_log).uniform_(1.0, 16.0)
            self.A_log.copy_(A.log())
            dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            if self.noise_log is not None:
                self.noise_log.zero_()


class FilterMixer(nn.Module):
    """The Bayesian Layer (mode "bayes") and Gated DeltaNet (mode "reset") token mixer.

    Design note §2: q, k, v from linear → short conv → SiLU (q, k then L2-normalised);
    decay g = −exp(A_log)·softplus(a_proj x + dt_bias); beta = sigmoid(b_proj x); the filter;
    a per-head RMSNorm gated by SiLU(g_proj x); the output projection.
    """

    def __init__(self, args: BayesModelArgs, mode: str):
        super().__init__()
        self.mode = mode
        self.n_heads, self.head_k_dim, self.head_v_dim = args.n_heads, args.head_k_dim, args.head_v_dim
        key_dim, value_dim = args.n_heads * args.head_k_dim, args.n_heads * args.head_v_dim
        self.q_proj = nn.Linear(args.dim, key_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, key_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, value_dim, bias=False)
        self.a_proj = nn.Linear(args.dim, args.n_heads, bias=False)
        self.b_proj = nn.Linear(args.dim, args.n_heads, bias=False)
        self.g_proj = nn.Linear(args.dim, value_dim, bias=False)
        self.q_conv1d = ShortConv(key_dim, args.conv_size)
        self.k_conv1d = ShortConv(key_dim, args.conv_size)
        self.v_conv1d = ShortConv(value_dim, args.conv_size)
        self.head_params = HeadParams(args.n_heads, learned_noise=(args.process_noise == "learned"
                                                                   and mode == "bayes"))
        self.o_norm = nn.RMSNorm(args.head_v_dim, eps=args.norm_eps)  # used via gated_rms_norm
        self.o_proj = nn.Linear(value_dim, args.dim, bias=False)
        self.process_noise = args.process_noise
        self.prior_scale = args.prior_scale
        self.backend = args.backend
        self.chunk_size = args.chunk_size_for(mode)
        # Filled by forward when a diagnostics pass asks for it (see collect_filter_diagnostics).
        self.record_diagnostics = False
        self.diagnostics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        K, V = self.head_k_dim, self.head_v_dim
        doc_pos = None if doc_starts is None else doc_positions(doc_starts)
        # q and k come L2-normalised per head (fla's l2norm: x / sqrt(|x|² + 1e-6), in fp32).
        # Local head count: under tensor parallelism this rank holds a slice of the heads.
        q = self.q_conv1d(self.q_proj(x), doc_pos, norm_dim=K).view(B, T, -1, K)
        k = self.k_conv1d(self.k_proj(x), doc_pos, norm_dim=K).view(B, T, -1, K)
        v = self.v_conv1d(self.v_proj(x), doc_pos).view(B, T, -1, V)

        A_log, dt_bias, noise_log = self.head_params()
        g = -A_log.exp() * F.softplus(_up(self.a_proj(x)) + dt_bias)  # [B, T, H] ≤ 0
        beta = torch.sigmoid(_up(self.b_proj(x)))
        # beta must stay in (0, 1]: sigmoid underflows to 0 for very negative inputs. The exact
        # filter also needs observation noise r = (1 − beta)/beta > 0 (pivots of the chunk
        # factorisation): keep r ≥ 1e-4 there (design note §6).
        beta = beta.clamp(min=1e-6, max=(1 - 1e-4) if self.mode == "bayes" else 1.0)
        process_noise = None
        if self.mode == "bayes" and self.process_noise == "zero":
            process_noise = torch.zeros_like(g)
        elif self.mode == "bayes" and self.process_noise == "learned":
            process_noise = noise_log.exp() * fm.stationary_process_noise(g)

        cu_seqlens = None
        if doc_starts is not None:
            # Documents restart the filter at (0, prior): flatten the batch into one stream
            # and give the op every row start and document start.
            cu_seqlens = cu_seqlens_from_doc_starts(doc_starts)
            q, k, v, g, beta = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, g, beta))
            if process_noise is not None:
                process_noise = process_noise.reshape(1, B * T, -1)
        o, _ = bayes_filter(q, k, v, g, beta, mode=self.mode, process_noise=process_noise,
                            prior_scale=self.prior_scale, cu_seqlens=cu_seqlens,
                            backend=self.backend, chunk_size=self.chunk_size, check_inputs=False)
        if self.record_diagnostics:
            self._diagnose(q, k, v, g, beta, process_noise, cu_seqlens)
        o = o.reshape(B, T, -1, V)

        gate = self.g_proj(x).view(B, T, -1, V)
        w = _local(self.o_norm.weight, replicated=True)
        o = gated_rms_norm(o, gate, w, self.o_norm.eps)  # rms_norm(o) · w · silu(gate), fp32 inside
        return self.o_proj(o.reshape(B, T, -1))

    @torch.no_grad()
    def _diagnose(self, q, k, v, g, beta, process_noise, cu_seqlens):
        """Mean write gain, trace(P)/K at the end of each sequence, mean predictive variance.

        The write gain w/(r + w), w = kᵀP̄k, is not an output of the op, but the posterior
        variance along the key is: kᵀP_t k = w − w²/(r + w) = r · gain. We read it by running
        the filter once more with the keys as queries (output_variance = scale²·qᵀP_t q).
        """
        if self.mode != "bayes":
            return
        K = q.shape[-1]
        scale = K ** -0.5
        common = dict(mode="bayes", process_noise=process_noise, prior_scale=self.prior_scale,
                      cu_seqlens=cu_seqlens, backend=self.backend, chunk_size=self.chunk_size,
                      check_inputs=False, output_variance=True)
        _, state, var_q = bayes_filter(q, k, v, g, beta, output_final_state=True, **common)
        _, _, var_k = bayes_filter(k, k, v, g, beta, **common)
        r = fm.observation_noise(beta.float())
        p_post = var_k.float() / scale ** 2
        gain = (p_post / r).clamp(0, 1)
        P = state[1]
        self.diagnostics = {
            "write_gain": gain.mean(),
            "trace_P_over_K": torch.diagonal(P, dim1=-2, dim2=-1).sum(-1).mean() / K,
            "pred_variance": var_q.float().mean(),
        }


class Attention(nn.Module):
    """Causal softmax attention: RoPE (rotate-half), grouped-query heads, SDPA.

    With doc_starts the mask is block-causal (a token sees only its own document). RoPE scores
    depend on relative positions only, so no per-document position reset is needed.
    """

    def __init__(self, args: BayesModelArgs):
        super().__init__()
        self.head_dim = args.dim // args.attn_n_heads
        n_kv = args.attn_n_kv_heads or args.attn_n_heads
        self.q_proj = nn.Linear(args.dim, args.attn_n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(args.attn_n_heads * self.head_dim, args.dim, bias=False)
        self.rope_theta = args.rope_theta

    def forward(self, x: torch.Tensor, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        dtype = torch.promote_types(x.dtype, torch.float32)  # angles in fp32 (fp64 for tests)
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, hd, 2, device=x.device, dtype=dtype) / hd))
        # RoPE on the projections' own [B, T, H, D] layout (contiguous), then heads first for SDPA.
        q = rope(self.q_proj(x).view(B, T, -1, hd), inv_freq).transpose(1, 2)
        k = rope(self.k_proj(x).view(B, T, -1, hd), inv_freq).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        gqa = q.shape[1] != k.shape[1]
        if doc_starts is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            doc_id = doc_starts.to(torch.int32).cumsum(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = (doc_id[:, :, None] == doc_id[:, None, :]) & causal
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """fla's GatedMLP / llama's FeedForward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        # down_proj stays a module call (tensor parallelism shards it rowwise through hooks).
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, layer_id: int, letter: str, args: BayesModelArgs):
        super().__init__()
        self.letter = letter
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attn = Attention(args) if letter == "A" else FilterMixer(args, args.layer_mode(letter))
        self.mlp_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.mlp = SwiGLU(args.dim, args.mlp_dim)
        # GPT-2 / fla "prenorm residual rescale": the two projections that write into the
        # residual stream start smaller the deeper the network.
        self.residual_std = 0.02 / math.sqrt(2 * args.n_layers)

    def forward(self, x: torch.Tensor, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attn(_autocast_once(self.attn_norm(x)), doc_starts)
        return h + self.mlp(_autocast_once(self.mlp_norm(h)))

    def init_weights(self):
        for norm in (self.attn_norm, self.mlp_norm):
            norm.reset_parameters()
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = self.residual_std if name in ("attn.o_proj", "mlp.down_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (ShortConv, HeadParams, nn.RMSNorm)):
                module.reset_parameters()


class BayesLM(nn.Module):
    """Embedding → blocks of the layout → RMSNorm → output projection (untied)."""

    def __init__(self, model_args: BayesModelArgs):
        super().__init__()
        model_args.validate()
        self.model_args = model_args
        self.vocab_size = model_args.vocab_size
        self.n_layers = model_args.n_layers
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, letter, model_args)
                                     for i, letter in enumerate(model_args.full_layout)})
        self.norm = RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.output = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        self.last_input = None

    def init_weights(self, buffer_device: torch.device | None = None):
        # Called after to_empty() on the (possibly sharded) model; works on DTensors too.
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=0.02)
        for layer in self.layers.values():
            if layer is not None:
                layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, dim] in a later pipeline stage) → logits.

        doc_starts [B, T] bool, True where a new document starts: B/D layers restart their
        filter from the prior there, convolutions do not reach back across it, attention is
        block-causal. (With pipeline parallelism only the first stage receives it.)
        """
        if doc_starts is not None and not bool(doc_starts[:, 1:].any()):
            # Every row is one document (e.g. MQAR): the plain batched path is the same
            # computation without the packing into documents (and keeps attention on its
            # fused causal kernel). One host sync per forward.
            doc_starts = None
        if not tokens.is_floating_point():
            # Kept (a reference, one row) for the filter diagnostics of a log step.
            self.last_input = (tokens[:1].detach(), None if doc_starts is None else doc_starts[:1])
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
        else:
            # A later pipeline stage. torch's PipelineStage infers shapes by running the stage
            # once on uninitialised memory; NaN or huge values there would trip the filter's
            # positive-definiteness check. Real hidden states are finite and far below the
            # clamp, so this changes nothing in training.
            h = torch.nan_to_num(tokens, nan=0.0, posinf=0.0, neginf=0.0).clamp(-1e4, 1e4)
        for layer in self.layers.values():
            h = layer(h, doc_starts)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


@torch.no_grad()
def collect_filter_diagnostics(model: nn.Module, tokens: torch.Tensor,
                               doc_starts: torch.Tensor | None = None) -> dict[str, float]:
    """Run `model` once on `tokens` and return per-layer filter diagnostics of its B layers."""
    mixers = {name: m for name, m in model.named_modules() if isinstance(m, FilterMixer)}
    for m in mixers.values():
        m.record_diagnostics = True
    try:
        model(tokens, doc_starts)
    finally:
        for m in mixers.values():
            m.record_diagnostics = False
    out = {}
    for name, m in mixers.items():
        layer = name.split(".")[1] if name.startswith("layers.") else name
        for key, value in m.diagnostics.items():
            out[f"filter/layer{layer}/{key}"] = float(value)
        m.diagnostics = {}
    return out
