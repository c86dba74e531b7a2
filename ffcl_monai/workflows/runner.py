"""The one way the project runs a bundle workflow from Python: find the config files, apply the one 3D rule, parse
command-line overrides with one documented semantics, and run ``initialize``/``run``/``finalize`` of a MONAI
:class:`~monai.bundle.ConfigWorkflow`.

Every multi-step program (the FFCL pipeline, the ablation, the label-efficiency curve, the demo, the benches) goes
through :func:`run`; none of them re-enters a config or looks for a parser on the call stack: each step gets its
config files and its overrides as arguments, and :func:`run` returns the step's parser.

Override semantics (``--set key=value`` of the programs; :func:`parse_override`): the value is read as YAML
(``yaml.safe_load``, plus ``1e-3`` as a float): ``3`` is an int, ``1e-3`` a float, ``true``/``True``/``false`` booleans, ``null`` None,
``[32, 32]`` a list, ``{a: 1}`` a dict; anything else stays a string. Keys may address nested entries with ``#``
(``train#dataloader#num_workers=4``), as on MONAI's own command line. Values are trusted (the command line is the
user's own); text from datalist headers or HTTP goes through :mod:`ffcl_monai.workflows.untrusted` instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import ffcl_monai
from ffcl_monai.workflows.records import registered_parser

logger = logging.getLogger(__name__)

__all__ = ["configs_dir", "config_files", "is_3d", "parse_override", "parse_overrides", "load", "workflow", "run"]

OVERLAY_3D = "3d.yaml"


def configs_dir() -> Path:
    """``bundle/configs``."""
    return Path(ffcl_monai.bundle_root()) / "configs"


def is_3d(datalist: str | os.PathLike | None) -> bool:
    """Whether the datalist header says ``spatial_dims: 3`` (a missing or unreadable header counts as 2D)."""
    if not datalist:
        return False
    from ffcl_monai.data.datalist import read_header

    try:
        return int(read_header(str(datalist)).get("spatial_dims", 2)) == 3
    except (OSError, ValueError, TypeError):
        return False


def config_files(names: Sequence[str | os.PathLike], datalist: str | os.PathLike | None = None) -> list[str]:
    """Absolute paths of ``names`` (bare names are looked up in :func:`configs_dir`), checked to exist.

    The one 3D rule: a datalist whose header says ``spatial_dims: 3`` gets ``3d.yaml`` right after the workflow
    files, unless the list has it already; a multi-GPU overlay (``multi_gpu_*.yaml``) stays last.
    """
    cdir = configs_dir()
    files = [str(n) if os.path.isabs(n) else str(cdir / n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"config file(s) {missing} not found; bundle configs are in {cdir}.")
    if is_3d(datalist) and not any(Path(f).name == OVERLAY_3D for f in files):
        last = [f for f in files if Path(f).name.startswith("multi_gpu")]
        files = [f for f in files if f not in last] + [str(cdir / OVERLAY_3D)] + last
    return files


def parse_override(text: str) -> Any:
    """One override value, read as YAML (see the module docstring); unparsable text stays a string. ``1e-3`` is a
    float, as on MONAI's command line (YAML 1.1 itself would read it as text)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: parsed value}``; a malformed item raises naming it."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. --set local_lr=0.0003)")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_override(value)
    return out


def load(files: Sequence[str | os.PathLike], overrides: Mapping[str, Any] | None = None) -> Any:
    """A :class:`~monai.bundle.ConfigParser` of ``files`` with ``overrides`` applied, nothing instantiated or run
    (e.g. to read a pipeline's own keys before its steps run)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def workflow(files: Sequence[str | os.PathLike], overrides: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~monai.bundle.ConfigWorkflow` ``python -m monai.bundle run`` would build for ``files`` (with the
    bundle's metadata and logging files), not yet initialised."""
    from monai.bundle import ConfigWorkflow

    cdir = configs_dir()
    return ConfigWorkflow(
        config_file=[str(f) for f in files],
        meta_file=str(cdir / "metadata.json"),
        logging_file=str(cdir / "logging.conf"),
        workflow_type="train",
        **dict(overrides or {}),
    )


def run(files: Sequence[str | os.PathLike], overrides: Mapping[str, Any] | None = None) -> Any:
    """Run one bundle workflow (``initialize``, ``run``, ``finalize``); returns its parser
    (``parser.get_parsed_content(...)`` reads any result)."""
    from monai.data import set_track_meta

    set_track_meta(True)  # an earlier step in this process may have switched MetaTensor tracking off
    wf = workflow(files, overrides)
    with registered_parser(wf.parser):
        wf.initialize()
        try:
            wf.run()
        finally:
            wf.finalize()
    return wf.parser
