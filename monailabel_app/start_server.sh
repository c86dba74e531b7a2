#!/usr/bin/env bash
# Start the MONAI Label server with the ffcl-monai classifier app.
#
#   monailabel_app/start_server.sh STUDIES_DIR [PORT] [extra monailabel start_server args...]
#
# e.g. LABEL_MODEL=runs/x/models/model.pt monailabel_app/start_server.sh /tmp/kermany_studies 8000
#
# Defaults, and why:
#   - binds 127.0.0.1 (MONAI Label's own default is 0.0.0.0, i.e. every interface, with auth off); set
#     LABEL_HOST=0.0.0.0 only on a trusted network,
#   - port 8000 (or $LABEL_PORT),
#   - --conf models xray unless the extra args name models ($LABEL_MODELS sets it too, e.g. xray,volume3d),
#   - the checkpoint: --conf model_path $LABEL_MODEL when that is set (e.g. runs/x/models/model.pt),
#   - datastore patterns that include .jpeg and .dcm (the app adds them too),
#   - no model-zoo look-ups: the app never consults the zoo; BUNDLE_DOWNLOAD_SRC is set to a non-default source
#     anyway, so that nothing in monailabel fetches the zoo index from GitHub,
#   - the .label-venv made by monailabel_app/setup_env.sh (override with LABEL_VENV),
#   - MONAI Label behind lib/server_guard.py (--uvicorn_app lib.server_guard:app): only the loopback origins of this
#     port may use it from a browser (MONAI_LABEL_CORS_ORIGINS='["https://viewer.example.org"]' to allow others),
#     request bodies over LABEL_MAX_UPLOAD_BYTES (default 536870912 = 512 MiB) get 413, image ids that are paths get
#     400, /train bodies are checked before queueing; LABEL_TOKEN=<secret> requires `Authorization: Bearer <secret>`
#     on every request. A LABEL_HOST other than loopback needs LABEL_TOKEN (or MONAI Label's Keycloak auth,
#     MONAI_LABEL_AUTH_ENABLE=true); LABEL_ALLOW_NO_AUTH=1 overrides that on a trusted network. See SECURITY.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${LABEL_VENV:-$ROOT/.label-venv}"

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit $([[ $# -lt 1 ]] && echo 2 || echo 0)
fi
STUDIES="$1"; shift
PORT="${LABEL_PORT:-8000}"
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then PORT="$1"; shift; fi
HOST="${LABEL_HOST:-127.0.0.1}"
case "$HOST" in
    127.*|localhost|::1) ;;
    *)
        if [[ -z "${LABEL_TOKEN:-}" && "${MONAI_LABEL_AUTH_ENABLE:-false}" != "true" && "${LABEL_ALLOW_NO_AUTH:-0}" != "1" ]]; then
            echo "[label-server] LABEL_HOST=$HOST exposes the server beyond this machine: set LABEL_TOKEN=<secret> (or" \
                 "MONAI Label's Keycloak auth), or LABEL_ALLOW_NO_AUTH=1 on a trusted network. See SECURITY.md." >&2
            exit 2
        fi ;;
esac

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import monailabel" 2>/dev/null; then
    echo "[label-server] $VENV has no monailabel; create it with: bash monailabel_app/setup_env.sh" >&2
    exit 1
fi
if [[ ! -d "$STUDIES" ]]; then
    echo "[label-server] studies folder '$STUDIES' does not exist" >&2
    exit 1
fi

EXTRA=("$@")
if [[ " ${EXTRA[*]-} " != *" models "* ]]; then
    EXTRA+=(--conf models "${LABEL_MODELS:-xray}")
fi
if [[ -n "${LABEL_MODEL:-}" && " ${EXTRA[*]} " != *" model_path "* ]]; then
    if [[ ! -f "$LABEL_MODEL" ]]; then
        echo "[label-server] LABEL_MODEL=$LABEL_MODEL does not exist" >&2
        exit 1
    fi
    EXTRA+=(--conf model_path "$(cd "$(dirname "$LABEL_MODEL")" && pwd)/$(basename "$LABEL_MODEL")")
fi

export BUNDLE_DOWNLOAD_SRC="${BUNDLE_DOWNLOAD_SRC:-ngc}"
export MONAI_LABEL_DATASTORE_FILE_EXT="${MONAI_LABEL_DATASTORE_FILE_EXT:-[\"*.nii.gz\", \"*.nii\", \"*.nrrd\", \"*.jpg\", \"*.jpeg\", \"*.png\", \"*.tif\", \"*.dcm\"]}"
# MLflow 3.13+ refuses file stores; a training run started from MONAI Label tracks to SQLite next to its checkpoint
# unless the user chose a server.
export PYTHONUNBUFFERED=1
# lib.server_guard is imported by uvicorn by name: the app folder goes on the import path.
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
export LABEL_PORT="$PORT"

echo "[label-server] http://$HOST:$PORT  studies=$STUDIES  token=$([[ -n "${LABEL_TOKEN:-}" ]] && echo on || echo off)  ${EXTRA[*]}" >&2
# `python -m monailabel.main` rather than the `monailabel` wrapper script, which runs whatever `python` is first on PATH
# and word-splits its arguments.
exec "$VENV/bin/python" -m monailabel.main start_server \
    --app "$HERE" \
    --studies "$STUDIES" \
    --host "$HOST" \
    --port "$PORT" \
    --uvicorn_app lib.server_guard:app \
    "${EXTRA[@]}"
