"""bayes' check that every chunk's innovation covariance S stayed positive definite, without
making the host wait for the GPU in the middle of a training step.

The chunked kernels cannot raise: a chunk whose LDLᵀ pivot s_t = 1/w_t is not positive leaves
NaN in w (√w of w < 0) and in everything after it. The forward therefore reduces w and the
final covariances to one flag on the GPU (`status`), and somebody has to read it back.

Reading it at the end of the forward (`.item()`) makes the host wait for the whole forward
before it launches anything else, once per Bayesian layer. So when a backward will follow, the
forward only queues a copy of the flag to pinned host memory and records an event
(`check_later`); the backward reads it (`check_pending`) once it has launched its kernels, so
the GPU has work queued while the host waits for that copy, and before it returns any
gradient. In a model the copy has long landed by then (later layers, the loss and their
backwards ran in between). Without gradients the forward checks at once.

Measured on an H100 (tools/profile_kernels.py --modes bayes, wall time minus the kernels' sum,
per fwd+bwd of one layer): at (8, 4096, 8, 128, 128) the GPU sat idle 1.87 ms with the
read-back in the forward, 0.91 ms with no check at all, 1.22–1.35 ms with this one; at
(8, 4096, 6, 256, 512) 1.25, 0.49 and 1.09 ms. A lone layer still waits once per step for its
own forward; in a model only the last layer's backward can.

What a user sees: with gradients, a forward whose S lost positive definiteness returns NaNs and
the error is raised when the backward reaches that layer, before that layer returns its
gradients (so before any optimizer step). A forward run with gradients enabled whose backward never runs
is not checked.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

# status.data_ptr() -> (status, its host copy, the event after the copy or None on a CPU). The
# entry holds status itself, so no other tensor can take its address while the entry exists:
# the key stays unambiguous. The backward pops its entry; a forward whose backward never runs
# leaves one behind, and the oldest are dropped beyond MAX_PENDING (unchecked).
_PENDING: OrderedDict[int, tuple] = OrderedDict()
MAX_PENDING = 4096


def pivot_status(w, p_final):
    """int32 [1] on w's device: 1 if every pivot s_t = 1/w_t is positive and finite and every
    final covariance is finite (an fp16 overflow of the write directions makes every later P
    infinite or NaN), else 0. Queues a few reductions; reads nothing back."""
    ok = (torch.isfinite(w) & (w > 0)).all() & torch.isfinite(p_final).all()
    return ok.to(torch.int32).reshape(1)


def check_later(status):
    """Queue the copy of `status` to the host; check_pending(status, ...) reads it."""
    if status.is_cuda:
        host = torch.empty(status.shape, dtype=status.dtype, pin_memory=True)
        host.copy_(status, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
    else:                                   # Triton's interpreter: already computed, nothing to wait for
        host, copied = status, None
    _PENDING[status.data_ptr()] = (status, host, copied)
    while len(_PENDING) > MAX_PENDING:
        _PENDING.popitem(last=False)


def check_now(status, writes):
    """Raise if `status` (pivot_status's flag) says S lost positive definiteness; waits for the
    GPU to compute it."""
    if not bool(status.item()):
        raise_not_positive_definite(writes)


def check_pending(status, writes):
    """The backward's half of check_later: raise if the flag that check_later queued says S lost
    positive definiteness, waiting only for its copy, not for the work queued after it.
    Nothing to do when the forward checked at once (or its entry was dropped)."""
    pending = _PENDING.pop(status.data_ptr(), None)
    if pending is None:
        return
    _, host, copied = pending
    if copied is not None:
        copied.synchronize()
    if not bool(host.item()):
        raise_not_positive_definite(writes)


def raise_not_positive_definite(writes):
    """The error for a failed check. writes: the saved write directions Ũ (fp16 for 16-bit keys,
    chunk_fwd.write_dtype): an overflow leaves inf there, an indefinite S leaves NaN."""
    if writes.dtype == torch.float16 and bool(torch.isinf(writes).any()):
        raise ValueError(
            "bayes_filter: the covariance became infinite: the write directions P̄k/√s overflowed "
            "float16, in which the Triton backend keeps them for 16-bit keys. Their size is about "
            "√(largest variance of P) times |k|: use unit-norm keys and a prior_scale or initial "
            "covariance of moderate size, or pass fp32 inputs.")
    raise ValueError(
        "bayes_filter: the innovation covariance of a chunk is not positive definite. "
        "This happens when beta is too close to 1 for repeated keys, or when the prior or "
        "initial P is not positive definite; keep beta <= 0.999 or raise prior_scale.")
