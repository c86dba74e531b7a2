"""The FFCL defaults study (issue 17) as one resumable command: vary one factor at a time around a base setting, select
each factor's level on the selection datasets, then confirm the combined choice on every dataset with new seeds.

    python -m ffcl_monai.study --output-dir runs/ffcl_study [--spec bundle/configs/studies/ffcl_defaults.yaml] \\
        [--datalist kermany32=datalists/kermany.json ...] [--phase select|confirm|all] [--datasets a,b] \\
        [--max-runs N] [--estimate]

**The spec** (a small YAML file, read with ``yaml.safe_load`` and validated by :func:`load_spec`; data, never config
syntax) lists the datasets (role ``select`` or ``confirm``, datalist, backbone, image size, an optional overlay
``preset`` such as ``oct``, epochs, extra keys), the ``common`` keys of every run, the ``base`` setting, the
``factors`` with their levels, and the selection and confirmation seeds. A level (and the base) is
``{set: {config key: value}, rbp: [keys of set that RBP also gets]}``. The default spec lives in
``bundle/configs/studies/``: next to the overlays it names and found the same way
(:func:`ffcl_monai.workflows.runner.configs_dir`), but in a sub-folder, so that no tool takes it for a bundle overlay
(``ablate --preset`` and the docs-key check look at the top folder only); it is not a MONAI config and is never
parsed as one. Keys of one run, later wins: ``common`` < ``base`` < the dataset's keys (epochs, ``set``) < the
level's ``set``. Every key must be a key of the bundle configs (a typo is refused, naming it), keys the study sets
itself (``seed``, ``datalist``, ``output_dir``, ...) are refused, and a value that a bundle config would evaluate
(``$``, ``@``, ``%``, ``_target_``) is refused, naming the key (:mod:`ffcl_monai.workflows.untrusted`).

**Phase select** (selection datasets, selection seeds). For the base and every level of every factor (a factor with
``tasks`` runs only on datasets of those tasks, e.g. the downstream loss on multi-class data), the ablation
(:func:`ffcl_monai.ablate.plan_ablation` / :func:`~ffcl_monai.ablate.run_ablation`, variants ``rbp-random`` and
``ffcl-lg-random``) runs in ``<out>/<dataset>/<factor>=<level>/`` (the base in ``<out>/<dataset>/base/``). RBP runs are
keyed by the keys that reach RBP (``common``, the dataset's keys, and the ``rbp`` keys of the base and the level): each
distinct RBP setting runs once per seed in ``<out>/<dataset>/rbp/<name>/`` (``base``, or the keys that differ from the
base's RBP, e.g. ``learning_rate=0.0001``) and every ablation that needs it reads those runs (``external``) instead of
training RBP again. Then, per dataset, ``<out>/<dataset>/table.md`` / ``.csv`` / ``.png``: per level the RBP and FFCL
AUC (mean ± std over seeds), the pooled ΔAUC (FFCL L→G − RBP, paired on the same images, pooled over seeds:
:mod:`ffcl_monai.evaluation.paired`) with its 95% CI, the verdict and the wall time.

*Verdicts* (issue 17): **better** = the pooled ΔAUC CI lies above 0; **not worse** = its lower bound is above −0.01
(:data:`NON_INFERIORITY_MARGIN`); **worse** = neither (non-inferiority at 0.01 not shown).

*Selection rule*: per factor, among the base and the factor's levels, the level with the highest pooled ΔAUC CI
lower bound, averaged over the selection datasets the factor ran on. The lower bound rewards a level that is both
ahead of RBP and stable over seeds and images, which is what "better" and "not worse" ask of the final setting. A tie
keeps the base (no change without evidence), then the spec's order; a level without a finite bound is never chosen.
The chosen setting is the base with every factor at its chosen level (``<out>/chosen.md`` / ``.json``). Factors were
varied one at a time, so **interactions are not tested**: the combination may behave differently from each change
alone, and that is what the confirmation checks.

**Phase confirm** (every dataset, confirmation seeds, none of them used for selection). The chosen setting and, for
reference, the base (once when they coincide) in ``<out>/confirm/<dataset>/{chosen,base}/`` (RBP shared as above,
``<out>/confirm/<dataset>/rbp/``), then ``<out>/confirm/summary.md`` / ``summary.json`` / ``summary.png``: pooled
ΔAUC CIs per dataset and setting, and the acceptance verdict: **accepted** when, with the chosen setting, FFCL L→G is
not worse than RBP on every dataset and better on at least one; otherwise the summary says plainly that the criterion
is not met (and whether the base meets it).

**Resume**: rerun the same command. The study is an :class:`~ffcl_monai.workflows.experiment.Experiment`
(``kind: ffcl_study``; ``state.json`` holds the spec it runs and every finished ablation); every ablation and every
(variant, seed) inside it resumes on its own. A changed spec into the same folder is refused, naming the difference.
``--max-runs N`` starts at most N runs (one run = one (variant, seed) pipeline) and stops cleanly, tables written
from what is done: a study can be spent a sitting at a time.

**Estimate** (printed before anything runs; ``--estimate`` prints it and exits): the runs of the requested phases and
datasets, how many are done, and the wall time of the rest: per run ``units / img_per_s + steps * step_overhead_s``
with ``units`` = training images x epochs (stages + fine-tuning; ``label_fraction`` of the training split) + 1/3 x
the forward-only images (validation every ``val_interval`` fine-tuning epochs and the evaluated splits; a forward pass
costs about a third of a training step), ``steps`` = the run's bundle workflows. ``img_per_s`` per dataset comes from
the dataset's completed runs in this study folder (``sum(units) / sum(wall)``, the overhead then included), else the
spec's ``img_per_s``, else the median of 3 timings of 2 training iterations of the backbone at the dataset's image
size and batch on this machine (:func:`measure_img_per_s`; a shared CPU's load makes it vary, so the line names the
load average). Before selection is done the confirmation's chosen setting is unknown: it is
counted as an upper bound (chosen and base differ, with their own RBP runs, at the base's cost).

**MLflow**: one parent run ``study:<name>`` in ``<out>/mlruns.db`` (or ``MLFLOW_TRACKING_URI``); every ablation's
parent run is nested under it and every pipeline under its ablation. The study run gets the tables and plots as
artifacts, the chosen levels as params (``chosen.<factor>``), and per dataset the pooled ΔAUC with its CI:
``select.<dataset>.<factor>.<level>.delta_auc`` (``_ci_low``, ``_ci_high``; the base as ``base.base``),
``confirm.<dataset>.<chosen|base>.delta_auc`` (+ CI), and ``confirm.accepted`` (1 or 0).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ffcl_monai.errors import UserInputError
from ffcl_monai.networks.checkpoints import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["StudySpecError", "StudySpec", "DatasetSpec", "Factor", "Level", "Setting", "PlannedRun", "Estimate",
           "load_spec", "parse_spec", "default_spec_path", "verdict", "choose_levels", "measure_img_per_s",
           "run_units", "plan_phase", "estimate", "run_study", "main", "NON_INFERIORITY_MARGIN", "STUDY_KIND"]

STUDY_KIND = "ffcl_study"
RBP = "rbp-random"
FFCL = "ffcl-lg-random"
#: "not worse" = the pooled ΔAUC CI lower bound is above minus this (issue 17).
NON_INFERIORITY_MARGIN = 0.01
#: A forward pass (validation, evaluation) costs about a third of a training step (forward + backward ~ 3 forwards).
FORWARD_COST = 1.0 / 3.0
ONE_SEED_NOTE = ("With one seed the ΔAUC interval covers the sampling of the images only, not training randomness "
                 "(the paired bootstrap of that seed): use three seeds or more before trusting a verdict.")
SPEC_DIR = "studies"
DEFAULT_SPEC = "ffcl_defaults.yaml"
TASKS = ("binary", "multiclass", "multilabel")
ROLES = ("select", "confirm")
PHASES = ("select", "confirm")
# Keys the study or the ablation sets for every run: a spec may not set them.
RESERVED_KEYS = {
    "seed": "the seeds come from `seeds.select` / `seeds.confirm`",
    "datalist": "each dataset's `datalist` (or --datalist NAME=PATH)",
    "output_dir": "the study places every run under --output-dir",
    "tracking_uri": "every run logs to the study's MLflow store (MLFLOW_TRACKING_URI to change it)",
    "mlflow_parent_run_id": "runs are nested under the study's parent run",
    "run_name": "the study names its runs",
    "stages": "the study compares RBP (`rbp-random`) with FFCL local -> global (`ffcl-lg-random`)",
    "init": "both arms start from random weights",
    "resume": "the study resumes by itself",
    "overwrite": "a study never overwrites results; use another --output-dir",
    "experiment_name": "`experiment_name` at the top of the spec",
}
# Keys with their own place in a dataset entry (not in `common`, a dataset's `set` or `base`).
DATASET_FIELDS = {"backbone": "backbone", "image_size": "image_size", "local_epochs": "epochs.local",
                  "global_epochs": "epochs.global", "max_epochs": "epochs.finetune"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(#[A-Za-z0-9_]+)*$")
_RESERVED_NAMES = {"confirm", "rbp", "base", "chosen"}


class StudySpecError(UserInputError):
    """A refused study spec or study request: the message names the spec key (or option) and the fix."""


# ------------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class Level:
    """One setting of one factor (or the base): config keys for FFCL, and which of them RBP also gets."""

    factor: str
    name: str
    set: dict[str, Any]
    rbp: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "base" if self.factor == "base" else f"{self.factor}={self.name}"


@dataclass(frozen=True)
class Factor:
    """A factor varied around the base; ``tasks`` limits it to datasets of those tasks (None: all)."""

    name: str
    levels: tuple[Level, ...]
    tasks: tuple[str, ...] | None = None
    description: str = ""

    def applies(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the study."""

    name: str
    role: str
    datalist: str
    backbone: str
    image_size: tuple[int, ...] | int
    preset: str | None
    local_epochs: int
    global_epochs: int
    max_epochs: int
    set: dict[str, Any]
    img_per_s: float | None = None

    def keys(self) -> dict[str, Any]:
        """The dataset's keys of every run (epochs and ``set``)."""
        return {**self.set, "local_epochs": self.local_epochs, "global_epochs": self.global_epochs,
                "max_epochs": self.max_epochs}


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec (:func:`parse_spec`)."""

    name: str
    description: str
    split: str
    paired_bootstrap: int
    select_seeds: tuple[int, ...]
    confirm_seeds: tuple[int, ...]
    common: dict[str, Any]
    datasets: dict[str, DatasetSpec]
    base: Level
    factors: dict[str, Factor]
    step_overhead_s: float
    experiment_name: str
    source: str = ""

    def settings(self) -> dict[str, Any]:
        """Plain-data form of what decides the results, stored in the study's ``state.json`` (a rerun with another
        is refused). The speed keys (``img_per_s``, ``step_overhead_s``) and descriptions only inform the estimate and
        the reader: they may change between invocations."""
        def level(lv: Level) -> dict[str, Any]:
            return {"set": lv.set, "rbp": list(lv.rbp)}

        return json.loads(json.dumps({
            "name": self.name, "split": self.split, "paired_bootstrap": self.paired_bootstrap,
            "seeds": {"select": list(self.select_seeds), "confirm": list(self.confirm_seeds)},
            "common": self.common, "experiment_name": self.experiment_name,
            "datasets": {n: {"role": d.role, "datalist": d.datalist, "backbone": d.backbone,
                             "image_size": d.image_size, "preset": d.preset,
                             "epochs": {"local": d.local_epochs, "global": d.global_epochs, "finetune": d.max_epochs},
                             "set": d.set} for n, d in self.datasets.items()},
            "base": level(self.base),
            "factors": {n: {"tasks": list(f.tasks) if f.tasks else None,
                            "levels": {lv.name: level(lv) for lv in f.levels}} for n, f in self.factors.items()},
        }, default=str))


def default_spec_path() -> Path:
    """``bundle/configs/studies/ffcl_defaults.yaml``."""
    from ffcl_monai.workflows.runner import configs_dir

    return configs_dir() / SPEC_DIR / DEFAULT_SPEC


@functools.lru_cache(maxsize=1)
def _config_keys() -> tuple[frozenset[str], frozenset[str]]:
    """(every top-level key of the bundle configs, the keys an RBP run reads). RBP is the FFCL program with no stage:
    the fine-tuning ([train.yaml, overlays]) and the evaluation ([train.yaml, evaluate.yaml, overlays]), plus the
    program's own ``eval_splits`` and the fine-tuning keys it takes from ffcl.yaml (``FINETUNE_KEYS``)."""
    from ffcl_monai.workflows.ffcl import FINETUNE_KEYS
    from ffcl_monai.workflows.runner import configs_dir

    def top(f: Path) -> set[str]:
        content = yaml.safe_load(f.read_text()) or {}
        return {str(k).lstrip("+") for k in content} if isinstance(content, dict) else set()

    cdir = configs_dir()
    every: set[str] = set()
    for f in sorted(cdir.glob("*.yaml")):
        every |= top(f)
    rbp = top(cdir / "train.yaml") | top(cdir / "evaluate.yaml") | set(FINETUNE_KEYS) | {"eval_splits"}
    return frozenset(every), frozenset(rbp)


