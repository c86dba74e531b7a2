"""Make monailabel 0.8.5 importable without torchvision.

``monailabel.transform.post`` does ``from torchvision.utils import make_grid, save_image`` at import time, only for
the TensorBoard image helpers of the DeepEdit/pathology sample apps. ``BundleInferTask`` imports that module, so
without torchvision the whole app fails to load. Installing torchvision is what we avoid on purpose (its PyPI wheels
pull a CUDA torch build), so when it is absent we register a stand-in for ``torchvision.utils`` only. ``torchvision``
itself stays un-importable, so MONAI's ``optional_import("torchvision")`` still reports it missing.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, NoReturn


def _unavailable(name: str) -> Any:
    def fn(*args: Any, **kwargs: Any) -> NoReturn:
        raise ImportError(
            f"torchvision.utils.{name} is not available: the MONAI Label environment of ffcl-monai is installed without "
            "torchvision (see monailabel_app/README.md). Install a torchvision build that matches torch to use it."
        )

    fn.__name__ = name
    return fn


def install_torchvision_stub() -> bool:
    """Register a ``torchvision.utils`` stand-in if torchvision is not installed. Returns True if it did."""
    if "torchvision.utils" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    stub = types.ModuleType("torchvision.utils")
    stub.__doc__ = "ffcl-monai stand-in: torchvision is not installed (see monailabel_app/lib/compat.py)."
    stub.make_grid = _unavailable("make_grid")  # type: ignore[attr-defined]
    stub.save_image = _unavailable("save_image")  # type: ignore[attr-defined]
    sys.modules["torchvision.utils"] = stub
    return True
