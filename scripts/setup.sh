#!/usr/bin/env bash
# Installs mrl-kernels (editable) and what it needs into the current python (or $PYTHON).
#   bash scripts/setup.sh          the library and the demo's needs
#   bash scripts/setup.sh test     ... plus the test and benchmark tools and sentence-transformers (the `st`
#                                  extra), at the known-good versions of constraints/test.txt (triton 3.6
#                                  among them), so a test run is reproducible
# Without an NVIDIA GPU, torch is pinned to the CPU build first: an unpinned `torch` requirement would
# pull a CUDA build of several GB that this machine cannot use. A torch that is already there is kept.
# Run as root where apt-get exists, it also installs the demos' real data from Debian (Fashion-MNIST, WordNet);
# elsewhere it says so and goes on: the loaders in mrl_kernels.datasets also read a directory you pass them.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
pip=("$py" -m pip install --quiet --disable-pip-version-check)
extras=demo
constraints=()
if [ "${1:-}" = test ]; then
    extras=demo,test,bench,st
    constraints=(-c constraints/test.txt)
fi
if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" "torch>=2.4"
    else
        "${pip[@]}" "torch==2.13.0"
    fi
fi
# A CUDA build of torch requires the one triton it was built with; a second pin would make pip give up.
if ((${#constraints[@]})) && "$py" - <<'PY'
import importlib.metadata as md, sys
sys.exit(0 if any(r.startswith("triton") for r in md.requires("torch") or []) else 1)
PY
then
    grep -v '^triton==' constraints/test.txt > "${TMPDIR:-/tmp}/mrl-kernels-constraints.txt"
    constraints=(-c "${TMPDIR:-/tmp}/mrl-kernels-constraints.txt")
fi
"${pip[@]}" "${constraints[@]}" -e ".[$extras]"

# The demos' data: dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/) and wordnet-base (/usr/share/wordnet/).
# Never fatal. apt-get update runs only when the install fails without it (package lists absent or stale).
debian_data() {
    local missing=()
    [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || missing+=(dataset-fashion-mnist)
    [ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
    ((${#missing[@]})) || return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "setup.sh: not root with apt-get, so not installing ${missing[*]}; the demos need them" \
             "(apt-get install ${missing[*]}) or a data directory passed to the loaders" >&2
        return 0
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}")
    if ! "${apt[@]}" >/dev/null 2>&1 && ! { apt-get update -qq >/dev/null 2>&1 && "${apt[@]}" >/dev/null 2>&1; }; then
        echo "setup.sh: warning: could not install ${missing[*]} with apt-get; the demos need them" \
             "or a data directory passed to the loaders" >&2
    fi
}
debian_data
