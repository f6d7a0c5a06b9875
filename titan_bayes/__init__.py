"""titan_bayes: Bayesian-Layer language models (exact Kalman-filter memory) for torchtitan."""

__version__ = "0.1.0"