class _Checker:
    """Type checks that name the spec key and the spec file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._keys: tuple[frozenset[str], frozenset[str]] | None = None

    def fail(self, key: str, what: str) -> StudySpecError:
        return StudySpecError(f"study spec {self.source}: `{key}` {what}")

    def mapping(self, value: Any, key: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping with the keys {', '.join(allowed)}; got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else str(k),
                                f"is not a key of the study spec here (allowed: {', '.join(allowed)})")
        for k in required:
            if k not in value:
                raise self.fail(f"{key}.{k}" if key else k, "is missing (required)")
        return value

    def name(self, value: Any, key: str, reserved: Sequence[str] = ()) -> str:
        if not isinstance(value, str) or not _NAME.match(value) or value in reserved:
            extra = f"; not one of {sorted(reserved)}" if reserved else ""
            raise self.fail(key, f"= {value!r}: a name is 1-64 letters, digits, `_ . + -` (starting with a letter or "
                                 f"digit; it becomes a folder name){extra}")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or value.lstrip().startswith(("$", "@", "%")):
            raise self.fail(key, f"= {value!r} must be plain text")
        return value

    def integer(self, value: Any, key: str, lo: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self.fail(key, f"= {value!r} must be an integer >= {lo}")
        return value

    def number(self, value: Any, key: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (positive and value == 0):
            raise self.fail(key, f"= {value!r} must be a {'positive' if positive else 'non-negative'} number")
        return float(value)

    def choice(self, value: Any, key: str, options: Sequence[str]) -> str:
        if value not in options:
            raise self.fail(key, f"= {value!r} must be one of {', '.join(options)}")
        return value

    def seeds(self, value: Any, key: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"= {value!r} must be a non-empty list of seeds, e.g. [0, 1, 2]")
        out = tuple(self.integer(v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(set(out)) != len(out):
            raise self.fail(key, f"= {value!r} repeats a seed")
        return out

    def overrides(self, value: Any, key: str, forbidden: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Config keys and values: known keys only, no keys the study sets, data only (no config syntax)."""
        from ffcl_monai.workflows.untrusted import refuse_config_syntax

        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping of config keys to values; got {type(value).__name__}")
        if self._keys is None:
            self._keys = _config_keys()
        known = self._keys[0]
        for k, v in value.items():
            where = f"{key}.{k}"
            if not isinstance(k, str) or not _KEY.match(k):
                raise self.fail(where, "is not a config key (letters, digits, `_`; nested entries with `#`)")
            if k in RESERVED_KEYS:
                raise self.fail(where, f"is set by the study itself: {RESERVED_KEYS[k]}")
            if forbidden and k in forbidden:
                raise self.fail(where, f"has its own place: {forbidden[k]}")
            if k.split("#")[0] not in known:
                raise self.fail(where, "is not a key of the bundle configs (bundle/configs/*.yaml): a typo? "
                                       "Every key must be one the runs read.")
            try:
                refuse_config_syntax(v, where, f"study spec {self.source}")
            except UserInputError as e:  # the gate's message, with the study spec's reason instead of its own
                text = re.sub(r" Values from requests and datalists are data only.*$", "", str(e), flags=re.S)
                text = re.sub(r"; only JSON values are accepted\.$", ": only plain values", text)
                raise StudySpecError(f"{text} The study spec is data (read with yaml.safe_load), never config "
                                     "syntax: write the plain value (SECURITY.md).") from None
        return dict(value)

    def rbp_reads(self, key: str) -> bool:
        if self._keys is None:
            self._keys = _config_keys()
        return key.split("#")[0] in self._keys[1]


def _level(c: _Checker, raw: Any, key: str, factor: str, name: str,
           forbidden: Mapping[str, str] | None = None) -> Level:
    raw = c.mapping(raw, key, ("set", "rbp"), ("set",))
    keys = c.overrides(raw["set"], f"{key}.set", forbidden)
    rbp = raw.get("rbp") or []
    if not isinstance(rbp, list) or not all(isinstance(k, str) for k in rbp):
        raise c.fail(f"{key}.rbp", f"= {rbp!r} must be a list of keys of `{key}.set`")
    for k in rbp:
        if k not in keys:
            raise c.fail(f"{key}.rbp", f"names `{k}`, which `{key}.set` does not set")
        if not c.rbp_reads(k):
            raise c.fail(f"{key}.rbp", f"names `{k}`, which an RBP run never reads (a key of the FFCL stages only): "
                                       "remove it from rbp")
    for k in keys:
        if k not in rbp and c.rbp_reads(k):
            logger.warning("study spec %s: `%s.set.%s` reaches the fine-tuning but is not in `rbp`: FFCL gets it, "
                           "RBP keeps the base value (an unequal comparison, unless intended)", c.source, key, k)
    return Level(factor, name, keys, tuple(rbp))


