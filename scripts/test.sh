#!/usr/bin/env bash
# Sets up a fresh machine and runs the CPU test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: the CPU wheel. An unpinned torch would pull a multi-GB CUDA build.
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q tests "$@"
