#!/usr/bin/env bash
# Quick start, tests: set up and run the whole suite (slow ViT-L-14-336@518 golden tests included).
# Needs ../shared (golden outputs, Crane checkpoints, magnetic_tile images) beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
