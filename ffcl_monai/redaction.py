"""Credentials never printed or saved: one redaction for every URI, message, file and log line.

A tracking URI may carry ``user:password@`` or a token in its query string (``?token=...``). :func:`redact_uri`
replaces those secrets with ``***``; :func:`redact_values` applies it to a JSON-like structure (``config_resolved.json``,
MLflow params); :class:`RedactingFilter` applies it to log records, installed by :func:`install_log_redaction` on
MONAI's bundle-script logger (its run summary echoes every command-line override, ``--tracking_uri`` included) and on
the root handlers. Kept free of heavy imports so that ``ffcl_monai`` can install the filter when it is imported.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

#: What replaces a secret in printed or saved text.
REDACTED = "***"
# scheme://userinfo@ : the userinfo runs to the last "@" before the path, so a password holding "@" is covered too.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s'\"<>]*)@")
# ?key=value / &key=value / ;key=value query parameters (also inside longer messages).
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&;?#/\s'\"<>]+)=(?P<value>[^&;#\s'\"<>)]*)")
# Query keys whose values are secrets: token, access_token, password, api_key, client_secret, X-Amz-Signature, sig ...
_SECRET_KEY = re.compile(r"token|passw|pwd|secret|key|auth|credential|signature|session|^sig$|^code$", re.IGNORECASE)


def redact_uri(text: Any) -> Any:
    """``text`` with every credential in it replaced by ``***``; non-strings are returned unchanged.

    Works on a bare URI and on any message that contains URIs (MLflow and requests errors repeat the URL):

    - ``scheme://user:password@host`` -> ``scheme://user:***@host``; a user-only ``scheme://token@host`` ->
      ``scheme://***@host``;
    - query parameters whose name looks like a secret (``token``, ``access_token``, ``password``, ``api_key``,
      ``secret``, ``X-Amz-Signature``, ``sig``, ...) -> ``name=***``.

    This is the project's one redaction function: every tracking URI that is printed, raised, logged to MLflow or
    saved (``config_resolved.json``) goes through it.
    """
    if not isinstance(text, str):
        return text

    def userinfo(m: re.Match) -> str:
        user, sep, _ = m.group("userinfo").partition(":")
        return f"{m.group('scheme')}{user}:{REDACTED}@" if sep else f"{m.group('scheme')}{REDACTED}@"

    def query(m: re.Match) -> str:
        if _SECRET_KEY.search(m.group("key")) and m.group("value"):
            return f"{m.group('sep')}{m.group('key')}={REDACTED}"
        return m.group(0)

    return _QUERY_PARAM.sub(query, _USERINFO.sub(userinfo, text))


def has_credentials(uri: str) -> bool:
    """True when ``uri`` carries a secret that :func:`redact_uri` would hide."""
    return isinstance(uri, str) and redact_uri(uri) != uri


def redact_values(obj: Any) -> Any:
    """A copy of a JSON-like structure (dicts, lists, tuples, strings) with :func:`redact_uri` applied to every
    string; used for ``config_resolved.json`` and MLflow params. The input is not modified."""
    if isinstance(obj, str):
        return redact_uri(obj)
    if isinstance(obj, Mapping):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_values(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record on with :func:`redact_uri` applied to its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        clean = redact_uri(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactingFilter()
#: Loggers that echo user input: MONAI's bundle scripts print every CLI override in their input summary.
ECHOING_LOGGERS = ("monai.bundle.scripts", "monai.bundle", "mlflow", "py.warnings")


def install_log_redaction() -> None:
    """Redact credentials from the loggers that echo user input and from the root logger's handlers (idempotent)."""
    for name in ECHOING_LOGGERS:
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
