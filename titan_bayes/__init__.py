"""titan_bayes: Bayesian-Layer language models (exact Kalman-filter memory) for torchtitan.

Importing the package registers the TrainSpecs `bayes_lm`, `bayes_hybrid`, `gdn_lm` and
`transformer_lm` with torchtitan (`--experimental.custom_import titan_bayes`).
"""

__version__ = "0.1.0"

from . import train_specs  # noqa: E402,F401  (registers the specs)
