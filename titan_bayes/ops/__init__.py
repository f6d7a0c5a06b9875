"""The design-model filter op. `bayes_filter` is the single entry point; see api.py."""

from .api import BACKENDS, DEFAULT_CHUNK_SIZES, bayes_filter
from .filter_math import MODES

__all__ = ["bayes_filter", "BACKENDS", "DEFAULT_CHUNK_SIZES", "MODES"]
