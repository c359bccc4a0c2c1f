#!/usr/bin/env bash
# Quick start, tests: set up and run the whole suite (slow ViT-L-14-336@518 golden tests included).
# Needs ../shared (golden outputs, Crane checkpoints, magnetic_tile images) beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
# The real-size tests write ~8 GB of exports under the temp folder; a full disk halfway through shows as hundreds of
# errors, so say it before the first test.
tmp="${TMPDIR:-/tmp}"
free_gb=$(df -Pk "$tmp" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 10 ]; then
    echo "scripts/test.sh: only ${free_gb} GB free under $tmp; the suite needs about 10 GB (set TMPDIR elsewhere or free space)" >&2
    exit 2
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
