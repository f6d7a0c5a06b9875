#!/usr/bin/env bash
# Sets up a fresh machine and runs the main job (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: on a CPU machine this is the CPU wheel; a GPU machine keeps its own torch.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e .
python3 tools/filter_demo.py
