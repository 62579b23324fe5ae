#!/usr/bin/env bash
# Installs mrl-kernels (editable) and what it needs into the current python (or $PYTHON).
#   bash scripts/setup.sh          the library and the demo's needs
#   bash scripts/setup.sh test     ... plus the test and benchmark tools
# Without an NVIDIA GPU, torch is pinned to the CPU build first: an unpinned `torch` requirement would
# pull a CUDA build of several GB that this machine cannot use.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=demo
[ "${1:-}" = test ] && extras=demo,test,bench
pip=("${PYTHON:-python}" -m pip install --quiet --disable-pip-version-check)
if ! "${PYTHON:-python}" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" "torch>=2.4"
    else
        "${pip[@]}" "torch==2.13.0"
    fi
fi
"${pip[@]}" -e ".[$extras]"