def parse_spec(raw: Any, source: str = "<spec>", datalists: Mapping[str, str] | None = None) -> StudySpec:
    """Validate a study spec (the result of ``yaml.safe_load``) and return it typed.

    Args:
        raw: the spec's content.
        source: where it came from (named in every error).
        datalists: ``{dataset: path}`` replacing the spec's ``datalist`` entries (``--datalist NAME=PATH``).
            Relative paths (spec or command line) are relative to the current folder, as every path of the
            project's commands (``datalists/kermany/kermany.json`` from the repository root).

    Raises:
        StudySpecError: naming the key and the fix.
    """
    c = _Checker(source)
    top = c.mapping(raw, "", ("name", "description", "split", "paired_bootstrap", "seeds", "common", "datasets", "base",
                              "factors", "step_overhead_s", "experiment_name"),
                    ("name", "seeds", "datasets", "base"))
    name = c.name(top["name"], "name")
    seeds = c.mapping(top["seeds"], "seeds", ("select", "confirm"), ("select", "confirm"))
    select_seeds = c.seeds(seeds["select"], "seeds.select")
    confirm_seeds = c.seeds(seeds["confirm"], "seeds.confirm")
    shared = sorted(set(select_seeds) & set(confirm_seeds))
    if shared:
        raise c.fail("seeds.confirm", f"repeats selection seed(s) {shared}: the confirmation needs seeds not used "
                                      "for selection")
    common = c.overrides(top.get("common"), "common", DATASET_FIELDS)
    datalists = dict(datalists or {})
    raw_ds = top["datasets"]
    if not isinstance(raw_ds, dict) or not raw_ds:
        raise c.fail("datasets", "must be a non-empty mapping of dataset names to entries")
    unknown = sorted(set(datalists) - set(raw_ds))
    if unknown:
        raise StudySpecError(f"--datalist {unknown[0]}=...: the spec {source} has no dataset {unknown[0]!r} "
                             f"(datasets: {', '.join(map(str, raw_ds))})")
    datasets: dict[str, DatasetSpec] = {}
    for dname, entry in raw_ds.items():
        key = f"datasets.{dname}"
        c.name(dname, key, sorted(_RESERVED_NAMES))
        e = c.mapping(entry, key, ("role", "datalist", "backbone", "image_size", "preset", "epochs", "set",
                                   "img_per_s", "description"),
                      ("role", "datalist", "backbone", "image_size", "epochs"))
        role = c.choice(e["role"], f"{key}.role", ROLES)
        dl_raw = datalists[dname] if dname in datalists else c.text(e["datalist"], f"{key}.datalist")
        dl = str(Path(dl_raw).expanduser().resolve())
        backbone = c.text(e["backbone"], f"{key}.backbone")
        size = e["image_size"]
        if isinstance(size, list):
            if not 2 <= len(size) <= 3:
                raise c.fail(f"{key}.image_size", f"= {size!r} must be one integer or a list of 2 (2D) or 3 (3D)")
            size = tuple(c.integer(s, f"{key}.image_size[{i}]", 1) for i, s in enumerate(size))
        else:
            size = c.integer(size, f"{key}.image_size", 1)
        preset = e.get("preset")
        if preset is not None:
            from ffcl_monai.ablate import preset_file

            try:
                preset_file(c.text(preset, f"{key}.preset"))
            except ValueError as err:
                raise c.fail(f"{key}.preset", str(err)) from None
        ep = c.mapping(e["epochs"], f"{key}.epochs", ("local", "global", "finetune"), ("local", "global", "finetune"))
        img_per_s = e.get("img_per_s")
        datasets[dname] = DatasetSpec(
            dname, role, dl, backbone, size, preset,
            c.integer(ep["local"], f"{key}.epochs.local", 1), c.integer(ep["global"], f"{key}.epochs.global", 1),
            c.integer(ep["finetune"], f"{key}.epochs.finetune", 1),
            c.overrides(e.get("set"), f"{key}.set", DATASET_FIELDS),
            None if img_per_s is None else c.number(img_per_s, f"{key}.img_per_s", positive=True))
    if not any(d.role == "select" for d in datasets.values()):
        raise c.fail("datasets", "has no dataset with `role: select`: the study selects on at least one")
    split = c.choice(top.get("split", "validation"), "split", ("validation", "test"))
    for d in datasets.values():
        evals = d.set.get("eval_splits", common.get("eval_splits"))
        if evals is not None and (not isinstance(evals, list) or split not in evals):
            where = f"datasets.{d.name}.set.eval_splits" if "eval_splits" in d.set else "common.eval_splits"
            raise c.fail(where, f"= {evals!r} leaves out the study's split {split!r}: the runs would not evaluate "
                                "what the tables compare")
    base = _level(c, top["base"], "base", "base", "base",
                  {k: f"datasets.<name>.{v} (per dataset, so the base may not set it; a factor level may vary it)"
                   for k, v in DATASET_FIELDS.items()})
    factors: dict[str, Factor] = {}
    owner: dict[str, str] = {}
    raw_f = top.get("factors") or {}
    if not isinstance(raw_f, dict):
        raise c.fail("factors", "must be a mapping of factor names to {levels: {...}}")
    for fname, entry in raw_f.items():
        key = f"factors.{fname}"
        c.name(fname, key, sorted(_RESERVED_NAMES))
        e = c.mapping(entry, key, ("levels", "tasks", "description"), ("levels",))
        tasks = e.get("tasks")
        if tasks is not None:
            if not isinstance(tasks, list) or not tasks:
                raise c.fail(f"{key}.tasks", f"= {tasks!r} must be a non-empty list of {', '.join(TASKS)}")
            tasks = tuple(c.choice(t, f"{key}.tasks[{i}]", TASKS) for i, t in enumerate(tasks))
        if not isinstance(e["levels"], dict) or not e["levels"]:
            raise c.fail(f"{key}.levels", "must be a non-empty mapping of level names to {set: {...}, rbp: [...]}")
        levels = []
        for lname, lraw in e["levels"].items():
            lkey = f"{key}.levels.{lname}"
            c.name(lname, lkey, sorted(_RESERVED_NAMES))
            lv = _level(c, lraw, lkey, fname, lname)
            if not lv.set:
                raise c.fail(f"{lkey}.set", "is empty: a level changes at least one key")
            if all(k in base.set and base.set[k] == v for k, v in lv.set.items()):
                raise c.fail(lkey, "sets exactly the base's values: it is the base, which always runs; remove it")
            for k in lv.set:
                if owner.setdefault(k, fname) != fname:
                    raise c.fail(f"{lkey}.set.{k}", f"is also varied by the factor `{owner[k]}`: each key belongs to "
                                                    "one factor, so that the chosen levels combine without conflict")
                if k in base.set and (k in base.rbp) != (k in lv.rbp):
                    raise c.fail(f"{lkey}.rbp", f"and `base.rbp` disagree on whether RBP gets `{k}`: list it in both "
                                                "or in neither")
            levels.append(lv)
        factors[fname] = Factor(fname, tuple(levels), tasks, str(e.get("description", "")))
    return StudySpec(
        name=name, description=str(top.get("description", "")),
        split=split,
        paired_bootstrap=c.integer(top.get("paired_bootstrap", 1000), "paired_bootstrap", 1),
        select_seeds=select_seeds, confirm_seeds=confirm_seeds, common=common, datasets=datasets, base=base,
        factors=factors, step_overhead_s=c.number(top.get("step_overhead_s", 3.0), "step_overhead_s"),
        experiment_name=c.text(top.get("experiment_name", "ffcl_study"), "experiment_name"), source=source)


def load_spec(path: str | Path | None = None, datalists: Mapping[str, str] | None = None) -> StudySpec:
    """Read (``yaml.safe_load``) and validate a study spec file (default: :func:`default_spec_path`)."""
    path = Path(path) if path else default_spec_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise StudySpecError(f"cannot read the study spec {path}: {e}") from None
    except yaml.YAMLError as e:
        raise StudySpecError(f"the study spec {path} is not valid YAML: {e}") from None
    return parse_spec(raw, str(path), datalists)


# ------------------------------------------------------------------------------------------------ settings and runs
@dataclass(frozen=True)
class Setting:
    """The base with some factors at a level (``levels``: factor -> level; empty = the base)."""

    label: str
    levels: tuple[Level, ...] = ()

    def ffcl(self, spec: StudySpec, ds: DatasetSpec) -> dict[str, Any]:
        """The keys of the FFCL runs: common < base < dataset < levels."""
        out = {**spec.common, **spec.base.set, **ds.keys()}
        for lv in self.levels:
            out.update(lv.set)
        return out

    def rbp(self, spec: StudySpec, ds: DatasetSpec) -> dict[str, Any]:
        """The keys of the RBP runs: the same order, the base's and the levels' ``rbp`` keys only."""
        out = {**spec.common, **{k: spec.base.set[k] for k in spec.base.rbp}, **ds.keys()}
        for lv in self.levels:
            out.update({k: lv.set[k] for k in lv.rbp})
        return out

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for lv in self.levels for k, v in lv.set.items()) or "base"


@dataclass(frozen=True)
class PlannedAblation:
    """One ablation of the study: a shared RBP one (``kind`` rbp) or a setting's (``kind`` ffcl, reading its RBP)."""

    key: str  # the study's name of it: <phase>/<dataset>/<folder>
    phase: str
    dataset: str
    kind: str
    folder: Path
    seeds: tuple[int, ...]
    overrides: dict[str, Any]
    setting: Setting | None = None
    rbp: PlannedAblation | None = None


@dataclass(frozen=True)
class PlannedRun:
    """One (variant, seed) pipeline of the plan."""

    phase: str
    dataset: str
    ablation: str
    variant: str
    seed: int
    folder: Path
    overrides: dict[str, Any]
    done: bool
    wall_s: float | None  # the finished run's own wall time


def _canonical(d: Mapping[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _rbp_folder(rbp: Mapping[str, Any], base_rbp: Mapping[str, Any]) -> str:
    """``base``, or the keys that differ from the base's RBP (``learning_rate=0.0001``); a short hash is added when
    the readable name had to be shortened or cleaned."""
    if _canonical(rbp) == _canonical(base_rbp):
        return "base"
    diff = {k: rbp.get(k, "<unset>") for k in sorted(set(rbp) | set(base_rbp))
            if _canonical({k: rbp.get(k)}) != _canonical({k: base_rbp.get(k)}) or (k in rbp) != (k in base_rbp)}
    text = ",".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, str) else v}" for k, v in diff.items())
    safe = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text)[:80]
    if safe != text:
        safe += "~" + hashlib.sha256(_canonical(rbp).encode()).hexdigest()[:8]
    return safe


