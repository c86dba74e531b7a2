"""The one place where outside text becomes bundle overrides: HTTP requests and datalist headers.

MONAI bundle configs evaluate every string that starts with ``$`` (Python), dereference ``@id``, expand ``%file#id``
macros and instantiate any dict with a ``_target_`` key (MONAI advisory GHSA-873f-pvrv-4x83). That is the point of a
config written by the person who runs it, and a remote-code-execution hole for anything else. So:

- **Trusted**: the command line and config files of the person starting the run. They keep MONAI's full syntax.
- **Untrusted**: the body of a MONAI Label request, and every value read from a datalist (header or entries), because
  datalists are shared between people and sites. Untrusted values reach a config only through :func:`validate`,
  which accepts an allow-list of keys with typed values (int, float, bool, a device ``cpu``/``cuda``/``cuda:N``, a
  path, plain text, a list of plain text) and refuses, naming the key, any value that MONAI would evaluate,
  dereference or instantiate: a string starting with ``$``, ``@`` or ``%`` (after leading white space), at any depth
  of lists and dicts, and any dict with a ``_target_`` (or other ``_reserved_``) key.

Refusing rather than escaping is deliberate: MONAI has no escape syntax for a literal leading ``$``, and a class name
or path that starts with one is far more likely an attack than a real name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ffcl_monai.errors import UserInputError

#: Prefixes MONAI's ConfigParser acts on: ``$`` expression, ``@`` reference, ``%`` macro.
CONFIG_SYNTAX_PREFIXES = ("$", "@", "%")
#: Dict keys MONAI's ConfigComponent acts on (``_target_`` instantiates, ``_requires_`` evaluates, ...).
_RESERVED_KEY = re.compile(r"^_[A-Za-z]+_$")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d{1,2}|mps)$")


class UntrustedInputError(UserInputError):
    """An outside value was refused: it would run code, or it is not on the allow-list, or it has the wrong type."""


def refuse_config_syntax(value: Any, key: str, where: str = "input") -> None:
    """Raise :class:`UntrustedInputError` if ``value`` (at any depth) would be evaluated, dereferenced or instantiated.

    Args:
        value: a JSON-like value (str, number, bool, None, list, tuple, dict).
        key: the key it came from, named in the error (nested positions are appended, e.g. ``labels[1]``).
        where: what it came from, e.g. ``"datalist /data/d.json header"`` or ``"POST /train/xray"``.
    """
    if isinstance(value, str):
        if value.lstrip().startswith(CONFIG_SYNTAX_PREFIXES):
            raise UntrustedInputError(
                f"{where}: `{key}` = {value[:60]!r} starts with {value.lstrip()[0]!r}, which a MONAI bundle config "
                "would evaluate as code or a reference. Values from requests and datalists are data only; remove the "
                "leading character (see SECURITY.md)."
            )
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str) and (_RESERVED_KEY.match(k) or k.lstrip().startswith(CONFIG_SYNTAX_PREFIXES)):
                raise UntrustedInputError(
                    f"{where}: `{key}` is a dict with the key {k!r}, which a MONAI bundle config would instantiate or "
                    "evaluate. Values from requests and datalists are data only (see SECURITY.md)."
                )
            refuse_config_syntax(v, f"{key}.{k}", where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            refuse_config_syntax(v, f"{key}[{i}]", where)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise UntrustedInputError(f"{where}: `{key}` has the type {type(value).__name__}; only JSON values are accepted.")


# --- typed fields of an allow-list -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Field:
    """One allowed key: a parser from the raw value to a typed one, and what to say when it fails."""

    parse: Callable[[Any], Any]
    describe: str


def _fail(what: str) -> None:
    raise ValueError(what)


def integer(lo: int | None = None, hi: int | None = None) -> Field:
    """An integer in ``[lo, hi]``; ``"12"`` and ``12.0`` are accepted, ``True`` and ``1.5`` are not."""

    def parse(v: Any) -> int:
        if isinstance(v, bool):
            _fail("a bool is not an integer")
        if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
            v = int(v)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int):
            _fail("not an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail("out of range")
        return int(v)

    return Field(parse, f"an integer in [{lo}, {hi}]")


def number(lo: float | None = None, hi: float | None = None) -> Field:
    """A finite float in ``[lo, hi]``."""

    def parse(v: Any) -> float:
        if isinstance(v, bool):
            _fail("a bool is not a number")
        if isinstance(v, str):
            if not re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", v):
                _fail("not a number")
            v = float(v)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            _fail("not a finite number")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail("out of range")
        return float(v)

    return Field(parse, f"a number in [{lo}, {hi}]")


def boolean() -> Field:
    """``true``/``false`` (also ``"true"``, ``"1"``, ``"no"``, ...)."""

    def parse(v: Any) -> bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "y", "t", "on"):
            return True
        if isinstance(v, str) and v.strip().lower() in ("false", "0", "no", "n", "f", "off"):
            return False
        _fail("not a boolean")
        return False  # unreachable

    return Field(parse, "true or false")


def device() -> Field:
    """A torch device name: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. A list of those (MONAI Label advertises the
    devices as a list, and clients send it back) means its first element, as MONAI Label reads it."""

    def one(v: Any) -> str:
        if not isinstance(v, str) or not _DEVICE.fullmatch(v.strip()):
            _fail("not a device")
        return v.strip()

    def parse(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            if not v:
                _fail("an empty device list")
            return [one(x) for x in v][0]
        return one(v)

    return Field(parse, "a device: cpu, cuda or cuda:N")


def choice(*options: Any) -> Field:
    """One of ``options`` (compared as given; strings case-insensitively)."""

    def parse(v: Any) -> Any:
        for o in options:
            if v == o or (isinstance(v, str) and isinstance(o, str) and v.strip().lower() == o.lower()):
                return o
        _fail("not an allowed value")

    return Field(parse, f"one of {list(options)}")


def text(max_len: int = 256) -> Field:
    """Plain text, no config syntax, no control characters."""

    def parse(v: Any) -> str:
        if not isinstance(v, str) or len(v) > max_len or any(ord(c) < 32 for c in v):
            _fail("not plain text")
        return v

    return Field(parse, f"plain text (at most {max_len} characters)")


def text_list(max_items: int = 1000, max_len: int = 256) -> Field:
    """A list of plain-text strings (e.g. class names)."""
    item = text(max_len)

    def parse(v: Any) -> list[str]:
        if not isinstance(v, (list, tuple)) or len(v) > max_items:
            _fail("not a list")
        return [item.parse(x) for x in v]

    return Field(parse, f"a list of plain-text strings (at most {max_items})")


def path(must_exist: bool = False) -> Field:
    """A file system path (text without NUL); optionally one that exists."""

    def parse(v: Any) -> str:
        if not isinstance(v, (str, os.PathLike)) or "\0" in str(v) or not str(v).strip():
            _fail("not a path")
        if must_exist and not os.path.exists(v):
            _fail("does not exist")
        return str(v)

    return Field(parse, "a path" + (" that exists" if must_exist else ""))


def validate(raw: Mapping[str, Any], schema: Mapping[str, Field], where: str, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Typed, allow-listed overrides from outside text.

    Every key must be in ``schema`` (or in ``ignore``, then dropped); every value is first checked by
    :func:`refuse_config_syntax` and then parsed by its field.

    Raises:
        UntrustedInputError: naming ``where``, the key and what was expected.
    """
    if not isinstance(raw, Mapping):
        raise UntrustedInputError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise UntrustedInputError(f"{where}: key {key!r} is not a string.")
        refuse_config_syntax(value, key, where)
        if key in ignore:
            continue
        if key not in schema:
            raise UntrustedInputError(
                f"{where}: `{key}` is not an accepted key. Accepted: {sorted(schema)}"
                + (f" (ignored: {sorted(ignore)})" if ignore else "")
                + "."
            )
        try:
            out[key] = schema[key].parse(value)
        except (ValueError, TypeError) as e:
            raise UntrustedInputError(
                f"{where}: `{key}` = {str(value)[:60]!r} is {e}; expected {schema[key].describe}."
            ) from None
    return out


