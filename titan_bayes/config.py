"""The custom JobConfig merged into torchtitan's (`[job] custom_config_module = "titan_bayes.config"`).

Adds two TOML sections: `[bayes]` (the model's filter options, below) and `[bayes_data]`
(tokenizer and dataset options, owned by titan_bayes/data/config.py). torchtitan rejects unknown
keys in any section; unknown *values* are rejected by BayesModelArgs.validate with a message
naming the key and the allowed values.
"""

from dataclasses import dataclass, field

from titan_bayes.data.config import BayesData


@dataclass
class Bayes:
    # Override the filter mode of every B/D layer: "" keeps the layout letters (B = "bayes",
    # D = "reset"); "bayes", "reset" or "additive" forces one design model everywhere.
    mode: str = ""
    # Tokens per chunk of the chunk-parallel filter (design note §4). 0: each layer takes the
    # fastest for its design model (bayes 32, reset and additive 64; ops/api.py DEFAULT_CHUNK_SIZES).
    chunk_size: int = 0
    # Filter implementation: "auto" (Triton kernels on a GPU once available, else "chunked"),
    # "chunked" (PyTorch, exact), "sequential" (token by token, slow; for checks), "triton".
    backend: str = "auto"
    # Process noise of the Bayesian layers: "stationary" (q = 1 − a², an unobserved direction
    # keeps variance 1), "zero" (q = 0: memory only sharpens), "learned" (q = exp(θ_h)(1 − a²),
    # one parameter per head, θ = 0 at init).
    process_noise: str = "stationary"
    # Prior covariance prior_scale · I at every document start.
    prior_scale: float = 1.0
    # Layer layout over B (Bayesian), D (Gated DeltaNet), A (attention), repeated to n_layers;
    # "" keeps the spec's default (bayes_lm "B", bayes_hybrid "BBBA", gdn_lm "D", transformer_lm "A").
    layout: str = ""
    # Filter head shape overrides for B/D layers (0 keeps the flavor's): number of heads,
    # key size K (the covariance is K × K per head) and value size V.
    n_heads: int = 0
    head_k_dim: int = 0
    head_v_dim: int = 0
    # 0: the vocabulary follows the tokenizer (padded to a multiple of 64); else this size.
    vocab_size: int = 0
    # Log per-layer filter diagnostics (mean write gain, trace(P)/K, mean predictive variance)
    # at log steps; costs one extra forward of one sequence per log step.
    diagnostics: bool = True


@dataclass
class JobConfig:
    bayes: Bayes = field(default_factory=Bayes)
    bayes_data: BayesData = field(default_factory=BayesData)