def _header_info(ds: DatasetSpec) -> dict[str, Any]:
    """Task, dimensions and split sizes of a dataset's datalist (the header through the untrusted-input gate)."""
    from ffcl_monai.ablate import _header

    path = Path(ds.datalist)
    if not path.is_file():
        raise StudySpecError(f"datasets.{ds.name}.datalist: no file {path}. Make it with `python -m data_prep ...` "
                             f"(data_prep/README.md) or pass --datalist {ds.name}=PATH.")
    header = _header(str(path))
    content = json.loads(path.read_text())
    sizes = {s: len(content.get(s) or []) for s in ("training", "validation", "test")}
    return {"task": header.get("task", "binary"), "dims": 3 if header.get("spatial_dims", 2) == 3 else 2,
            "num_classes": int(header.get("num_classes", 2)), "sizes": sizes}


def _image_size(ds: DatasetSpec, dims: int) -> list[int]:
    return [int(ds.image_size)] * dims if isinstance(ds.image_size, int) else list(ds.image_size)


def _ablation_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("kind") == "ablation" else {}


def factor_settings(spec: StudySpec, task: str) -> list[Setting]:
    """The base and one setting per level of every factor that applies to ``task`` (selection)."""
    out = [Setting("base")]
    for f in spec.factors.values():
        if f.applies(task):
            out += [Setting(lv.label, (lv,)) for lv in f.levels]
    return out


def chosen_setting(spec: StudySpec, chosen: Mapping[str, str], task: str) -> Setting:
    """The base with every factor that applies to ``task`` at its chosen level (``chosen``: factor -> level name,
    ``base`` to keep the base)."""
    levels = []
    for f in spec.factors.values():
        name = chosen.get(f.name, "base")
        if name != "base" and f.applies(task):
            levels.append(next(lv for lv in f.levels if lv.name == name))
    return Setting("chosen", tuple(levels))


def plan_phase(spec: StudySpec, out: Path, phase: str, datasets: Sequence[str],
               chosen: Mapping[str, str] | None = None, infos: Mapping[str, dict[str, Any]] | None = None
               ) -> list[PlannedAblation]:
    """The ablations of one phase on ``datasets`` (in that order), RBP ones before the settings that read them.

    Selection: base + every level, selection seeds, ``<out>/<dataset>/``. Confirmation: the chosen setting and the
    base (once if equal), confirmation seeds, ``<out>/confirm/<dataset>/``; ``chosen`` None plans the upper bound
    (chosen and base distinct, each with its own RBP, both at the base's keys: the cost before selection is done).
    """
    plans: list[PlannedAblation] = []
    for dname in datasets:
        ds = spec.datasets[dname]
        info = (infos or {}).get(dname) or _header_info(ds)
        if phase == "select":
            root, seeds = out / dname, spec.select_seeds
            settings = factor_settings(spec, info["task"])
        else:
            root, seeds = out / "confirm" / dname, spec.confirm_seeds
            if chosen is None:
                settings = [Setting("chosen"), Setting("base")]
            else:  # a chosen setting equal to the base (for this dataset's task) runs once, as the base
                pick = chosen_setting(spec, chosen, info["task"])
                settings = ([pick] if pick.levels else []) + [Setting("base")]
        base_rbp = Setting("base").rbp(spec, ds)
        rbps: dict[str, PlannedAblation] = {}
        for s in settings:
            rbp_keys = s.rbp(spec, ds)
            rname = _rbp_folder(rbp_keys, base_rbp)
            if chosen is None and phase == "confirm" and s.label == "chosen":
                rname = "chosen-upper-bound"
            if rname not in rbps:
                rbps[rname] = PlannedAblation(f"{phase}/{dname}/rbp/{rname}", phase, dname, "rbp", root / "rbp" / rname,
                                              seeds, rbp_keys)
                plans.append(rbps[rname])
            plans.append(PlannedAblation(f"{phase}/{dname}/{s.label}", phase, dname, "ffcl", root / s.label, seeds,
                                         s.ffcl(spec, ds), s, rbps[rname]))
    return plans


def planned_runs(plans: Sequence[PlannedAblation]) -> list[PlannedRun]:
    """Every (variant, seed) pipeline of ``plans`` once (RBP runs live in the RBP ablations), with whether it is done
    (the ablation's ``state.json``)."""
    from ffcl_monai.ablate import step_name

    runs = []
    for p in plans:
        variant = RBP if p.kind == "rbp" else FFCL
        done = _ablation_state(p.folder).get("done", {})
        for seed in p.seeds:
            name = step_name(variant, seed)
            rec = done.get(name)
            wall = rec.get("wall_s") if isinstance(rec, dict) else None
            runs.append(PlannedRun(p.phase, p.dataset, p.key, variant, seed, p.folder / name, p.overrides,
                                   rec is not None, float(wall) if isinstance(wall, (int, float)) else None))
    return runs


