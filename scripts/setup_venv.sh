#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install ffcl-monai into it.
#
# torch is installed first, on its own, so that pip never swaps in a different build later:
#   - TORCH_SPEC set          -> exactly that, e.g. TORCH_SPEC="torch==2.13.0" or "torch>=2.8"
#     (+ TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cu128 or .../whl/cpu, if you need another index)
#   - an NVIDIA GPU is present -> "torch>=2.8" from the default index (Linux wheels there are CUDA builds)
#   - otherwise (CPU)          -> "torch==2.13.0"; on CPU machines without a local CPU wheel, also set
#                                 TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid CUDA downloads
# A torch that is already installed in the venv is kept. Re-running is cheap: a stamp file records the install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

log() { printf '[setup] %s\n' "$*" >&2; }

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || { log "Python >= 3.10 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.11"; exit 1; }

stamp="$VENV/.ffcl-monai-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
    exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [[ -n "${TORCH_SPEC:-}" ]]; then
        spec="$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec="torch>=2.8"
        log "NVIDIA GPU found: installing a CUDA build of torch"
    else
        spec="torch==2.13.0"
        log "no GPU found: installing the CPU build $spec"
    fi
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
        "${PIP[@]}" install -q "$spec" --index-url "$TORCH_INDEX_URL"
    else
        "${PIP[@]}" install -q "$spec"
    fi
fi
log "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"

log "installing ffcl-monai (editable) and its dependencies"
"${PIP[@]}" install -q -e ".[dev]"
"$VENV/bin/python" -c "import ffcl_monai, monai, ignite, mlflow; print('ffcl-monai', ffcl_monai.__version__, '| monai', monai.__version__)"
touch "$stamp"
