"""Fused Triton kernels for the filter, installed as `titan_bayes.kernels` (see pyproject.toml).

Not written yet: `backend="triton"` raises, and `backend="auto"` uses the chunked PyTorch path.
"""


def kernel_supports(mode, q) -> bool:
    """Whether a Triton kernel exists for this mode and these tensors."""
    return False


def triton_bayes_filter(*args, **kwargs):
    raise NotImplementedError(
        "bayes_filter: backend='triton' has no kernel yet; use backend='chunked' or 'auto'")