# ------------------------------------------------------------------------------------------------ cost estimate
def run_units(variant: str, overrides: Mapping[str, Any], info: Mapping[str, Any]) -> tuple[float, int]:
    """(image-passes of one run in training-step units, bundle steps). Training: the training images used
    (``label_fraction``) x (stage + fine-tuning epochs); forward-only at :data:`FORWARD_COST`: validation every
    ``val_interval`` fine-tuning epochs and each evaluated split (``eval_splits`` the datalist has)."""
    sizes = info["sizes"]
    frac = float(overrides.get("label_fraction", 1.0))
    n_train = max(1, round(sizes["training"] * frac))
    ft = int(overrides.get("max_epochs", 20))
    stage = int(overrides.get("local_epochs", 10)) + int(overrides.get("global_epochs", 10)) if variant == FFCL else 0
    val_every = max(1, int(overrides.get("val_interval", 1)))
    splits = [s for s in (overrides.get("eval_splits") or ["validation", "test"]) if sizes.get(s, 0) > 0]
    forward = sizes["validation"] * (ft // val_every) + sum(sizes[s] for s in splits)
    steps = (2 if variant == FFCL else 0) + 1 + len(splits)
    return n_train * (stage + ft) + FORWARD_COST * forward, steps


def measure_img_per_s(backbone: str, spatial_dims: int, image_size: Sequence[int], batch_size: int = 32,
                      num_classes: int = 2, in_channels: int = 1, iterations: int = 2, repeats: int = 3) -> float:
    """Training images per second of the classifier on this machine: one warm-up iteration (allocation, kernel
    choice), then ``repeats`` timings of ``iterations`` forward + backward + Adam steps on random inputs (CPU, or
    CUDA when present); the median rate, since other jobs on a shared CPU make single timings vary several-fold."""
    import torch

    from ffcl_monai.networks.classifier import Classifier

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    net = Classifier(backbone, num_classes, spatial_dims, in_channels).to(device).train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.rand(batch_size, in_channels, *image_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iterations):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch_size * iterations / max(time.perf_counter() - t0, 1e-9)

    step()
    rates = sorted(timed() for _ in range(max(1, repeats)))
    return rates[len(rates) // 2]


@dataclass
class Estimate:
    """The estimate printed before a study starts (:func:`estimate`)."""

    lines: list[str]
    runs: int
    done: int
    todo: int
    seconds: float
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)

    def text(self) -> str:
        return "\n".join(self.lines)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min ({s} s)" if s >= 3600 else f"{s // 60} min {s % 60:02d} s ({s} s)"


def calibrate(spec: StudySpec, dname: str, info: Mapping[str, Any], runs: Sequence[PlannedRun],
              measure: Callable[..., float] = measure_img_per_s) -> dict[str, Any]:
    """``{"img_per_s", "overhead_s", "source"}`` of one dataset (module docstring: completed runs, spec, measured)."""
    done = [r for r in runs if r.dataset == dname and r.done and r.wall_s and r.wall_s > 0]
    if done:
        units = sum(run_units(r.variant, r.overrides, info)[0] for r in done)
        return {"img_per_s": units / sum(r.wall_s for r in done), "overhead_s": 0.0,
                "source": f"{len(done)} completed run(s) of this study, overhead included"}
    ds = spec.datasets[dname]
    if ds.img_per_s:
        return {"img_per_s": ds.img_per_s, "overhead_s": spec.step_overhead_s, "source": "spec img_per_s"}
    default_batch = 16 if info["dims"] == 3 else 32  # 3d.yaml's and train.yaml's
    batch = int(ds.set.get("batch_size", spec.common.get("batch_size", default_batch)))
    size = _image_size(ds, info["dims"])
    rate = measure(ds.backbone, info["dims"], size, batch, info["num_classes"])
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    return {"img_per_s": rate, "overhead_s": spec.step_overhead_s,
            "source": f"measured now: median of 3 x 2 training iterations of {ds.backbone} at {size}, batch {batch}"
                      f"{load}"}


def estimate(spec: StudySpec, out: Path, phases: Sequence[str], datasets: Sequence[str],
             chosen: Mapping[str, str] | None, infos: Mapping[str, dict[str, Any]],
             measure: Callable[..., float] = measure_img_per_s) -> Estimate:
    """Runs of ``phases`` on ``datasets``, what is done, and the estimated wall time of the rest (module docstring)."""
    lines = [f"Study {spec.name!r} in {out}: phases {', '.join(phases)}; datasets {', '.join(datasets)}"]
    all_runs: list[PlannedRun] = []
    per_phase: dict[str, list[PlannedRun]] = {}
    for phase in phases:
        names = [d for d in datasets if phase == "confirm" or spec.datasets[d].role == "select"]
        per_phase[phase] = planned_runs(plan_phase(spec, out, phase, names, chosen, infos))
        all_runs += per_phase[phase]
    # calibration from every completed run of the dataset in this folder (both phases)
    every = planned_runs([p for ph in PHASES for p in plan_phase(
        spec, out, ph, [d for d in datasets if ph == "confirm" or spec.datasets[d].role == "select"], chosen, infos)])
    cal = {}
    for d in datasets:
        cal[d] = calibrate(spec, d, infos[d], every, measure)
        lines.append(f"  {d}: {cal[d]['img_per_s']:.1f} img/s ({cal[d]['source']})"
                     + (f" + {cal[d]['overhead_s']:.0f} s per bundle step" if cal[d]["overhead_s"] else ""))
    total = 0.0
    for phase, runs in per_phase.items():
        todo = [r for r in runs if not r.done]
        secs = 0.0
        for r in todo:
            units, steps = run_units(r.variant, r.overrides, infos[r.dataset])
            c = cal[r.dataset]
            secs += units / c["img_per_s"] + steps * c["overhead_s"]
        total += secs
        n_ffcl = sum(r.variant == FFCL for r in runs)
        note = " (upper bound: the chosen setting is known once selection is done)" if (
            phase == "confirm" and chosen is None) else ""
        lines.append(f"  {phase}: {len(runs)} runs ({n_ffcl} FFCL, {len(runs) - n_ffcl} RBP), "
                     f"{len(runs) - len(todo)} done, {len(todo)} to do: {_duration(secs)}{note}")
    done = sum(r.done for r in all_runs)
    lines.append(f"Estimated wall time of the {len(all_runs) - done} run(s) left: {_duration(total)}")
    return Estimate(lines, len(all_runs), done, len(all_runs) - done, total, cal)


# ------------------------------------------------------------------------------------------------ verdicts, selection
def verdict(ci_low: float) -> str:
    """``better`` (CI above 0), ``not worse`` (lower bound above -0.01), ``worse`` (neither), ``n/a`` (no bound)."""
    if ci_low is None or not math.isfinite(ci_low):
        return "n/a"
    if ci_low > 0:
        return "better"
    return "not worse" if ci_low > -NON_INFERIORITY_MARGIN else "worse"


def choose_levels(spec: StudySpec, bounds: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per factor, the level with the highest mean pooled ΔAUC CI lower bound over the selection datasets it ran on
    (module docstring). ``bounds``: dataset -> setting label (``base``, ``<factor>=<level>``) -> lower bound.

    Returns ``{factor: {"chosen": level name or "base", "scores": {level: mean bound}, "datasets": [...]}}``.
    """
    out = {}
    for f in spec.factors.values():
        dsets = [d for d, b in bounds.items() if any(lv.label in b for lv in f.levels)]
        scores: dict[str, float] = {}
        for name, label in [("base", "base")] + [(lv.name, lv.label) for lv in f.levels]:
            vals = [bounds[d].get(label, math.nan) for d in dsets]
            scores[name] = float(sum(vals) / len(vals)) if vals and all(math.isfinite(v) for v in vals) else math.nan
        best, best_score = "base", scores["base"] if math.isfinite(scores["base"]) else -math.inf
        for lv in f.levels:  # spec order; strictly greater only: a tie keeps the earlier (the base first)
            if math.isfinite(scores[lv.name]) and scores[lv.name] > best_score:
                best, best_score = lv.name, scores[lv.name]
        out[f.name] = {"chosen": best, "scores": scores, "datasets": dsets}
    return out


# ------------------------------------------------------------------------------------------------ records, tables
def _record(res: Any) -> dict[str, Any]:
    """The study's record of a finished ablation (:class:`ffcl_monai.ablate.AblationResult`): per run its AUC,
    accuracy and wall time; the pooled ΔAUC / ΔAccuracy of FFCL against RBP."""
    from ffcl_monai.ablate import headline_delta

    rows = [{"variant": r["variant"], "seed": r["seed"], "dir": r["dir"],
             "auc": r["metrics"].get("auc", {}).get("value", math.nan),
             "accuracy": r["metrics"].get("accuracy", {}).get("value", math.nan),
             "wall_s": r["wall_s"], "n": r.get("n")} for r in res.rows]
    rec: dict[str, Any] = {"dir": str(res.out), "complete": bool(res.complete), "rows": rows}
    for c in res.comps:
        if c["variant"] == FFCL:
            for m in ("auc", "accuracy"):
                v, lo, hi = headline_delta(c, m)
                rec[f"delta_{m}"] = {"value": v, "ci_low": lo, "ci_high": hi, "seeds": list(c["seeds"])}
    return rec


def _stats(rec: Mapping[str, Any] | None, variant: str) -> tuple[float, float, list[float]]:
    vals = [r["auc"] for r in (rec or {}).get("rows", []) if r["variant"] == variant]
    if not vals:
        return math.nan, math.nan, []
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
    return mean, std, vals


def _pct(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if math.isfinite(std) else " (1 seed)")


def _delta_text(d: Mapping[str, Any] | None) -> str:
    if not d or not math.isfinite(d["value"]):
        return "–"
    if not (math.isfinite(d["ci_low"]) and math.isfinite(d["ci_high"])):
        return f"{100 * d['value']:+.2f} [n/a]"
    return f"{100 * d['value']:+.2f} [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"


def _row_summary(rec: Mapping[str, Any] | None, n_seeds: int) -> dict[str, Any]:
    """Table numbers of one setting's ablation record (None: not run yet)."""
    rbp_mean, rbp_std, _ = _stats(rec, RBP)
    ffcl_mean, ffcl_std, ffcl_vals = _stats(rec, FFCL)
    d = (rec or {}).get("delta_auc")
    complete = bool(rec and rec.get("complete") and len(ffcl_vals) == n_seeds)
    if rec is None:
        status = "not run yet"
    elif not complete:
        status = f"incomplete ({len(ffcl_vals)}/{n_seeds} seeds)"
    else:
        status = verdict(d["ci_low"] if d else math.nan)
    walls = {v: sum(r["wall_s"] for r in (rec or {}).get("rows", []) if r["variant"] == v
                    and isinstance(r["wall_s"], (int, float)) and math.isfinite(r["wall_s"])) for v in (RBP, FFCL)}
    return {"rbp_mean": rbp_mean, "rbp_std": rbp_std, "ffcl_mean": ffcl_mean, "ffcl_std": ffcl_std,
            "delta": d, "verdict": status, "complete": complete, "wall_ffcl": walls[FFCL], "wall_rbp": walls[RBP]}


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    from ffcl_monai.networks.checkpoints import csv_text

    return csv_text(header, rows)


def _save_plot(fig: Any, path: Path) -> Path:
    from ffcl_monai.ablate import _save_figure

    return _save_figure(fig, path)


def _delta_plot(entries: Sequence[tuple[str, str, Mapping[str, Any] | None]], path: Path, title: str) -> Path:
    """Horizontal ΔAUC (percentage points) with 95% CI per entry (group, label, delta dict), grouped, with vertical
    lines at 0 and at minus the non-inferiority margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(entries), 1)
    fig, ax = plt.subplots(figsize=(9.5, 1.4 + 0.32 * n), dpi=110)
    labels = []
    groups = []
    for i, (group, label, d) in enumerate(entries):
        y = n - 1 - i
        labels.append(f"{group}: {label}" if group != label else label)
        if groups and groups[-1] != group:
            ax.axhline(y + 0.5, color="0.85", lw=0.8)
        groups.append(group)
        if d and math.isfinite(d["value"]):
            lo = d["ci_low"] if math.isfinite(d["ci_low"]) else d["value"]
            hi = d["ci_high"] if math.isfinite(d["ci_high"]) else d["value"]
            color = {"better": "tab:green", "not worse": "tab:blue", "worse": "tab:red"}.get(verdict(d["ci_low"]),
                                                                                           "tab:gray")
            err = [[100 * max(d["value"] - lo, 0)], [100 * max(hi - d["value"], 0)]]
            ax.errorbar([100 * d["value"]], [y], xerr=err, fmt="o", color=color, capsize=3)
        else:
            ax.annotate("not finished", (0, y), xytext=(4, 0), textcoords="offset points", fontsize=7, color="0.4",
                        va="center")
    ax.axvline(0, color="black", lw=0.9)
    ax.axvline(-100 * NON_INFERIORITY_MARGIN, color="tab:red", lw=0.9, ls="--",
               label=f"non-inferiority margin (−{100 * NON_INFERIORITY_MARGIN:g} pp)")
    for name, color in (("better", "tab:green"), ("not worse", "tab:blue"), ("worse", "tab:red")):
        ax.plot([], [], "o", color=color, label=name)  # legend entries of the verdict colours
    ax.set_yticks(range(n), list(reversed(labels)) if labels else [""], fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("ΔAUC, FFCL L→G − RBP (percentage points), pooled over seeds, 95% CI", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _save_plot(fig, path)


def _metric_key(*parts: str) -> str:
    """An MLflow metric name (letters, digits, ``_ - . / space`` only)."""
    return re.sub(r"[^\w.\- /]", "_", ".".join(parts))


# ------------------------------------------------------------------------------------------------ the study
class _Budget(Exception):
    """``--max-runs`` reached: stop cleanly."""


@dataclass
class _Context:
    spec: StudySpec
    out: Path
    exp: Any
    infos: dict[str, dict[str, Any]]
    max_runs: int | None
    say: Callable[[str], None]
    new_runs: int = 0
    files: list[Path] = field(default_factory=list)


def _run_ablation(ctx: _Context, p: PlannedAblation) -> dict[str, Any] | None:
    """Run (or continue) one planned ablation; its record once complete (also stored in the study's state), None
    when ``--max-runs`` stopped it (raises :class:`_Budget` after recording what it did)."""
    from ffcl_monai.ablate import plan_ablation, run_ablation, step_name

    exp = ctx.exp
    if exp.done(p.key):
        return exp.result(p.key)
    ds = ctx.spec.datasets[p.dataset]
    info = ctx.infos[p.dataset]
    external = None
    if p.kind == "rbp":
        variants = [RBP]
    else:
        variants = [RBP, FFCL]
        rbp_rec = exp.result(p.rbp.key)
        walls = {(r["variant"], r["seed"]): r["wall_s"] for r in rbp_rec["rows"]}
        external = {(RBP, s): {"dir": str(p.rbp.folder / step_name(RBP, s)), "wall_s": walls.get((RBP, s), math.nan)}
                    for s in p.seeds}
    plan = plan_ablation(ds.datalist, p.folder, variants, list(p.seeds), backbone=str(p.overrides.get(
        "backbone", ds.backbone)), preset=ds.preset, image_size=_image_size(ds, info["dims"]),
        overrides={k: v for k, v in p.overrides.items() if k != "backbone"}, split=ctx.spec.split,
        paired_bootstrap=ctx.spec.paired_bootstrap, experiment_name=ctx.spec.experiment_name, external=external)
    left = None if ctx.max_runs is None else max(ctx.max_runs - ctx.new_runs, 0)
    ctx.say(f"== {p.key} ({'RBP' if p.kind == 'rbp' else p.setting.describe()}), seeds "
            f"{', '.join(map(str, p.seeds))}")
    t0 = time.time()
    # a study runs ~100 pipelines: finished runs' resume checkpoints (~0.8 GB each) would fill the disk
    res = run_ablation(plan, tracking_uri=exp.tracking_uri, parent_run_id=exp.parent_run_id, max_new_runs=left,
                       prune_resume=True)
    ctx.new_runs += res.new_runs
    rec = _record(res)
    partial = exp.state.setdefault("partial", {})
    if not res.complete:  # what it did so far, for the tables (the ablation itself resumes from its own state)
        partial[p.key] = rec
        exp.save()
        raise _Budget(p.key)
    partial.pop(p.key, None)
    exp.state["done"][p.key] = rec
    exp.state["seconds"][p.key] = time.time() - t0
    exp.save()
    return rec


def _selection_tables(ctx: _Context, dname: str) -> dict[str, float]:
    """``<out>/<dataset>/table.md`` / ``.csv`` / ``.png`` from what is done; returns setting label -> ΔAUC lower bound
    of the complete settings."""
    spec, exp = ctx.spec, ctx.exp
    plans = [p for p in plan_phase(spec, ctx.out, "select", [dname], infos=ctx.infos) if p.kind == "ffcl"]
    n_seeds = len(spec.select_seeds)
    n_images = None
    rows, csv_rows, entries = [], [], []
    bounds: dict[str, float] = {}
    for p in plans:
        rec = exp.state["done"].get(p.key) or exp.state.get("partial", {}).get(p.key)
        s = _row_summary(rec, n_seeds)
        factor, level = ("base", "base") if p.setting.label == "base" else p.setting.label.split("=", 1)
        if rec and rec["rows"] and n_images is None:
            n_images = rec["rows"][0].get("n")
        d = s["delta"]
        if s["complete"] and d:
            bounds[p.setting.label] = d["ci_low"]
            exp.metrics.update({_metric_key("select", dname, factor, level, "delta_auc" + suf): d[k]
                                for suf, k in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))})
        rbp_name = p.rbp.folder.name
        keys = "–" if not p.setting.levels else ", ".join(f"`{k}={v}`" for k, v in p.setting.levels[0].set.items())
        rows.append(f"| {factor} | {level} | {keys} | {_pct(s['rbp_mean'], s['rbp_std'])} | "
                    f"{_pct(s['ffcl_mean'], s['ffcl_std'])} | {_delta_text(d)} | {s['verdict']} | "
                    f"{s['wall_ffcl']:.0f} | rbp/{rbp_name} ({s['wall_rbp']:.0f}) |")
        csv_rows.append([dname, factor, level, json.dumps(p.setting.levels[0].set if p.setting.levels else {}),
                         s["rbp_mean"], s["rbp_std"], s["ffcl_mean"], s["ffcl_std"],
                         d["value"] if d else "", d["ci_low"] if d else "", d["ci_high"] if d else "",
                         s["verdict"], f"{s['wall_ffcl']:.1f}", f"{s['wall_rbp']:.1f}", f"rbp/{rbp_name}"])
        entries.append((factor, level, d if s["complete"] else None))
    ds = spec.datasets[dname]
    split_n = f" (n={n_images})" if n_images else ""
    md = [f"# Selection on {dname}: FFCL L→G vs RBP, one factor at a time", "",
          f"Datalist `{ds.datalist}`, {ds.backbone}, image size {_image_size(ds, ctx.infos[dname]['dims'])}, epochs "
          f"{ds.local_epochs} local + {ds.global_epochs} global + {ds.max_epochs} fine-tuning (unless a level sets "
          f"them); {spec.split} split{split_n}; seeds {', '.join(map(str, spec.select_seeds))}.", "",
          "AUC in %, mean ± std over seeds (sample std). ΔAUC = FFCL L→G − RBP in percentage points, paired on the "
          "same images (seed k with seed k), pooled over seeds: mean with a 95% CI that adds the seed-to-seed "
          "variance to the image-sampling variance (ffcl_monai/evaluation/paired.py). Verdict: **better** = CI above "
          f"0; **not worse** = lower bound above −{100 * NON_INFERIORITY_MARGIN:g} pp (−{NON_INFERIORITY_MARGIN:g} AUC); "
          "**worse** = neither "
          "(non-inferiority not shown). Wall: summed run times in s; RBP runs with the same settings are shared "
          "between levels (folder and its wall time in the last column).", "",
          "| factor | level | keys | RBP AUC | FFCL AUC | ΔAUC [95% CI] | verdict | FFCL wall (s) "
          "| RBP runs (wall s) |",
          "|---|---|---|---|---|---|---|---|---|", *rows]
    if n_seeds == 1:
        md += ["", ONE_SEED_NOTE]
    if spec.split == "validation":
        md += ["", "The validation split also selected every checkpoint (best validation AUC), for both arms alike: "
                   "absolute AUCs are optimistic; the paired differences are the evidence."]
    folder = ctx.out / dname
    folder.mkdir(parents=True, exist_ok=True)
    files = [atomic_write_text(folder / "table.md", "\n".join(md) + "\n"),
             atomic_write_text(folder / "table.csv", _csv(
                 ["dataset", "factor", "level", "keys", "rbp_auc_mean", "rbp_auc_std", "ffcl_auc_mean",
                  "ffcl_auc_std", "delta_auc", "delta_auc_ci_low", "delta_auc_ci_high", "verdict", "ffcl_wall_s",
                  "rbp_wall_s", "rbp_runs"], csv_rows)),
             _delta_plot(entries, folder / "table.png", f"{dname}: selection ({spec.split} split, seeds "
                                                         f"{', '.join(map(str, spec.select_seeds))})")]
    for f in files:
        if f not in ctx.files:
            ctx.files.append(f)
    return bounds


def _write_chosen(ctx: _Context, choice: dict[str, dict[str, Any]], bounds: Mapping[str, Mapping[str, float]]) -> None:
    spec = ctx.spec
    md = ["# The chosen setting", "",
          "Rule: per factor, the level (or the base) with the highest pooled ΔAUC 95% CI lower bound (FFCL L→G − RBP), "
          "averaged over the selection datasets the factor ran on; a tie keeps the base. Factors were varied one at a "
          "time: interactions are not tested, so the combined setting is verified in the confirmation phase.", "",
          "| factor | datasets | " + "level: mean lower bound (pp) | " + "chosen |", "|---|---|---|---|"]
    for fname, c in choice.items():
        scores = "; ".join(f"{lv}: {100 * v:+.2f}" if math.isfinite(v) else f"{lv}: n/a"
                           for lv, v in c["scores"].items())
        md.append(f"| {fname} | {', '.join(c['datasets']) or '–'} | {scores} | **{c['chosen']}** |")
    chosen_keys = {}
    for fname, c in choice.items():
        if c["chosen"] != "base":
            lv = next(lv for lv in spec.factors[fname].levels if lv.name == c["chosen"])
            chosen_keys.update(lv.set)
    md += ["", f"Chosen setting = base + {json.dumps(chosen_keys) if chosen_keys else 'nothing (the base)'}."]
    ctx.files += [atomic_write_text(ctx.out / "chosen.md", "\n".join(md) + "\n"),
                  atomic_write_text(ctx.out / "chosen.json", json.dumps(
                      {"rule": "max mean pooled ΔAUC CI lower bound over the selection datasets; ties keep the base",
                       "factors": choice, "keys": chosen_keys, "base": spec.base.set, "bounds": bounds},
                      indent=2, default=str))]
    ctx.exp.log_params({f"chosen.{f}": c["chosen"] for f, c in choice.items()})


def _acceptance(results: Mapping[str, Mapping[str, Any]], datasets: Sequence[str], setting: str) -> dict[str, Any]:
    """The issue-17 criterion for one setting: not worse on every dataset and better on at least one."""
    verdicts = {d: results.get(d, {}).get(setting, {}).get("verdict") for d in datasets}
    pending = [d for d, v in verdicts.items() if v not in ("better", "not worse", "worse", "n/a")]
    worse = [d for d, v in verdicts.items() if v in ("worse", "n/a")]
    better = [d for d, v in verdicts.items() if v == "better"]
    if pending:
        return {"accepted": None, "pending": pending, "worse": worse, "better": better, "verdicts": verdicts}
    return {"accepted": not worse and bool(better), "pending": [], "worse": worse, "better": better,
            "verdicts": verdicts}


def against_plain_defaults(ctx: _Context, plans: Sequence[PlannedAblation]) -> dict[str, dict[str, Any]]:
    """Chosen FFCL L→G against RBP at the *base* keys, per dataset where the chosen setting also changed RBP's keys.

    The study's comparison gives both arms the same learning rate and loss (issue 17: a fair comparison). A user who
    switches from plain training to FFCL compares FFCL at its new defaults with plain training at *its* defaults,
    which the chosen setting does not change; a level that hurts RBP more than FFCL (a lower learning rate) can win
    the fair comparison and still lose this one. Same images, same confirmation seeds (seed k with seed k), pooled
    as in the main table. Returns ``{dataset: {"delta_auc", "ci_low", "ci_high", "verdict", "rbp_folder"}}``.
    """
    from ffcl_monai.ablate import headline_delta, paired_comparisons

    by_ds: dict[str, dict[str, PlannedAblation]] = {}
    for p in plans:
        if p.setting is not None:
            by_ds.setdefault(p.dataset, {})[p.setting.label] = p
    out: dict[str, dict[str, Any]] = {}
    for dname, ps in by_ds.items():
        chosen, base = ps.get("chosen"), ps.get("base")
        if chosen is None or base is None or chosen.rbp is None or base.rbp is None or chosen.rbp.key == base.rbp.key:
            continue
        rec_ffcl, rec_rbp = ctx.exp.state["done"].get(chosen.key), ctx.exp.state["done"].get(base.rbp.key)
        if not (rec_ffcl and rec_rbp):
            continue
        task = ctx.infos[dname]["task"]
        rows = ([{**r, "task": task} for r in rec_ffcl["rows"] if r["variant"] == FFCL]
                + [{**r, "task": task} for r in rec_rbp["rows"] if r["variant"] == RBP])
        comps = paired_comparisons(rows, [RBP, FFCL], ctx.spec.split, ctx.spec.paired_bootstrap)
        if not comps:
            continue
        value, lo, hi = headline_delta(comps[0], "auc")
        out[dname] = {"delta_auc": value, "ci_low": lo, "ci_high": hi, "verdict": verdict(lo),
                      "rbp_folder": str(base.rbp.folder), "seeds": list(comps[0]["seeds"])}
    return out


def _summary(ctx: _Context, choice: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``<out>/confirm/summary.md`` / ``.json`` / ``.png`` from what is done."""
    spec, exp = ctx.spec, ctx.exp
    names = list(spec.datasets)
    chosen = {f: c["chosen"] for f, c in choice.items()}
    plans = [p for p in plan_phase(spec, ctx.out, "confirm", names, chosen, ctx.infos) if p.kind == "ffcl"]
    n_seeds = len(spec.confirm_seeds)
    results: dict[str, dict[str, Any]] = {}
    rows, entries = [], []
    for p in plans:
        rec = exp.state["done"].get(p.key) or exp.state.get("partial", {}).get(p.key)
        s = _row_summary(rec, n_seeds)
        labels = [p.setting.label]
        if p.setting.label == "base" and not any(q.setting.label == "chosen" and q.dataset == p.dataset for q in plans):
            labels = ["chosen", "base"]  # the chosen setting is the base on this dataset: one ablation, both roles
        d = s["delta"]
        for lab in labels:
            results.setdefault(p.dataset, {})[lab] = {
                "rbp_auc_mean": s["rbp_mean"], "rbp_auc_std": s["rbp_std"], "ffcl_auc_mean": s["ffcl_mean"],
                "ffcl_auc_std": s["ffcl_std"], "delta_auc": d["value"] if d else None,
                "ci_low": d["ci_low"] if d else None, "ci_high": d["ci_high"] if d else None,
                "verdict": s["verdict"], "folder": str(p.folder),
                "keys": p.setting.ffcl(spec, spec.datasets[p.dataset])}
            if s["complete"] and d:
                exp.metrics.update({_metric_key("confirm", p.dataset, lab, "delta_auc" + suf): d[k]
                                    for suf, k in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))})
        shown = " = ".join(labels)
        rows.append(f"| {p.dataset} | {spec.datasets[p.dataset].role} | {shown} | "
                    f"{_pct(s['rbp_mean'], s['rbp_std'])} | "
                    f"{_pct(s['ffcl_mean'], s['ffcl_std'])} | {_delta_text(d)} | {s['verdict']} |")
        entries.append((p.dataset, shown, d if s["complete"] else None))
    acc = {lab: _acceptance(results, names, lab) for lab in ("chosen", "base")}
    a = acc["chosen"]
    plain = against_plain_defaults(ctx, plans)
    plain_md = []
    if plain:
        plain_md = ["", "**Against plain training at its own defaults.** The chosen setting also changes RBP's keys "
                    "(above, both arms get them). Plain training keeps its defaults, so a user who switches to FFCL "
                    "sees this difference (FFCL L→G at the chosen setting − RBP at the base's keys; same images and "
                    "seeds):", "", "| dataset | ΔAUC pp [95% CI] | verdict | RBP runs |", "|---|---|---|---|"]
        plain_md += [f"| {d} | {_delta_text({'value': r['delta_auc'], 'ci_low': r['ci_low'], 'ci_high': r['ci_high']})}"
                     f" | {r['verdict']} | {Path(r['rbp_folder']).relative_to(ctx.out)} |" for d, r in plain.items()]
        for d, r in plain.items():
            exp.metrics.update({_metric_key("confirm", d, "chosen_vs_plain", "delta_auc" + suf): r[k]
                                for suf, k in (("", "delta_auc"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))})
    if a["accepted"] is None:
        text = (f"**Not decided yet**: confirmation pending on {', '.join(a['pending'])}. Rerun the same command "
                "to continue.")
    elif a["accepted"]:
        text = (f"**Accepted**: with the chosen setting FFCL L→G is not worse than RBP on all {len(names)} datasets "
                f"and better on {', '.join(a['better'])}.")
    else:
        why = []
        if a["worse"]:
            why.append(f"not shown to be not worse on {', '.join(a['worse'])} (ΔAUC CI lower bound ≤ "
                       f"−{NON_INFERIORITY_MARGIN:g})")
        if not a["better"]:
            why.append("better on none")
        b = acc["base"]
        base_text = ("The base setting does meet it." if b["accepted"] else
                     "Neither does the base setting: **no setting tested in this study achieves FFCL L→G not worse "
                     "than RBP on every dataset and better on at least one.**" if b["accepted"] is False else
                     "The base setting's confirmation is incomplete.")
        text = f"**Not accepted**: with the chosen setting FFCL L→G is {'; '.join(why)}. {base_text}"
    chosen_keys = {k: v for f, c in choice.items() if c["chosen"] != "base"
                   for lv in spec.factors[f].levels if lv.name == c["chosen"] for k, v in lv.set.items()}
    md = ["# FFCL defaults study: confirmation", "",
          f"Chosen setting: base + {json.dumps(chosen_keys) if chosen_keys else 'nothing (the base)'} "
          "(chosen.md: the rule and the scores). Confirmation seeds "
          f"{', '.join(map(str, spec.confirm_seeds))} (selection used {', '.join(map(str, spec.select_seeds))}); "
          f"{spec.split} split of each datalist.", "",
          f"Criterion (issue 17): ΔAUC = FFCL L→G − RBP pooled over seeds (paired, 95% CI). Better = CI above 0; not "
          f"worse = lower bound above −{NON_INFERIORITY_MARGIN:g} AUC (−{100 * NON_INFERIORITY_MARGIN:g} pp). Accepted when the chosen setting is not worse on "
          "every dataset and better on at least one.", "", text, "",
          "| dataset | role | setting | RBP AUC (%) | FFCL AUC (%) | ΔAUC pp [95% CI] | verdict |",
          "|---|---|---|---|---|---|---|", *rows, *plain_md, "", *([ONE_SEED_NOTE, ""] if n_seeds == 1 else []),
          "Selection datasets were also used to choose the setting (with other seeds); the confirmation-only datasets "
          "are the cleaner test. Interactions between factors were not tested during selection; this table is where "
          "the combination is checked."]
    folder = ctx.out / "confirm"
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"study": spec.name, "split": spec.split, "select_seeds": list(spec.select_seeds),
               "confirm_seeds": list(spec.confirm_seeds), "chosen_levels": chosen, "chosen_keys": chosen_keys,
               "datasets": results, "acceptance": acc, "accepted": a["accepted"],
               "non_inferiority_margin": NON_INFERIORITY_MARGIN, "text": text,
               "against_plain_defaults": plain}
    files = [atomic_write_text(folder / "summary.md", "\n".join(md) + "\n"),
             atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, default=str)),
             _delta_plot(entries, folder / "summary.png",
                         f"confirmation (seeds {', '.join(map(str, spec.confirm_seeds))})")]
    for f in files:
        if f not in ctx.files:
            ctx.files.append(f)
    if a["accepted"] is not None:
        exp.metrics["confirm.accepted"] = float(bool(a["accepted"]))
    return summary


