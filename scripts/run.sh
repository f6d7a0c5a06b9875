#!/usr/bin/env bash
# Sets up a fresh machine and runs the main job (the README's first command): the debug
# config, a 4-layer Bayesian-Layer LM on the WikiText-2 sample shipped in the package.
# Offline; CPU (gloo) or GPU. Extra arguments go to the launcher, e.g. --training.steps 50.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: on a CPU machine this is the CPU wheel (an unpinned torch would pull a
# multi-GB CUDA build); a machine that already has torch keeps it.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e .
python3 -m titan_bayes.train --job.config_file train_configs/debug.toml "$@"
