"""The math of the design note (shared/design/bayesian-layer.md), in one place.

Read this module next to the note. Every implementation of the filter (the token-by-token
reference, the chunked PyTorch path, the Triton kernels, the model's diagnostics and the
tests' closed forms) calls these functions instead of re-deriving them.

Layouts. Per (sequence, head) the memory mean is stored as ``S = Mᵀ`` with shape [K, V]
(fla's state layout), the key-space covariance ``P`` as [K, K]. Functions below work on
tensors with any number of leading batch dimensions (usually [N, H]).

Notation (note §1): a_t = exp(g_t) the decay, q_t the process-noise variance (called
``noise`` here, to keep ``q`` for queries), r_t = (1 − beta_t) / beta_t the observation noise.
"""

from __future__ import annotations

import math

import torch

MODES = ("bayes", "reset", "additive")

# Note §6: the innovation variance s_t >= r_t is a pivot of the chunk's LDLᵀ factorisation.
# beta_t = 1 would make r_t = 0 and a repeated key would then give a zero pivot; clamping
# r_t from below (beta_t <= 1 / (1 + R_MIN) ~ 0.9999) keeps the pivots away from zero.
R_MIN = 1e-4


# ---------------------------------------------------------------------------------------
# Parametrisation (note §2)
# ---------------------------------------------------------------------------------------
def observation_noise(beta: torch.Tensor) -> torch.Tensor:
    """r_t = (1 − beta_t) / beta_t, clamped below at R_MIN (note §6)."""
    return ((1.0 - beta) / beta).clamp_min(R_MIN)


def stationary_process_noise(g: torch.Tensor) -> torch.Tensor:
    """q_t = 1 − a_t² = −expm1(2 g_t): an unobserved direction keeps variance 1 forever."""
    return -torch.expm1(2.0 * g)


# ---------------------------------------------------------------------------------------
# One token (note §1 for bayes, §3 for reset / additive)
# ---------------------------------------------------------------------------------------
def filter_step(mode, S, P, q_t, k_t, v_t, a_t, beta_t, noise_t, scale):
    """Advance the belief by one token and read it out.

    S [..., K, V], P [..., K, K] or None, q_t / k_t [..., K], v_t [..., V],
    a_t / beta_t / noise_t [...]. Returns (S, P, o_t [..., V], variance_t [...]).
    """
    a = a_t[..., None, None]
    if mode == "bayes":
        S_pred = a * S                                           # M̄ = a M
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        P_pred = a * a * P + noise_t[..., None, None] * eye      # P̄ = a² P + q I
        u = (P_pred @ k_t[..., None])[..., 0]                    # write direction u = P̄ k
        s = observation_noise(beta_t) + (k_t * u).sum(-1)        # innovation variance
        innovation = v_t - (S_pred * k_t[..., None]).sum(-2)     # v − M̄ k
        S = S_pred + u[..., :, None] * innovation[..., None, :] / s[..., None, None]
        P = P_pred - u[..., :, None] * u[..., None, :] / s[..., None, None]
    elif mode == "reset":
        # Covariance reset (P̄ = I) with the gain 1/s replaced by beta: the gated delta rule.
        S_pred = a * S
        innovation = v_t - (S_pred * k_t[..., None]).sum(-2)
        S = S_pred + beta_t[..., None, None] * k_t[..., :, None] * innovation[..., None, :]
    elif mode == "additive":
        S = a * S + beta_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    o_t = scale * (S * q_t[..., None]).sum(-2)
    if mode == "bayes":
        variance_t = scale * scale * (q_t * (P @ q_t[..., None])[..., 0]).sum(-1)
    else:
        variance_t = torch.zeros_like(a_t)
    return S, P, o_t, variance_t