def _settings_diff(earlier: Any, now: Any, path: str = "") -> list[str]:
    if isinstance(earlier, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(earlier) | set(now), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in earlier:
                out.append(f"{p}: added ({now[k]!r})")
            elif k not in now:
                out.append(f"{p}: removed (was {earlier[k]!r})")
            else:
                out += _settings_diff(earlier[k], now[k], p)
        return out
    return [] if earlier == now else [f"{path}: {earlier!r} -> {now!r}"]


def check_folder(spec: StudySpec, out: Path) -> None:
    """Refuse a folder holding a study with another spec (naming the differences) or something else's state."""
    try:
        state = json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(state, dict):
        return
    if state.get("kind") != STUDY_KIND:
        raise StudySpecError(f"{out} holds a {state.get('kind')!r} run, not a study: use another --output-dir")
    earlier = state.get("settings")
    now = spec.settings()
    if isinstance(earlier, dict) and earlier != now:
        diff = _settings_diff(earlier, now)
        raise StudySpecError(f"{out} holds the study with another spec ({'; '.join(diff[:8])}"
                             + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "") + "): its finished runs "
                             "would be mixed with these. Rerun with the same spec, or use another --output-dir.")


def _selection(ctx: _Context) -> tuple[dict[str, dict[str, Any]] | None, dict[str, dict[str, float]]]:
    """The choice once every selection ablation is done (None before), and the bounds per dataset."""
    select = [d for d, ds in ctx.spec.datasets.items() if ds.role == "select"]
    plans = plan_phase(ctx.spec, ctx.out, "select", select, infos=ctx.infos)
    bounds = {d: _selection_tables(ctx, d) for d in select if any(ctx.exp.done(p.key) for p in plans if p.dataset == d)}
    if not all(ctx.exp.done(p.key) for p in plans):
        return None, bounds
    return choose_levels(ctx.spec, bounds), bounds


