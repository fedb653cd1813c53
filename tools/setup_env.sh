#!/usr/bin/env bash
# Set up everything deformable_family needs, then print the Python interpreter to use (last line).
#
#   bash tools/setup_env.sh                      # virtual environment in .venv inside the clone
#   DF_USE_ACTIVE_ENV=1 bash tools/setup_env.sh  # the active environment (e.g. detectron2 from GitHub)
#
# Steps: torch/torchvision (only when torch is not importable yet), the pure-Python dependencies,
# detectron2 (used as it is when it imports; otherwise v0.6 from PyPI without its compiled ops, see
# tools/install_detectron2.py), then this package with its extension deformable_family._C.
# A stamp of the inputs (requirements, setup.py, kernels/, FORCE_CUDA, TORCH_CUDA_ARCH_LIST) makes a
# re-run on a set-up machine take seconds. Progress goes to stderr; stdout holds only the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "[setup] $*" >&2; }

if [ "${DF_USE_ACTIVE_ENV:-0}" = "1" ]; then
  PY="$(command -v python || command -v python3)"
  log "using the active environment: $PY"
else
  if [ ! -x .venv/bin/python ]; then
    log "creating the virtual environment .venv"
    python3 -m venv .venv >&2
  fi
  PY="$ROOT/.venv/bin/python"
fi
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
  # torch otherwise guesses /usr/local when nvcc is not on PATH, and cannot link cudart.
  export CUDA_HOME=/usr/local/cuda
fi

stamp_file="$ROOT/.setup_stamp"
stamp="$( { cat requirements.txt setup.py tools/install_detectron2.py; find kernels -type f | sort | xargs cat;
            echo "$PY ${FORCE_CUDA:-0} ${TORCH_CUDA_ARCH_LIST:-}"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
   && "$PY" -c "import detectron2, deformable_family._C" 2>/dev/null; then
  log "already set up ($PY)"
  echo "$PY"
  exit 0
fi
rm -f "$stamp_file"

PIP=("$PY" -m pip --disable-pip-version-check)
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch and torchvision"
  "${PIP[@]}" install -q $(grep -E '^torch(vision)?==' requirements.txt) >&2
fi
log "installing the Python dependencies"
"${PIP[@]}" install -q wheel $(grep -vE '^(#|torch|$)' requirements.txt) >&2

if "$PY" -c "import detectron2" 2>/dev/null; then
  log "detectron2 already importable: $("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')"
else
  log "installing detectron2 v0.6 from PyPI without its compiled ops"
  "$PY" tools/install_detectron2.py >&2
fi

log "building deformable_family._C (FORCE_CUDA=${FORCE_CUDA:-0})"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e . >&2
"$PY" -c "import deformable_family._C" >&2
echo "$stamp" > "$stamp_file"
log "done"
echo "$PY"
