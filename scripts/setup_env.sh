#!/usr/bin/env bash
# Create/refresh ./.venv with clipad-edge installed editable plus the export (torch), cpu (ONNX Runtime, OpenCV) and
# dev extras.
# --test also installs what the tests use besides Python packages (Debian packages, as root or with sudo -n).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The station tests use a real MQTT broker and a real browser (Debian packages, started by the tests on loopback);
# when they cannot be installed the setup fails (set -e), so CI fails instead of skipping those tests.
need=""
if [ "${1:-}" = "--test" ]; then
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need="$need mosquitto"
  command -v chromium >/dev/null 2>&1 || need="$need chromium"
  # The Jetson install rehearsal (tests/test_installs.py): Debian's OpenCV, built with GStreamer for numpy 1.x as
  # JetPack's is, in a --system-site-packages venv of the system Python.
  /usr/bin/python3 -c "import cv2, venv" >/dev/null 2>&1 || need="$need python3-opencv python3-venv"
  dpkg -s gstreamer1.0-plugins-base >/dev/null 2>&1 || need="$need gstreamer1.0-plugins-base"
fi
if [ -n "$need" ]; then
  if [ "$(id -u)" = "0" ]; then
    apt-get install -y -q $need >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q $need >/dev/null; }
  else
    sudo -n apt-get install -y -q $need >/dev/null
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e ".[export,cpu,dev]"
# ./.venv-serve: edge-serve's own environment (nvidia-pytriton's Triton Python-backend stub needs numpy<2, the rest
# of the toolkit uses numpy 2); the Triton tests start the real server from here. nvidia-pytriton exists for Linux
# x86-64 only: there a failed install fails the setup (and CI), elsewhere the server tests skip and say why.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  if [ ! -x .venv-serve/bin/python ]; then
    "$PY" -m venv .venv-serve
  fi
  .venv-serve/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv-serve/bin/python -m pip install -q -e ".[serve,cpu]"
fi
# ./.venv-modelopt: NVIDIA ModelOpt's own environment for `export-engine --int8-quantizer modelopt` (it pins
# onnxruntime-gpu and needs torch, neither of which may meet the user's ONNX Runtime); export-engine runs it as a
# child process named by CLIPAD_MODELOPT_PYTHON (the tests point it here). Made for the tests only (--test; 6.5 GB,
# the demo does not need it). Its CUDA wheels exist for Linux x86-64: there a failed install fails the setup,
# elsewhere the ModelOpt tests skip and say why.
if [ "${1:-}" = "--test" ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  if [ ! -x .venv-modelopt/bin/python ]; then
    "$PY" -m venv .venv-modelopt
  fi
  .venv-modelopt/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv-modelopt/bin/python -m pip install -q "nvidia-modelopt[onnx]==0.47.0"
fi
