#!/usr/bin/env bash
# Quick start, tests: set up and run the whole suite (slow ViT-L-14-336@518 golden tests included).
# Needs ../shared (golden outputs, Crane checkpoints, magnetic_tile images) beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
# The real-size tests write ViT-L exports under the temp folder (a passed test's folder is removed as it ends): the
# suite's peak was 3.6 GB of that disk on a clean clone (docs/measurements/operations.md). A full disk halfway through
# shows as hundreds of errors, so say it before the first test.
tmp="${TMPDIR:-/tmp}"
free_gb=$(df -Pk "$tmp" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 6 ]; then
    echo "scripts/test.sh: only ${free_gb} GB free under $tmp; the suite needs about 6 GB (set TMPDIR elsewhere or free space)" >&2
    exit 2
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