def run_study(spec: StudySpec, out: str | Path, phase: str = "all", datasets: Sequence[str] | None = None,
              max_runs: int | None = None, say: Callable[[str], None] = logger.info,
              measure: Callable[..., float] = measure_img_per_s, estimate_only: bool = False) -> dict[str, Any]:
    """Run (or continue) the study into ``out`` (module docstring).

    Args:
        spec: from :func:`load_spec`.
        out: the study's folder.
        phase: ``select``, ``confirm`` or ``all``.
        datasets: limit this invocation to these datasets (default: all of the phase's).
        max_runs: start at most this many new (variant, seed) runs, then stop cleanly.
        say: where progress lines and the estimate go.
        measure: the img/s calibration when neither completed runs nor the spec give one.
        estimate_only: print the estimate and return without running or writing anything.

    Returns:
        ``{"estimate": Estimate, "new_runs", "stopped": bool, "chosen": {...} | None, "summary": {...} | None}``.
    """
    from ffcl_monai.workflows.experiment import Experiment

    out = Path(out).resolve()
    if phase not in ("select", "confirm", "all"):
        raise StudySpecError(f"--phase {phase!r}: use select, confirm or all")
    names = list(datasets) if datasets else list(spec.datasets)
    for d in names:
        if d not in spec.datasets:
            raise StudySpecError(f"--datasets: {d!r} is not a dataset of the spec "
                                 f"(datasets: {', '.join(spec.datasets)})")
    if max_runs is not None and max_runs < 0:
        raise StudySpecError("--max-runs must be 0 or more")
    check_folder(spec, out)
    infos = {d: _header_info(ds) for d, ds in spec.datasets.items()}
    for d, ds in spec.datasets.items():
        if not isinstance(ds.image_size, int) and len(ds.image_size) != infos[d]["dims"]:
            raise StudySpecError(f"datasets.{d}.image_size = {list(ds.image_size)}: the datalist {ds.datalist} is "
                                 f"{infos[d]['dims']}D; give {infos[d]['dims']} sizes or one integer")
    phases = list(PHASES) if phase == "all" else [phase]
    # the choice, if selection finished in an earlier invocation (the estimate of the confirmation needs it)
    chosen = _chosen_from_state(out)
    est = estimate(spec, out, phases, names, chosen, infos, measure)
    say(est.text())
    result: dict[str, Any] = {"estimate": est, "new_runs": 0, "stopped": False, "chosen": None, "summary": None}
    if estimate_only:
        return result
    if phase == "confirm" and chosen is None:
        left = _selection_left(spec, out, infos)
        raise StudySpecError(f"the confirmation needs the finished selection: {left} selection run(s) left. Run "
                             "--phase select (for every selection dataset) first.")
    with Experiment(out, STUDY_KIND, experiment_name=spec.experiment_name, run_name=f"study:{spec.name}") as exp:
        exp.state["settings"] = spec.settings()
        exp.save()
        exp.log_params({"spec": spec.source, "name": spec.name, "split": spec.split,
                        "select_seeds": ",".join(map(str, spec.select_seeds)),
                        "confirm_seeds": ",".join(map(str, spec.confirm_seeds)),
                        "datasets": ",".join(f"{d}:{ds.role}" for d, ds in spec.datasets.items()),
                        "factors": ",".join(f"{f.name}[{'|'.join(lv.name for lv in f.levels)}]"
                                            for f in spec.factors.values()) or "none",
                        "paired_bootstrap": spec.paired_bootstrap})
        ctx = _Context(spec, out, exp, infos, max_runs, say)
        choice = None
        try:
            if "select" in phases:
                for d in [d for d in names if spec.datasets[d].role == "select"]:
                    for p in plan_phase(spec, out, "select", [d], infos=infos):
                        _run_ablation(ctx, p)
                        if p.kind == "ffcl":
                            _selection_tables(ctx, d)
            choice, bounds = _selection(ctx)
            if choice is not None:
                _write_chosen(ctx, choice, bounds)
                exp.state["chosen"] = {f: c["chosen"] for f, c in choice.items()}
                exp.save()
                result["chosen"] = choice
            if "confirm" in phases and choice is None:
                say(f"the confirmation waits for the selection: {_selection_left(spec, out, infos)} selection run(s) "
                    "left (every selection dataset; --datasets may have left some out)")
            elif "confirm" in phases:
                chosen = exp.state["chosen"]
                for d in names:
                    for p in plan_phase(spec, out, "confirm", [d], chosen, infos):
                        _run_ablation(ctx, p)
                        if p.kind == "ffcl":
                            _summary(ctx, choice)
                result["summary"] = _summary(ctx, choice)
        except _Budget as stop:
            result["stopped"] = True
            say(f"stopped after {ctx.new_runs} new run(s) (--max-runs {max_runs}) in {stop}; rerun the same command "
                "to continue")
            _selection(ctx)  # the tables with what is done, the interrupted ablation's runs included
            if choice is not None and "confirm" in phases:
                result["summary"] = _summary(ctx, choice)
        result["new_runs"] = ctx.new_runs
        exp.add_artifacts(ctx.files)
    return result


