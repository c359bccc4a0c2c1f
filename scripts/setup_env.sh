#!/usr/bin/env bash
# Create/refresh ./.venv with clipad-edge installed editable plus the export (torch) and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e ".[export,dev]"
# ./.venv-serve: edge-serve's own environment (nvidia-pytriton's Triton Python-backend stub needs numpy<2, the rest
# of the toolkit uses numpy 2); the Triton tests start the real server from here. Skipped where the wheel does not
# install (it is Linux x86-64 only): those tests then say so.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  if [ ! -x .venv-serve/bin/python ]; then
    "$PY" -m venv .venv-serve
  fi
  .venv-serve/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv-serve/bin/python -m pip install -q -e ".[serve]" || echo "WARNING: clipad-edge[serve] did not install; the Triton server tests will be skipped"
fi
