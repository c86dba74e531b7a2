"""What a run writes about itself next to its results: the resolved config and the dataset summary.

Both are called from a config's ``initialize`` list, on rank 0 only under torchrun (every rank parses the same
config; one copy is enough and concurrent writes of one file are not).

``save_resolved_config`` needs the config being run. MONAI gives an expression no handle on its own
:class:`~monai.bundle.ConfigParser`, so :func:`running_parser` looks it up: the parser registered by the project's
runner (:func:`ffcl_monai.workflows.runner.run`, explicit) or, for a plain ``python -m monai.bundle run``, the one
evaluating the current expression (found on the call stack). That lookup exists here and nowhere else; no workflow
takes its inputs from it (the FFCL pipeline and the other programs receive their overrides as arguments).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ffcl_monai.data.distributed import is_rank0
from ffcl_monai.networks.checkpoints import atomic_write_text

__all__ = ["running_parser", "registered_parser", "save_resolved_config", "resolved_values", "save_dataset_summary"]

_REGISTERED: list[Any] = []


@contextlib.contextmanager
def registered_parser(parser: Any) -> Iterator[None]:
    """Make ``parser`` the one :func:`running_parser` returns while a runner executes its workflow."""
    _REGISTERED.append(parser)
    try:
        yield
    finally:
        _REGISTERED.remove(parser)


def running_parser() -> Any:
    """The ConfigParser of the workflow being run: the innermost one a runner registered, else the one on the call
    stack (a plain ``python -m monai.bundle run``), else None."""
    if _REGISTERED:
        return _REGISTERED[-1]
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        for name in ("self", "parser"):
            candidate = frame.f_locals.get(name)
            if isinstance(candidate, ConfigParser):
                return candidate
        frame = frame.f_back
    return None


def save_resolved_config(output_dir: str | os.PathLike, name: str = "config_resolved.json") -> str | None:
    """Write the merged config (all files + CLI overrides) to ``output_dir`` for MLflow and for reproducibility.

    What is saved is exactly what runs, except that credentials in any value (a ``--tracking_uri`` with
    ``user:password@`` or ``?token=``) are replaced by ``***`` (:func:`~ffcl_monai.redaction.redact_values`): the
    file is also logged to MLflow as an artifact. Returns the path (None on ranks > 0).
    """
    from ffcl_monai.redaction import redact_values

    if not is_rank0():
        return None
    parser = running_parser()
    content = parser.get() if parser is not None else {"argv": sys.argv}
    if parser is not None and isinstance(content, dict):
        content = {**content, "resolved_values": resolved_values(parser)}
    content = redact_values(json.loads(json.dumps(content, default=str)))  # plain JSON types, then redacted
    return str(atomic_write_text(Path(output_dir) / name, json.dumps(content, indent=2)))


#: Top-level keys computed by pure functions (the datalist header's typed allow-list, literals) whose values are
#: recorded even if nothing evaluated them before the record was written.
RECORDED_KEYS = ("task", "num_classes", "class_names", "spatial_dims", "image_size", "in_channels", "volume_preset")


def _plain(value: Any) -> bool:
    """True for JSON scalars and lists/dicts of them (no tensors, networks, datasets)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def resolved_values(parser: Any) -> dict[str, Any]:
    """The values the run used for its top-level keys whose config text is an expression or a reference.

    ``config_resolved.json`` keeps the config text, so ``task: $@header.get('task', 'binary')`` alone would not say
    which task ran. Values come from the parser's cache of what was already evaluated (no side effects), plus
    :data:`RECORDED_KEYS`, which are pure functions of the datalist header and literals; only plain JSON values are
    kept.
    """
    resolver = parser.ref_resolver
    for key in RECORDED_KEYS:
        if key in parser.config and key not in resolver.resolved_content:
            try:
                parser.get_parsed_content(key)
            except Exception:  # noqa: BLE001 - a record must never stop the run; the key is then just not listed
                continue
    out: dict[str, Any] = {}
    for key, value in resolver.resolved_content.items():
        raw = parser.config.get(key) if "#" not in key and isinstance(parser.config, dict) else None
        if isinstance(raw, str) and raw[:1] in ("$", "@", "%") and _plain(value):
            out[key] = value
    return dict(sorted(out.items()))


def save_dataset_summary(output_dir: str | os.PathLike, datalist: str, class_names: list[str] | None = None) -> str | None:
    """Write counts per split and class (never paths or patient identifiers) to ``dataset_summary.json``."""
    from ffcl_monai.data.datalist import split_summary

    if not is_rank0():
        return None
    path = Path(output_dir) / "dataset_summary.json"
    return str(atomic_write_text(path, json.dumps(split_summary(datalist, class_names), indent=2)))
