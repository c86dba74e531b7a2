"""An ASGI layer in front of MONAI Label's FastAPI app: origins, a shared token, body size, image ids, /train bodies.

``start_server.sh`` starts MONAI Label with ``--uvicorn_app lib.server_guard:app``. What it adds, and why:

- **Origins.** MONAI Label answers every origin (``MONAI_LABEL_CORS_ORIGINS`` empty means ``*``, with credentials),
  so any web page open in an annotator's browser could drive the server. Here the allowed origins are
  ``MONAI_LABEL_CORS_ORIGINS`` when set, else the loopback origins of the server's own port. A request that carries
  any other ``Origin`` is refused with 403 and no ``Access-Control-Allow-Origin`` header (also for "simple" POSTs,
  which browsers send without a preflight).
- **Shared token** (``LABEL_TOKEN``): when set, every request except CORS preflights needs
  ``Authorization: Bearer <token>``; 401 otherwise. Only the header is read, never a query parameter, because query
  strings land in access logs. MONAI Label's own auth (Keycloak OIDC) stays available for sites that run Keycloak.
- **Body size** (``LABEL_MAX_UPLOAD_BYTES``, default :data:`DEFAULT_MAX_BODY_BYTES`): a larger request body gets 413,
  from ``Content-Length`` before anything is read, or while streaming a chunked body.
- **Image ids**: ``image``, ``id``, ``label``, ``tag`` and ``session_id`` query values that could leave the studies
  folder (a ``/`` or ``\\``, a ``..`` component, NUL, a drive letter, ``~``) get 400.
- **/train bodies** are checked by :func:`lib.train_request.validate_train_params` before MONAI Label queues the job
  (it would answer 200 and fail in the background): config syntax, server-only keys (tracking URI, run ids ...),
  unknown keys and wrong types get 422, naming the key but never echoing a value into the server log.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import sys
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl

from lib.compat import install_torchvision_stub

install_torchvision_stub()  # before monailabel.app imports monailabel.transform.post

from starlette.middleware.cors import CORSMiddleware  # noqa: E402

from lib.train_request import validate_train_params  # noqa: E402
from ffcl_monai.workflows.untrusted import UntrustedInputError  # noqa: E402

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Default request-body limit: 512 MiB, enough for a large DICOM series upload, far below a disk-filling stream.
DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
#: Query parameters that name an image or label in the datastore.
ID_PARAMS = ("image", "id", "label", "tag", "session_id", "image_id", "label_id")
_BAD_ID = re.compile(r"(^|[/\\])\.\.([/\\]|$)|[/\\\x00]|^~|^[A-Za-z]:")
_TRAIN_PATH = re.compile(r"^/train/?(?P<model>[^/]*)/?$")


class _BodyTooLarge(Exception):
    pass


def _server_port() -> int:
    """The port this server listens on: ``--port`` of ``monailabel start_server`` (same process), else 8000."""
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--port" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if a.startswith("--port=") and a[7:].isdigit():
            return int(a[7:])
    return int(os.environ.get("LABEL_PORT", "8000"))


def allowed_origins(configured: list[str], port: int) -> list[str]:
    """``MONAI_LABEL_CORS_ORIGINS`` without trailing slashes, or the loopback origins of ``port`` when it is empty.

    ``*`` is honoured only when written explicitly (then every origin may drive the server; not recommended).
    """
    origins = [str(o).rstrip("/") for o in configured if str(o).strip()]
    if origins:
        return origins
    return [f"http://{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")] + [
        f"https://{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")
    ]


def bad_id(value: str) -> bool:
    """True for an image/label id that could name a file outside the studies folder."""
    return bool(_BAD_ID.search(value)) or value in (".", "..")


class ServerGuard:
    """The ASGI wrapper described in the module docstring."""

    def __init__(self, app: Any, origins: list[str], token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.origins = set(origins)
        self.any_origin = "*" in self.origins
        self.token = token or None
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope["method"].upper()
        path = scope.get("path", "")
        origin = headers.get("origin")
        if origin is not None and not self.any_origin and origin.rstrip("/") not in self.origins:
            logger.warning("refused a %s %s from a foreign origin", method, path)
            await _answer(send, 403, "this origin may not use the server (see MONAI_LABEL_CORS_ORIGINS in SECURITY.md)")
            return
        if method == "OPTIONS" and origin is not None:  # CORS preflight: browsers never send credentials with it
            await self.app(scope, receive, send)
            return
        if self.token is not None:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                await _answer(send, 401, "missing or wrong token: send `Authorization: Bearer <LABEL_TOKEN>`",
                              extra=[(b"www-authenticate", b"Bearer")])
                return
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key in ID_PARAMS and bad_id(value):
                await _answer(send, 400, f"query parameter `{key}` must be an id inside the studies folder, not a path")
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _answer(send, 413, f"request body over the limit of {self.max_body_bytes} bytes (LABEL_MAX_UPLOAD_BYTES)")
            return
        train = _TRAIN_PATH.match(path) if method == "POST" else None
        if train is not None:
            await self._train(scope, receive, send, train.group("model"))
            return
        await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, counting body bytes; 413 if a chunked body passes the limit before a response."""
        seen = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _answer(send, 413, f"request body over the limit of {self.max_body_bytes} bytes")

    async def _train(self, scope: Scope, receive: Receive, send: Send, model: str) -> None:
        """Read the whole (bounded) /train body, validate it, then replay it to MONAI Label."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await _answer(send, 413, f"request body over the limit of {self.max_body_bytes} bytes")
                return
            chunks.append(body)
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            params = json.loads(raw) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            await _answer(send, 400, "the /train body must be a JSON object of training parameters")
            return
        try:
            if model:
                validate_train_params(params, f"POST /train/{model[:40]}")
            else:  # POST /train/: {model: params}
                if params is not None and not isinstance(params, dict):
                    raise UntrustedInputError("POST /train/: the body must map model names to parameters")
                for name, p in (params or {}).items():
                    validate_train_params(p, f"POST /train/ ({str(name)[:40]})")
        except UntrustedInputError as e:
            logger.warning("refused a /train request: %s", str(e).split(":", 1)[-1][:200])
            await _answer(send, 422, str(e))
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app() -> ServerGuard:
    """MONAI Label's app with its CORS layer replaced by the configured origins, behind :class:`ServerGuard`."""
    from monailabel.app import app as monailabel_app
    from monailabel.config import settings

    origins = allowed_origins([str(o) for o in settings.MONAI_LABEL_CORS_ORIGINS], _server_port())
    # MONAI Label's own CORS layer allows every origin when the setting is empty; ours replaces it.
    monailabel_app.user_middleware = [m for m in monailabel_app.user_middleware if m.cls is not CORSMiddleware]
    inner = CORSMiddleware(monailabel_app, allow_origins=origins, allow_credentials=True, allow_methods=["*"],
                           allow_headers=["*"])
    token = os.environ.get("LABEL_TOKEN") or None
    limit = int(os.environ.get("LABEL_MAX_UPLOAD_BYTES") or DEFAULT_MAX_BODY_BYTES)
    logger.info("server guard: allowed origins %s; token %s; body limit %d bytes",
                origins, "on" if token else "off", limit)
    return ServerGuard(inner, origins, token, limit)


def __getattr__(name: str) -> Any:
    """``lib.server_guard:app`` for uvicorn, built on first access (importing the module alone builds nothing)."""
    if name == "app":
        globals()["app"] = build_app()
        return globals()["app"]
    raise AttributeError(name)
