"""Masked multi-head losses for auxiliary targets, and how a datalist's metadata becomes those targets.

Awatramani, Akshama, Miller, "In-domain Model Pre-training for Chest X-Rays" (NYU, seed 004), Sec. 4.1 and 5.1: a
backbone is pretrained to predict metadata of each image -- the view (frontal or lateral, "a binary classification
loss"), the patient's sex (binary) and age (regression with a smooth L1 loss) -- and then fine-tuned on the target
labels; Sec. 5.2 also adds these losses to the pathology loss during fine-tuning ("auxiliary losses").

Total auxiliary loss (our formulation of their weighted sum, with missing values masked):

    L_aux = sum_h w_h * mean_{i : y_ih known} l_h(f_h(x_i), y_ih)

with l_h = cross-entropy (``ce``), binary cross-entropy on logits (``bce``) or smooth L1 / Huber (``smooth_l1``,
Girshick, Fast R-CNN, ICCV 2015, Eq. 3). A value is "missing" when it is NaN (what ``null`` in the datalist becomes)
or negative for class targets. A head whose targets are all missing in a batch contributes 0 with a zero gradient,
instead of NaN. Multi-task fine-tuning (:class:`MultiTaskLoss`) adds the pathology loss: L = L_task + L_aux.

A binary target is a ``ce`` head with two classes here: softmax cross-entropy over two logits (a, b) equals the
binary cross-entropy of the single logit b - a, so this is the paper's binary loss, and the same head grows to three
classes when the view target does (AP / PA / lateral).

Targets from a datalist (:func:`encode_view_target`, :func:`resolve_heads`) are checked before any training step:
the number of classes of a ``ce`` head comes from the datalist (its header's ``<field>_names``, else the largest
value + 1), never from a constant the data can exceed, and a value outside a head's range stops the run with a
message naming the datalist entry and the ``aux_heads`` key, instead of an ``IndexError`` (a device-side assert on
CUDA) in the middle of an epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ffcl_monai.errors import UserInputError

logger = logging.getLogger(__name__)

KINDS = ("ce", "bce", "smooth_l1")
#: batch keys a head may never be named after (multi-task fine-tuning also reserves its pathology ``label``)
RESERVED_FIELDS = ("image",)


class AuxTargetError(UserInputError):
    """An auxiliary target the datalist cannot supply as configured (the message names the entry and the key)."""


@dataclass
class HeadSpec:
    """One auxiliary target.

    Args:
        kind: ``ce`` (classes), ``bce`` (binary, 1 logit) or ``smooth_l1`` (regression).
        weight: w_h in the total loss.
        num_outputs: outputs of the head: the number of classes for ``ce`` (None = from the datalist, see
            :func:`resolve_heads`); always 1 otherwise.
        scale: regression targets are divided by this before the loss (e.g. 100 for age in years), so that the
            smooth-L1 transition at 1 sits at a sensible place and the heads have comparable magnitudes.
        beta: smooth-L1 transition point.
    """

    kind: str
    weight: float = 1.0
    num_outputs: int | None = None
    scale: float = 1.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"auxiliary head kind {self.kind!r} unknown; use one of {KINDS} in the `aux_heads` key.")
        if self.kind == "ce" and self.num_outputs is not None and int(self.num_outputs) < 2:
            raise ValueError("a `ce` auxiliary head needs num_outputs >= 2 (the number of classes) in `aux_heads`, "
                             "or no num_outputs (then it comes from the datalist).")
        if self.kind != "ce":
            self.num_outputs = 1
        elif self.num_outputs is not None:
            self.num_outputs = int(self.num_outputs)
        if not math.isfinite(float(self.weight)) or float(self.weight) < 0:
            raise ValueError(f"auxiliary head weight {self.weight!r} must be a finite number >= 0 in `aux_heads`.")


def parse_heads(heads: Mapping[str, Mapping | HeadSpec]) -> dict[str, HeadSpec]:
    """Turn the `aux_heads` config mapping ``{field: {kind, weight, num_outputs, ...}}`` into :class:`HeadSpec`s."""
    if not heads:
        raise ValueError("`aux_heads` is empty; name at least one metadata field, e.g. {sex: {kind: bce}}.")
    return {k: v if isinstance(v, HeadSpec) else HeadSpec(**dict(v)) for k, v in heads.items()}


def known_mask(target: torch.Tensor, kind: str) -> torch.Tensor:
    """True where the target value is present (not NaN; for class targets also not negative)."""
    target = target.reshape(target.shape[0], -1)[:, 0] if target.ndim > 1 else target
    mask = ~torch.isnan(target.float())
    if kind in ("ce", "bce"):
        mask &= target.float() >= 0
    return mask


def masked_head_loss(pred: torch.Tensor, target: torch.Tensor, spec: HeadSpec) -> tuple[torch.Tensor, int]:
    """Loss of one head over the samples whose target is known, and how many there were."""
    target = target.reshape(-1).to(pred.device)
    mask = known_mask(target, spec.kind)
    n = int(mask.sum())
    if n == 0:
        return pred.sum() * 0.0, 0  # keeps the graph (DDP needs every parameter used) with a zero gradient
    p, t = pred[mask], target[mask]
    if spec.kind == "ce":
        # Checked here too (the datalist check runs first): on CUDA an out-of-range class is a device-side assert
        # that names nothing; one comparison per batch is cheap next to the forward pass.
        if int(t.max()) >= p.shape[-1]:
            raise AuxTargetError(
                f"an auxiliary class target is {int(t.max())} but its head has {p.shape[-1]} outputs (classes "
                f"0..{p.shape[-1] - 1}); give the head `num_outputs` >= {int(t.max()) + 1} in `aux_heads`, or leave "
                "num_outputs out so that it comes from the datalist."
            )
        return F.cross_entropy(p.float(), t.long()), n
    p = p.reshape(-1).float()
    if spec.kind == "bce":
        return F.binary_cross_entropy_with_logits(p, t.float()), n
    return F.smooth_l1_loss(p, t.float() / spec.scale, beta=spec.beta), n


class MaskedMultiHeadLoss(nn.Module):
    """Weighted sum of masked per-head losses (module docstring).

    ``forward(preds, targets)`` takes two mappings keyed by field name; it returns the total loss and stores the
    per-head values of the last call in ``self.last`` (for logging).
    """

    def __init__(self, heads: Mapping[str, Mapping | HeadSpec]) -> None:
        super().__init__()
        self.heads = parse_heads(heads)
        self.last: dict[str, float] = {}

    def forward(self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total: torch.Tensor | None = None
        self.last = {}
        for name, spec in self.heads.items():
            if name not in targets:
                raise KeyError(f"auxiliary target {name!r} is not in the batch; add it to the datalist or `aux_heads`.")
            loss, n = masked_head_loss(preds[name], targets[name], spec)
            self.last[f"loss_{name}"] = float(loss.detach())
            self.last[f"known_{name}"] = float(n)
            term = spec.weight * loss
            total = term if total is None else total + term
        assert total is not None
        return total


class MultiTaskLoss(nn.Module):
    """Multi-task fine-tuning (seed 004, Sec. 5.2): ``L = L_task(logits, y) + sum_h w_h * L_h`` (module docstring).

    ``forward(preds, targets)``: both mappings hold the pathology entry under ``label_key`` (logits and labels, as
    the downstream loss takes them) and one entry per auxiliary head. ``self.heads`` are the auxiliary heads;
    ``self.last`` holds ``loss_<label_key>`` and the auxiliary heads' ``loss_<field>``/``known_<field>`` of the last
    call.

    Args:
        task_loss: the downstream loss (``ffcl_monai.losses.classification.make_loss``: CE, or masked BCE for
            multi-label targets with -1 = ignore).
        heads: the auxiliary heads (``aux_heads``, resolved by :func:`resolve_heads`).
        label_key: the key of the pathology logits and labels.
    """

    def __init__(self, task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 heads: Mapping[str, Mapping | HeadSpec], label_key: str = "label") -> None:
        super().__init__()
        self.task_loss = task_loss
        self.aux = MaskedMultiHeadLoss(heads)
        if label_key in self.aux.heads:
            raise ValueError(f"`aux_heads` names {label_key!r}, the pathology label; rename that auxiliary target.")
        self.heads = self.aux.heads
        self.label_key = label_key
        self.last: dict[str, float] = {}

    def forward(self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # float32 whatever the autocast dtype of the forward pass (as the project's other losses)
        task = self.task_loss(preds[self.label_key].float(), targets[self.label_key]).mean()
        aux = self.aux(preds, targets)
        self.last = {f"loss_{self.label_key}": float(task.detach()), **self.aux.last}
        return task + aux


# --- targets from a datalist ----------------------------------------------------------------------------------------

#: ``view_target`` -> the classes of the view head, in index order.
VIEW_TARGETS: dict[str, list[str]] = {
    "frontal_lateral": ["FRONTAL", "LATERAL"],  # seed 004, Sec. 5.1: "the angle of the xray (front or lateral)"
    "ap_pa": ["AP", "PA"],                      # what varies in a frontal-only set (NIH ChestX-ray14)
    "ap_pa_lateral": ["AP", "PA", "LATERAL"],   # data_prep's stored codes (view_names), unchanged
}
#: stored view name (data_prep's ``view_names``) -> its class under each target; None = unknown there (masked).
_VIEW_CLASS: dict[str, dict[str, str | None]] = {
    "frontal_lateral": {"AP": "FRONTAL", "PA": "FRONTAL", "FRONTAL": "FRONTAL", "LATERAL": "LATERAL"},
    "ap_pa": {"AP": "AP", "PA": "PA", "FRONTAL": None, "LATERAL": None},
    "ap_pa_lateral": {"AP": "AP", "PA": "PA", "FRONTAL": None, "LATERAL": "LATERAL"},
}
VIEW_TARGET_CHOICES = (*VIEW_TARGETS, "as_is")


def header_names(header: Mapping[str, Any], key: str, where: str) -> list[str] | None:
    """Class names in index order from a header mapping such as ``view_names: {"0": "AP", ...}``, as plain text.

    Header text is data (:mod:`ffcl_monai.workflows.untrusted`): a name with config syntax is refused, never passed on.
    """
    from ffcl_monai.workflows.untrusted import UntrustedInputError, refuse_config_syntax, text_list

    value = header.get(key)
    if value is None:
        return None
    refuse_config_syntax(value, key, where)
    try:
        if isinstance(value, Mapping):
            keys = sorted(value, key=int)
            if [int(k) for k in keys] != list(range(len(keys))):
                raise ValueError("its keys are not 0..N-1")
            value = [value[k] for k in keys]
        return text_list().parse(value)
    except (TypeError, ValueError) as e:
        raise UntrustedInputError(f"{where}: `{key}` must map class indices \"0\", \"1\", ... to plain-text names "
                                  f"({e}).") from None


def _entry(where: str, i: int, item: Mapping[str, Any]) -> str:
    return f"{where}, training[{i}] ({item.get('image')})"


def encode_view_target(
    items: Sequence[Mapping[str, Any]], heads: Mapping[str, Any], header: Mapping[str, Any], view_target: str,
    where: str, field: str = "view",
) -> list[dict[str, Any]]:
    """The entries with ``field`` (the stored view code, ``view_names`` in the header) re-coded to ``view_target``.

    ``frontal_lateral`` (default of the configs; seed 004's binary target): AP and PA -> 0 FRONTAL, LATERAL -> 1.
    ``ap_pa``: AP 0, PA 1, laterals missing (masked, they still train the other heads). ``ap_pa_lateral``: AP 0,
    PA 1, LATERAL 2 (data_prep's codes). ``as_is``: the values unchanged (class indices of your own). Without
    ``field`` in ``heads`` the entries are returned as they are; without ``view_names`` in the header, too (with a
    warning: the values are then used as class indices as they are).

    Raises:
        AuxTargetError: an unknown ``view_target``, a stored code outside ``view_names``, or a stored name the target
            cannot place.
    """
    if view_target not in VIEW_TARGET_CHOICES:
        raise AuxTargetError(f"`view_target` is {view_target!r}; use one of {list(VIEW_TARGET_CHOICES)}.")
    items = [dict(d) for d in items]
    if field not in heads or view_target == "as_is":
        return items
    stored = header_names(header, f"{field}_names", f"datalist {where} header")
    if stored is None:
        logger.warning(
            f"datalist {where} has no `{field}_names` in its header, so `view_target: {view_target}` cannot map its "
            f"`{field}` values; they are used as class indices as they are (say so with `--view_target as_is`)."
        )
        return items
    table, classes = _VIEW_CLASS[view_target], VIEW_TARGETS[view_target]
    unknown = sorted({n for n in stored if n.upper() not in table})
    if unknown:
        raise AuxTargetError(
            f"datalist {where}: `{field}_names` holds {unknown}, which `view_target: {view_target}` cannot place "
            f"(known: {sorted(table)}). Use `--view_target as_is` to train on the stored codes."
        )
    for i, d in enumerate(items):
        v = d.get(field)
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isnan(v) or v < 0)):
            d[field] = None  # missing (negative class values are missing, as in known_mask)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or not (
                0 <= int(v) < len(stored)):
            raise AuxTargetError(
                f"{_entry(where, i, d)}: `{field}` = {v!r} is not one of the header's `{field}_names` codes "
                f"0..{len(stored) - 1}. Re-create the datalist with data_prep, or fix the entry."
            )
        cls = table[stored[int(v)].upper()]
        d[field] = None if cls is None else classes.index(cls)
    return items


def _number(v: Any) -> float | None:
    """A metadata value as a float, None when missing; anything else is not a number."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError
    return None if math.isnan(float(v)) else float(v)


def resolve_heads(
    heads: Mapping[str, Mapping | HeadSpec], items: Sequence[Mapping[str, Any]], header: Mapping[str, Any],
    view_target: str = "as_is", where: str = "datalist", view_field: str = "view",
    reserved: Sequence[str] = RESERVED_FIELDS,
) -> dict[str, dict[str, Any]]:
    """The ``aux_heads`` with every ``ce`` head's number of classes taken from the data, after checking each value.

    Classes of a ``ce`` head: ``VIEW_TARGETS[view_target]`` for the view field (when the header names the stored
    views), else the header's ``<field>_names``, else the largest known value + 1 (at least 2). An explicit
    ``num_outputs`` must hold every value. Checked for every entry: a number or null; ``ce``: a whole number inside
    the head's classes (negative = missing); ``bce``: 0 or 1 (or in between); ``smooth_l1``: finite. A class head
    whose known values are all the same is refused (it would learn a constant; for the view: a frontal-only set).

    Args:
        heads: the ``aux_heads`` config mapping.
        items: the datalist entries the heads train on (after :func:`encode_view_target`).
        header: the datalist header (``<field>_names`` are read as plain text).
        view_target: the config's ``view_target``.
        where: the datalist, named in messages.
        view_field: the metadata field of the view.
        reserved: batch keys of their own that no head may be named after (multitask.yaml: ``image``, ``label``).

    Returns:
        ``{field: {kind, weight, num_outputs, scale, beta}}`` (plain data, logged as it is).

    Raises:
        AuxTargetError: naming the entry, the value and the ``aux_heads`` key or ``view_target`` that fixes it.
    """
    specs = parse_heads(heads)
    out: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        key = f"aux_heads#{name}"
        if name in reserved:
            raise AuxTargetError(f"`{key}`: {name!r} is a batch key of its own here ({', '.join(reserved)}); an "
                                 "auxiliary target needs another field name.")
        values: list[float | None] = []
        for i, d in enumerate(items):
            try:
                values.append(_number(d.get(name)))
            except TypeError:
                raise AuxTargetError(
                    f"{_entry(where, i, d)}: auxiliary target {name!r} is {d.get(name)!r}; it must be a number or "
                    "null (view and other classes as indices, sex as 0/1, age in years)."
                ) from None
        known = [(i, v) for i, v in enumerate(values) if v is not None and not (spec.kind != "smooth_l1" and v < 0)]
        if not known:
            extra = (f" after `view_target: {view_target}`" if name == view_field and view_target != "as_is" else "")
            raise AuxTargetError(f"no entry of datalist {where} has a known value for auxiliary target {name!r}{extra};"
                                 f" add it to the datalist or remove it from `aux_heads`.")
        resolved = dataclasses.asdict(spec)
        if spec.kind == "smooth_l1":
            bad = next(((i, v) for i, v in known if not math.isfinite(v)), None)
            if bad is not None:
                raise AuxTargetError(f"{_entry(where, bad[0], items[bad[0]])}: auxiliary target {name!r} is {bad[1]}; "
                                     "regression targets must be finite (null when missing).")
            out[name] = resolved
            continue
        if spec.kind == "bce":
            bad = next(((i, v) for i, v in known if v > 1), None)
            if bad is not None:
                raise AuxTargetError(
                    f"{_entry(where, bad[0], items[bad[0]])}: auxiliary target {name!r} is {bad[1]:g}, but `{key}` "
                    f"is a binary head (kind: bce, targets 0 or 1). For more classes use `--{key}#kind ce`."
                )
        else:  # ce
            bad = next(((i, v) for i, v in known if not float(v).is_integer()), None)
            if bad is not None:
                raise AuxTargetError(f"{_entry(where, bad[0], items[bad[0]])}: auxiliary target {name!r} is {bad[1]}; "
                                     f"a class head (`{key}`, kind: ce) needs whole class indices.")
            if name == view_field and view_target in VIEW_TARGETS and header.get(f"{view_field}_names") is not None:
                names = VIEW_TARGETS[view_target]  # encode_view_target re-coded the stored views to these classes
            else:
                names = header_names(header, f"{name}_names", f"datalist {where} header")
            top_i, top = max(known, key=lambda iv: iv[1])
            n_data = int(top) + 1
            if spec.num_outputs is not None:
                n_out = spec.num_outputs
                fix = (f"set `{key}#num_outputs` to {n_data} or more, or leave num_outputs out (then it comes from the "
                       "datalist)")
            else:
                n_out = len(names) if names is not None else max(2, n_data)
                fix = ("fix the entry or the header's names" if names is not None else "fix the entry")
            if n_data > n_out:
                shown = f" ({', '.join(f'{j} {c}' for j, c in enumerate(names))})" if names else ""
                raise AuxTargetError(
                    f"{_entry(where, top_i, items[top_i])}: auxiliary target {name!r} = {int(top)} is outside the "
                    f"{n_out} classes 0..{n_out - 1} of `{key}`{shown}; {fix}."
                )
            resolved["num_outputs"] = n_out
        distinct = sorted({v for _, v in known})
        if len(distinct) < 2:
            hint = ""
            if name == view_field and view_target == "frontal_lateral":
                hint = (" Every image is frontal (NIH ChestX-ray14, or CheXpert with --frontal-only): the "
                        "frontal-vs-lateral target is constant there. Use `--view_target ap_pa` (AP vs PA), or keep "
                        "the laterals.")
            raise AuxTargetError(
                f"datalist {where}: every known value of auxiliary target {name!r} ({len(known)} entries) is "
                f"{distinct[0]:g}, so `{key}` would learn a constant.{hint or ' Remove it from `aux_heads`.'}"
            )
        out[name] = resolved
    logger.info("auxiliary heads from %s: %s", where,
                ", ".join(f"{k} ({v['kind']}, {v['num_outputs']} output(s), weight {v['weight']:g})"
                          for k, v in out.items()))
    return out