def _selection_left(spec: StudySpec, out: Path, infos: Mapping[str, dict[str, Any]]) -> int:
    select = [d for d, ds in spec.datasets.items() if ds.role == "select"]
    return sum(not r.done for r in planned_runs(plan_phase(spec, out, "select", select, infos=infos)))


def _chosen_from_state(out: Path) -> dict[str, str] | None:
    try:
        state = json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return None
    chosen = state.get("chosen") if isinstance(state, dict) else None
    return chosen if isinstance(chosen, dict) else None


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ffcl_monai.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=None, help=f"study spec YAML (default bundle/configs/{SPEC_DIR}/{DEFAULT_SPEC})")
    p.add_argument("--output-dir", default="runs/ffcl_study")
    p.add_argument("--datalist", action="append", default=[], metavar="NAME=PATH",
                   help="replace a dataset's datalist path of the spec, e.g. --datalist kermany32=datalists/k.json")
    p.add_argument("--phase", default="all", choices=("select", "confirm", "all"))
    p.add_argument("--datasets", default=None, help="comma-separated: limit this invocation to these datasets")
    p.add_argument("--max-runs", type=int, default=None, metavar="N",
                   help="start at most N new runs (one run = one variant and seed), then stop cleanly")
    p.add_argument("--estimate", action="store_true", help="print the run count and estimated wall time, then exit")
    args = p.parse_args(argv)

    datalists = {}
    for item in args.datalist:
        if "=" not in item:
            p.error(f"--datalist {item!r}: use NAME=PATH (a dataset name of the spec)")
        k, v = item.split("=", 1)
        datalists[k.strip()] = v.strip()
    try:
        spec = load_spec(args.spec, datalists)
        names = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
        res = run_study(spec, args.output_dir, args.phase, names, args.max_runs, say=print,
                        estimate_only=args.estimate)
    except UserInputError as e:
        p.error(str(e))
    if args.estimate:
        return 0
    out = Path(args.output_dir).resolve()
    if res["stopped"]:
        print(f"{res['new_runs']} new run(s) this time; rerun the same command to continue.")
    if res["summary"]:
        print("\n" + (out / "confirm" / "summary.md").read_text())
    elif res["chosen"]:
        print("\n" + (out / "chosen.md").read_text())
    from ffcl_monai.handlers.mlflow_tracking import tracking_uri
    from ffcl_monai.redaction import redact_uri

    print(f"files: {out}/<dataset>/table.md, chosen.md, confirm/summary.md; MLflow: mlflow ui --backend-store-uri "
          f"{redact_uri(tracking_uri(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