# ---------------------------------------------------------------------------------------
# One chunk of C tokens (note §4), written in a numerically stable form
# ---------------------------------------------------------------------------------------
# The note writes the chunk in the decay-free frame (K̃ = diag(Γ) K, c_t = Σ q_j / Γ_j²,
# Z = L⁻¹ X). Γ_t underflows quickly for strong decays (Gated DeltaNet's g reaches −16 per
# token), so 1/Γ overflows in fp32. We use the same algebra with only *relative* decays:
#   Λ_ts = Γ_t / Γ_s = exp(logΓ_t − logΓ_s) ≤ 1 for s ≤ t,
#   d_t  = Γ_t² c_t = Σ_{j≤t} Λ_tj² q_j   (process noise accumulated in the real frame),
#   u_t  = Γ_t z_t = P̄_t k_t                (the write direction of token t, bounded).
# Then S = K̃ P0 K̃ᵀ + (K Kᵀ) ∘ Ψ + R with Ψ_ts = Λ_ts d_s (t ≥ s, symmetric), S = L D Lᵀ,
# U = (L ∘ Λ)⁻¹ [diag(Γ) K̃ P0 + diag(d) K], E = L⁻¹ (V − K̃ S0) and
#   O   = scale · [diag(Γ) Q S0 + (tril(Q Uᵀ) ∘ Λ) D⁻¹ E]
#   S_C = Γ_C S0 + Uᵀ diag(Λ_C· / D) E
#   P_C = Γ_C² P0 + d_C I − Uᵀ diag(Λ_C·² / D) U.
# (L ∘ Λ) = diag(Γ) L diag(Γ)⁻¹, so U = diag(Γ) Z exactly; every factor stays ≤ 1.
# Reset and additive share the mean formulas with U = K and D⁻¹ = diag(beta).


def chunk_decays(g_chunk: torch.Tensor):
    """g [..., C] → (log_gamma [..., C], decay [..., C, C]) with decay_ts = Λ_ts (0 for s > t)."""
    log_gamma = g_chunk.cumsum(-1)
    C = g_chunk.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=g_chunk.device).tril()
    diff = log_gamma[..., :, None] - log_gamma[..., None, :]
    # Mask before exp: the upper triangle holds positive exponents that may overflow.
    decay = torch.where(causal, diff, torch.full_like(diff, -math.inf)).exp()
    return log_gamma, decay


def accumulated_noise(decay: torch.Tensor, noise_chunk: torch.Tensor) -> torch.Tensor:
    """d_t = Σ_{j≤t} Λ_tj² q_j, the variance the dynamics add between chunk start and t."""
    return ((decay * decay) @ noise_chunk[..., None])[..., 0]


def noise_kernel(decay: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Ψ_ts = Λ_ts d_s for t ≥ s, symmetric: the covariance the process noise adds between
    observations t and s (per unit of k_t · k_s)."""
    lower = decay * d[..., None, :]
    return lower + lower.transpose(-1, -2) - torch.diag_embed(d)


def chunk_covariance(k_chunk, P0, log_gamma, decay, d, r):
    """The covariance pass of one chunk (mode "bayes"); it does not depend on values.

    k_chunk [..., C, K], P0 [..., K, K], log_gamma / d / r [..., C], decay [..., C, C].
    Returns (L, w, U, P_C, info): L unit lower-triangular with S = L D Lᵀ, w = 1/D (the
    Kalman gains 1/s_t), U [..., C, K] the write directions, P_C the covariance at the chunk
    end and info the Cholesky status (non-zero where S was not positive definite).
    """
    gamma = log_gamma.exp()
    k_tilde = gamma[..., None] * k_chunk
    k_tilde_P0 = k_tilde @ P0
    S = k_tilde_P0 @ k_tilde.transpose(-1, -2)
    S = S + (k_chunk @ k_chunk.transpose(-1, -2)) * noise_kernel(decay, d)
    S = 0.5 * (S + S.transpose(-1, -2)) + torch.diag_embed(r)
    G, info = torch.linalg.cholesky_ex(S)
    pivots = torch.diagonal(G, dim1=-2, dim2=-1)                 # sqrt(s_t)
    L = G / pivots[..., None, :]                                 # unit lower triangle
    w = 1.0 / (pivots * pivots)                                  # D⁻¹
    X = gamma[..., None] * k_tilde_P0 + d[..., None] * k_chunk   # rows Γ_t² P0 k_t + d_t k_t
    U = torch.linalg.solve_triangular(L * decay, X, upper=False, unitriangular=True)
    last = decay[..., -1, :]                                     # Λ_C,s
    gamma_C = gamma[..., -1, None, None]
    eye = torch.eye(P0.shape[-1], dtype=P0.dtype, device=P0.device)
    P_C = gamma_C * gamma_C * P0 + d[..., -1, None, None] * eye
    P_C = P_C - U.transpose(-1, -2) @ ((last * last * w)[..., None] * U)
    P_C = 0.5 * (P_C + P_C.transpose(-1, -2))
    return L, w, U, P_C, info


def delta_rule_system(k_chunk, beta_chunk, decay):
    """The reset mode's unit lower-triangular L: L_ts = Λ_ts beta_s k_t · k_s for s < t."""
    C = k_chunk.shape[-2]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=k_chunk.device).tril(-1)
    A = (k_chunk @ k_chunk.transpose(-1, -2)) * decay * beta_chunk[..., None, :]
    eye = torch.eye(C, dtype=k_chunk.dtype, device=k_chunk.device)
    return eye + torch.where(strictly_lower, A, torch.zeros_like(A))


