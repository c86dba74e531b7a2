"""Merging a workflow's config files the way ``python -m monai.bundle run`` does, with one tolerance.

A modality overlay may set nested ids of another workflow (e.g. ``train#augmentations``). Merged onto
``inference.yaml``, which has no ``train`` section, MONAI raises ``KeyError: query key: train``. The server only
needs the inference (or train) part, so a nested id whose parent section is absent is skipped with a log line;
everything else merges exactly as MONAI merges (later file wins per key, ``+key`` appends/updates).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from monai.bundle import ConfigParser
from monai.bundle.utils import MERGE_KEY, merge_kv

logger = logging.getLogger(__name__)


def _parent(key: str) -> str | None:
    key = key[len(MERGE_KEY):] if key.startswith(MERGE_KEY) else key
    key = key.replace("#", "::")
    return key.rsplit("::", 1)[0] if "::" in key else None


def merge_config_files(files: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Merge config files in order; nested ids under a section that no earlier file defines are skipped."""
    parser = ConfigParser(config={})
    for f in files:
        for k, v in ConfigParser.load_config_file(f).items():
            parent = _parent(k)
            if parent is not None and parent not in parser:
                logger.info(f"{os.path.basename(str(f))}: '{k}' skipped (no '{parent}' section in this workflow)")
                continue
            merge_kv(parser, k, v)
    return parser.get()  # type: ignore[return-value]


def load_workflow_config(
    files: Sequence[str | os.PathLike], metadata_file: str | os.PathLike, bundle_root: str
) -> ConfigParser:
    """A ``ConfigParser`` holding the merged workflow config, the bundle metadata and ``bundle_root``."""
    parser = ConfigParser()
    parser.read_meta(str(metadata_file))
    parser.read_config(merge_config_files(files))
    parser.config.update({"bundle_root": bundle_root})  # type: ignore[union-attr]
    return parser
