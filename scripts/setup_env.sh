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
# of the toolkit uses numpy 2); the Triton tests start the real server from here. nvidia-pytriton exists for Linux
# x86-64 only: there a failed install fails the setup (and CI), elsewhere the server tests skip and say why.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  if [ ! -x .venv-serve/bin/python ]; then
    "$PY" -m venv .venv-serve
  fi
  .venv-serve/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv-serve/bin/python -m pip install -q -e ".[serve]"
fi