# --- datalist headers ---------------------------------------------------------------------------------------------

#: Header keys that may drive a config, with their types. Everything else in a header (name, description, release,
#: salt kind, provenance ...) is data for people and never reaches a config; it is still checked for config syntax so
#: that a poisoned datalist is refused loudly wherever it is read.
HEADER_FIELDS: dict[str, Field] = {
    "task": choice("binary", "multiclass", "multilabel"),
    "num_classes": integer(1, 100_000),
    "spatial_dims": choice(2, 3),
    "class_names": text_list(),
}


def header_class_names(header: Mapping[str, Any], where: str) -> list[str] | None:
    """Class names in index order from the header's ``labels`` (a ``{"0": name}`` mapping or a list), as plain text.

    Raises:
        UntrustedInputError: if a name would be evaluated by a config, or ``labels`` has an unexpected shape.
    """
    labels = header.get("labels")
    if labels is None:
        return None
    refuse_config_syntax(labels, "labels", where)
    if isinstance(labels, Mapping):
        try:
            keys = sorted(labels, key=int)
        except (TypeError, ValueError):
            raise UntrustedInputError(f"{where}: `labels` keys must be class indices (\"0\", \"1\", ...).") from None
        names = [labels[k] for k in keys]
    elif isinstance(labels, (list, tuple)):
        names = list(labels)
    else:
        raise UntrustedInputError(f"{where}: `labels` must be a mapping of index -> name or a list of names.")
    try:
        return HEADER_FIELDS["class_names"].parse([str(n) if isinstance(n, (int, float)) else n for n in names])
    except ValueError as e:
        raise UntrustedInputError(f"{where}: `labels` is {e}; expected {HEADER_FIELDS['class_names'].describe}.") from None


#: The 3D preset a ``data_prep volumes`` header suggests (``volumes.suggested_volume_preset``): an enum, never code.
VOLUME_PRESET_FIELD = choice("none", "mri", "ct")


def header_volume_preset(header: Mapping[str, Any], where: str) -> str | None:
    """The ``volume_preset`` the header's ``volumes`` entry suggests (``none``/``mri``/``ct``), or None if it has none.

    Only a suggestion: the run logs it next to the config's ``volume_preset`` and never applies it (inference of the
    same model reads no datalist header, so a preset taken from one would make training and serving differ).

    Raises:
        UntrustedInputError: naming ``volumes.suggested_volume_preset`` when the value is not one of the presets.
    """
    volumes = header.get("volumes")
    if not isinstance(volumes, Mapping) or volumes.get("suggested_volume_preset") is None:
        return None
    return validate({"volumes.suggested_volume_preset": volumes["suggested_volume_preset"]},
                    {"volumes.suggested_volume_preset": VOLUME_PRESET_FIELD}, where)["volumes.suggested_volume_preset"]


def header_overrides(header: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The config keys a datalist header may set (``task``, ``num_classes``, ``spatial_dims``, ``class_names``), typed.

    The whole header is checked for config syntax first, so a poisoned header is refused wherever it is read.
    """
    refuse_config_syntax(dict(header), "header", where)
    raw = {k: header[k] for k in ("task", "num_classes", "spatial_dims") if header.get(k) is not None}
    out = validate(raw, HEADER_FIELDS, where)
    names = header_class_names(header, where)
    if names is not None:
        out["class_names"] = names
    return out