def chunk_innovations(L, k_chunk, v_chunk, S0, log_gamma):
    """E = L⁻¹ (V − K̃ S0): the sequential filter's innovations v_t − M̄_t k_t of the chunk."""
    predicted = (log_gamma.exp()[..., None] * k_chunk) @ S0
    return torch.linalg.solve_triangular(L, v_chunk - predicted, upper=False, unitriangular=True)


def chunk_readout(q_chunk, S0, log_gamma, decay, U, w, E, scale):
    """Outputs of the chunk and its end mean (shared by all three modes).

    O = scale · [diag(Γ) Q S0 + (tril(Q Uᵀ) ∘ Λ) D⁻¹ E],  S_C = Γ_C S0 + Uᵀ diag(Λ_C· w) E.
    """
    gamma = log_gamma.exp()
    weighted = w[..., None] * E
    scores = (q_chunk @ U.transpose(-1, -2)) * decay             # decay is 0 above the diagonal
    O = scale * (gamma[..., None] * (q_chunk @ S0) + scores @ weighted)
    last = decay[..., -1, :]
    S_C = gamma[..., -1, None, None] * S0 + U.transpose(-1, -2) @ (last[..., None] * weighted)
    return O, S_C


def chunk_variance(q_chunk, P0, log_gamma, decay, d, U, w, scale):
    """scale² q_tᵀ P_t q_t for every t of the chunk, P_t = Γ_t² P0 + d_t I − Σ_s Λ_ts² u_s u_sᵀ / s_s."""
    gamma = log_gamma.exp()
    prior_part = gamma * gamma * (q_chunk * (q_chunk @ P0)).sum(-1) + d * (q_chunk * q_chunk).sum(-1)
    scores = (q_chunk @ U.transpose(-1, -2)) * decay
    return scale * scale * (prior_part - (scores * scores * w[..., None, :]).sum(-1))


# ---------------------------------------------------------------------------------------
# Closed forms (note §7)
# ---------------------------------------------------------------------------------------
def repeated_key_gains(a2: float, r: float, steps: int, p0: float = 1.0) -> list[float]:
    """Write gains g_t = p̄_t / (r + p̄_t) for one unit key written `steps` times with constant
    a², r and stationary process noise 1 − a² (the scalar Riccati recursion)."""
    gains, p = [], p0
    for _ in range(steps):
        p_pred = a2 * p + (1.0 - a2)
        gains.append(p_pred / (r + p_pred))
        p = r * p_pred / (r + p_pred)
    return gains


def steady_state_gain(a2: float, r: float) -> float:
    """The floor of repeated_key_gains: p̄* solves p̄² + (1 − a²)(r − 1) p̄ − (1 − a²) r = 0."""
    b = (1.0 - a2) * (r - 1.0)
    c = -(1.0 - a2) * r
    p_pred = (-b + math.sqrt(b * b - 4.0 * c)) / 2.0
    return p_pred / (r + p_pred)
