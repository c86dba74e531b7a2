"""Configs are composed, not copied (issue 14): repeated YAML lines outside the train.yaml / inference.yaml pair stay
under 20% of the counted lines of bundle/configs (scripts/config_repetition.py defines the count)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("config_repetition", ROOT / "scripts" / "config_repetition.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_count_by_hand(tmp_path: Path) -> None:
    """The count on three tiny files, worked out by hand."""
    (tmp_path / "train.yaml").write_text("shared_by_pair: '@x'\nshared_by_all: '@y'   # note\nunique_train: 1\n# comment line here\nshort: 1\n")
    (tmp_path / "inference.yaml").write_text("shared_by_pair: '@x'\nshared_by_all: '@y'\n")
    (tmp_path / "overlay.yaml").write_text("shared_by_all: '@y'\nunique_overlay: 2\n")
    r = _module().count(tmp_path)
    # counted: train 3 (short: 1 is too short, the comment is skipped), inference 2, overlay 2
    assert (r.files, r.counted, r.repeated, r.pair_only) == (3, 7, 5, 2)
    assert r.rest == 3 and r.top == [(3, "shared_by_all: '@y'")]


def test_bundle_configs_under_target() -> None:
    r = _module().count()
    assert r.rest_fraction < 0.20, (
        f"{r.rest}/{r.counted} = {100 * r.rest_fraction:.1f}% of the config lines are copies (outside the "
        f"train/inference pair); share them with a `%` macro or an existing key instead. Most repeated: {r.top[:5]}")
