#!/usr/bin/env bash
# Create the MONAI Label 0.8.5 server environment in <repo>/.label-venv (override with LABEL_VENV).
#
# Why a separate venv: monailabel 0.8.5 needs pydicom 2 / numpy 1 (pydicom-seg), and its metadata pulls sam2 ->
# torchvision -> CUDA torch. The core install (`pip install -e .` in .venv) must stay unpinned by that, so the server
# gets its own environment:
#   1. torch first (CPU build by default; set TORCH_SPEC, and TORCH_INDEX_URL if needed, for another build),
#   2. monailabel's real requirements minus sam2/torchvision, under constraints-label.txt,
#   3. monailabel==0.8.5 itself with --no-deps,
#   4. this project (editable) so the app and the bundle configs can import ffcl_monai,
#   5. an import smoke test.
# Re-running is cheap: a stamp file (hash of the recipe files and pyproject.toml) skips a finished install; a torch
# already in the venv is kept unless TORCH_SPEC is given.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${LABEL_VENV:-$ROOT/.label-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC_FORCE="${TORCH_SPEC:-}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MONAILABEL_SPEC="${MONAILABEL_SPEC:-monailabel==0.8.5}"

log() { printf '[label-env] %s\n' "$*" >&2; }

"$PYTHON" - <<'PY' || { echo "[label-env] Python >= 3.10 is required" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

FLAVOUR="locked"
[[ "${LABEL_UNLOCKED:-0}" == "1" ]] && FLAVOUR="unlocked"
STAMP="$VENV/.label-env-$FLAVOUR-$(cat "$HERE/setup_env.sh" "$HERE/requirements-label.txt" \
    "$HERE/constraints-label.txt" "$HERE/requirements-label.lock" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && -z "${TORCH_SPEC_FORCE:-}" ]] && "$VENV/bin/python" -c "import monailabel, ffcl_monai" 2>/dev/null; then
    log "$VENV is up to date (delete $STAMP to reinstall)"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch. Installed alone and first so that nothing later can swap it for a CUDA build from PyPI.
if [[ -z "$TORCH_SPEC_FORCE" ]] && "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    log "keeping the installed torch"
elif [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    log "installing $TORCH_SPEC from $TORCH_INDEX_URL"
    "${PIP[@]}" install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
    log "installing $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC"
fi
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
log "torch $TORCH_VERSION (cuda: $("$VENV/bin/python" -c 'import torch; print(torch.version.cuda)'))"

# Keep torch exactly as installed from here on.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat "$HERE/constraints-label.txt" > "$CONSTRAINTS"
if [[ "${LABEL_UNLOCKED:-0}" != "1" ]]; then
    # the exact versions this recipe was tested with (see the file's header)
    grep -v '^#' "$HERE/requirements-label.lock" >> "$CONSTRAINTS"
fi
echo "torch==${TORCH_VERSION}" >> "$CONSTRAINTS"

# 2. monailabel's requirements without sam2/torchvision.
log "installing MONAI Label requirements (constraints-label.txt)"
"${PIP[@]}" install -c "$CONSTRAINTS" -r "$HERE/requirements-label.txt"

# 3. monailabel itself, without its dependency list (that list is what drags in sam2/torchvision/CUDA).
log "installing $MONAILABEL_SPEC --no-deps"
"${PIP[@]}" install --no-deps "$MONAILABEL_SPEC"

# 4. this project, so the app can import ffcl_monai (the bundle configs call it from YAML).
log "installing ffcl-monai (editable) from $ROOT"
"${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT"

# 5. smoke test: everything the server and the app import.
log "checking imports"
"$VENV/bin/python" - <<'PY'
import importlib.util
import sys

import monai
import monailabel
import numpy
import pydicom
import torch

from monailabel.config import settings  # noqa: F401  (pydantic settings load)
from monailabel.interfaces.app import MONAILabelApp  # noqa: F401  (dicomweb/pynetdicom stack)
import pydicom_seg  # noqa: F401  (pydicom 2 API)
import ffcl_monai  # noqa: F401

assert importlib.util.find_spec("sam2") is None, "sam2 must not be installed"
print(
    f"monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}, "
    f"numpy {numpy.__version__}, pydicom {pydicom.__version__}, "
    f"torchvision {'installed' if importlib.util.find_spec('torchvision') else 'absent'}"
)
PY
rm -f "$VENV"/.label-env-*
touch "$STAMP"
log "done: $VENV (start the server with monailabel_app/start_server.sh <studies_dir>)"
