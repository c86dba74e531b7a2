"""The key tables of README.md and docs/*.md checked against the bundle YAML, so that documented defaults cannot drift.

A *key table* is a markdown table whose header's first cell is ``key`` (the project's ``| key | default | meaning |``
style; ``docs/ffcl.md`` also uses ``| key | values | meaning |``). Every backticked name in its first column is a
config key, and:

(a) the key must exist in a bundle YAML file (top level, or a nested ``a#b`` path);
(b) where the row documents a *literal* default (a number, ``true``/``false``/``null``, a single word, a backticked
    value or a ``[list]``), it must equal the key's value in the YAML file that owns the key for that table.
    Prose ("CUDA available", "see config") and YAML values that are expressions (``$...``, ``@...``) are skipped:
    they cannot be compared as text.

Which file owns a key for a table: the overlay files named in the table's section (between the nearest heading and
the table; a workflow overlay sets the defaults its section documents), then the document's own list
(:data:`DOC_FILES`), then ``train.yaml`` and every other bundle file. ``train.yaml`` and ``inference.yaml`` named in
a section do not reorder the lookup: they are the base every section's overlays sit on. The seed overlays
(``seed*.yaml``) are opt-in settings, never defaults, and are not looked at.

A row with several keys (``| `a`, `b` | 1, 2 |`` or ``| `a` / `b` | x / y |``) splits its default cell at the same
separator (outside brackets, parentheses and backticks); when the counts differ the defaults are prose and only (a)
is checked. A trailing parenthetical (``0 (off)``, ``null (half the RAM)``) is a comment on the literal before it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DOC_PATHS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BASE_FILES = ("train.yaml", "inference.yaml")

# The workflow each document's key tables describe, most specific file first. A key is looked up in the first file
# of this list that defines it (after the overlays its section names), so e.g. pretraining.md's `batch_size` is
# pretrain_simclr.yaml's 128, not train.yaml's 32.
DOC_FILES: dict[str, list[str]] = {
    "README.md": ["train.yaml"],
    "docs/pretraining.md": ["pretrain_simclr.yaml", "pretrain_aux.yaml", "pretrain_barlow.yaml", "train.yaml"],
    "docs/forward_forward.md": ["ff.yaml", "train.yaml"],
    "docs/ffcl.md": ["ffcl.yaml", "ffcl_local.yaml", "ffcl_global.yaml", "train.yaml"],
    "docs/3d_presets.md": ["train.yaml"],
    "docs/performance.md": ["train.yaml"],
}

# Documented-on-purpose differences: (document, key) -> why the table's default is not the YAML's value. Keep each
# entry commented; an entry whose row has since been fixed makes test_allow_list_is_still_needed fail.
ALLOWED_DIFFERENCES: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------------- YAML side
def _yaml_files() -> dict[str, dict]:
    out = {}
    for p in sorted(CONFIGS.glob("*.yaml")):
        if p.name.startswith("seed"):
            continue  # opt-in seed settings (docs/pretraining.md, docs/forward_forward.md), never defaults
        out[p.name] = yaml.safe_load(p.read_text()) or {}
    return out


YAML = _yaml_files()
_MISSING = object()


def yaml_value(content: dict, key: str) -> Any:
    """The value of ``key`` in one parsed config file: a top-level key (also a literal ``a#b`` key, as overlays
    write them), or a nested ``a#b#0`` path; :data:`_MISSING` when absent."""
    if key in content:
        return content[key]
    node: Any = content
    for part in key.split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def is_expression(value: Any) -> bool:
    """A MONAI config expression or reference (``$...``, ``@...``, ``%...``) anywhere in the value."""
    if isinstance(value, str):
        return value.strip().startswith(("$", "@", "%"))
    if isinstance(value, list):
        return any(is_expression(v) for v in value)
    if isinstance(value, dict):
        return True  # a component or a dict of settings: documented in prose, never as one literal
    return False


def lookup_order(doc: str, section_files: list[str]) -> list[str]:
    """Files to search for a table's keys, first match wins (module docstring)."""
    order = [f for f in section_files if f not in BASE_FILES]
    order += DOC_FILES.get(doc, [])
    order += ["train.yaml", *sorted(YAML)]
    seen: list[str] = []
    for f in order:
        if f in YAML and f not in seen:
            seen.append(f)
    return seen


# ------------------------------------------------------------------------------------------------- markdown side
def _cells(line: str) -> list[str]:
    """Cells of a markdown table row (``\\|`` inside a cell is not used in these docs)."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def split_top(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside brackets, parentheses and backticks: ``"[1, 2], x (a, b)"`` -> 2 parts for ``,``."""
    parts, depth, tick, cur, i = [], 0, False, "", 0
    while i < len(text):
        ch = text[i]
        if ch == "`":
            tick = not tick
        elif not tick and ch in "([{":
            depth += 1
        elif not tick and ch in ")]}":
            depth -= 1
        if not tick and depth == 0 and text.startswith(sep, i):
            parts.append(cur)
            cur, i = "", i + len(sep)
            continue
        cur += ch
        i += 1
    parts.append(cur)
    return [p.strip() for p in parts]


_WORD = re.compile(r"^[A-Za-z_][\w.+\-]*$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def doc_literal(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when a documented default is a literal (module docstring), else ``(False, None)``."""
    t = text.strip()
    while True:  # "0 (off)", "null (half the RAM)", "`all_pairs` (default)": the parenthetical is a comment
        m = re.match(r"^(.*\S)\s+\([^()]*\)$", t)
        if not m:
            break
        t = m.group(1).strip()
    if len(t) >= 2 and t.startswith("`") and t.endswith("`") and t.count("`") == 2:
        inner = t[1:-1]
        if _NUMBER.match(inner):
            return True, float(inner)
        try:
            value = yaml.safe_load(inner)
        except yaml.YAMLError:
            return True, inner
        return True, value if isinstance(value, (bool, int, float, list, type(None))) else inner
    if _NUMBER.match(t):
        return True, float(t)
    if t.startswith("[") and t.endswith("]"):
        try:
            value = yaml.safe_load(t)
        except yaml.YAMLError:
            return False, None
        if isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
            return True, value
        return False, None
    if _WORD.match(t):
        return True, yaml.safe_load(t)  # true/false/null become bool/None, any other word stays a string
    return False, None


def same(doc_value: Any, yaml_val: Any) -> bool:
    """Equality of a documented literal and a YAML value: numbers by value (``1e-3`` == ``0.001``; a boolean is never
    a number), strings exactly, lists element by element."""
    if isinstance(doc_value, bool) or isinstance(yaml_val, bool):
        return isinstance(doc_value, bool) and isinstance(yaml_val, bool) and doc_value == yaml_val
    if isinstance(doc_value, (int, float)) and isinstance(yaml_val, (int, float)):
        return math.isclose(float(doc_value), float(yaml_val), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(doc_value, list) and isinstance(yaml_val, list):
        return len(doc_value) == len(yaml_val) and all(same(a, b) for a, b in zip(doc_value, yaml_val))
    if isinstance(doc_value, str) and isinstance(yaml_val, (int, float)):
        return False
    return doc_value == yaml_val


@dataclass
class Row:
    doc: str
    line: int
    key: str
    default_text: str | None  # the key's part of the default cell; None when the row states no default
    section_files: list[str]

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.key}"


def _default_from_values(cell: str) -> str | None:
    """``| key | values |`` tables: "`x` (default), `y`" or "float, default 1.0" -> the default's text."""
    m = re.search(r"(`[^`]+`)\s*\(default\)", cell)
    if m:
        return m.group(1)
    m = re.search(r"\bdefault\s+([^\s,;]+)", cell)
    return m.group(1) if m else None


def key_rows(path: Path, text: str | None = None) -> list[Row]:
    """Every (key, documented default) of every key table in one markdown file."""
    doc = path.relative_to(REPO).as_posix() if path.is_absolute() and REPO in path.parents else path.name
    lines = (text if text is not None else path.read_text()).splitlines()
    rows: list[Row] = []
    section_start = 0
    in_code = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("#"):
            section_start = i
        is_table = (
            not in_code and line.startswith("|") and i + 1 < len(lines)
            and re.match(r"^\|[\s:|-]+\|?\s*$", lines[i + 1]) is not None
        )
        if not is_table:
            i += 1
            continue
        header = [c.lower() for c in _cells(line)]
        body_start = i + 2
        j = body_start
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        if header and header[0] == "key":
            section = "\n".join(lines[section_start:i])
            section_files = list(dict.fromkeys(re.findall(r"([\w.-]+\.yaml)\b", section)))
            default_col = header.index("default") if "default" in header else None
            values_col = header.index("values") if "values" in header else None
            for n in range(body_start, j):
                cells = _cells(lines[n])
                keys = re.findall(r"`([^`]+)`", cells[0])
                if not keys:
                    continue
                if default_col is not None and default_col < len(cells):
                    sep = " / " if " / " in re.sub(r"`[^`]*`", "", cells[0]) else ","
                    parts = split_top(cells[default_col], sep) if len(keys) > 1 else [cells[default_col]]
                    defaults: list[str | None] = parts if len(parts) == len(keys) else [None] * len(keys)
                elif values_col is not None and values_col < len(cells) and len(keys) == 1:
                    defaults = [_default_from_values(cells[values_col])]
                else:
                    defaults = [None] * len(keys)
                for key, d in zip(keys, defaults):
                    rows.append(Row(doc, n + 1, key, d, section_files))
        i = j
    return rows


ROWS = [row for p in DOC_PATHS if p.is_file() for row in key_rows(p)]


def check_row(row: Row) -> str | None:
    """None when the row agrees with the YAML, else a message naming the document, the line, the file and the fix."""
    order = lookup_order(row.doc, row.section_files)
    owner = next((f for f in order if yaml_value(YAML[f], row.key) is not _MISSING), None)
    if owner is None:
        return (f"{row.doc}:{row.line}: key `{row.key}` is in no bundle config ({', '.join(sorted(YAML))}); "
                f"rename it in the table or remove the row")
    if row.default_text is None:
        return None
    ok, doc_value = doc_literal(row.default_text)
    yaml_val = yaml_value(YAML[owner], row.key)
    if not ok or is_expression(yaml_val):
        return None
    if same(doc_value, yaml_val):
        return None
    as_yaml = json.dumps(yaml_val)  # true / null / [1, 2] / "text", as the table would write it
    return (f"{row.doc}:{row.line}: `{row.key}` is documented as {row.default_text!r} but "
            f"bundle/configs/{owner} sets {as_yaml}; write {as_yaml} in the table (or fix the YAML)")


# ------------------------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_documented_key_exists_and_default_matches_yaml(row: Row) -> None:
    problem = check_row(row)
    if problem is not None and (row.doc, row.key) in ALLOWED_DIFFERENCES and "is in no bundle config" not in problem:
        return
    assert problem is None, problem


def test_allow_list_is_still_needed() -> None:
    """An allow-listed difference that no longer differs is stale: remove it so that it cannot hide a later drift."""
    stale = [k for k in ALLOWED_DIFFERENCES if not any((r.doc, r.key) == k and check_row(r) for r in ROWS)]
    assert not stale, f"remove these entries from ALLOWED_DIFFERENCES: {stale}"


def test_the_parser_finds_the_known_key_tables() -> None:
    """Guards against a parser that finds nothing (every check would then pass vacuously)."""
    found = {(r.doc, r.key) for r in ROWS}
    for expected in [
        ("README.md", "batch_size"), ("README.md", "cache_dir"), ("docs/pretraining.md", "temperature"),
        ("docs/pretraining.md", "monitor_plot"), ("docs/forward_forward.md", "threshold"),
        ("docs/forward_forward.md", "torch_threads"), ("docs/ffcl.md", "neg_weight"),
        ("docs/3d_presets.md", "volume_fit"), ("docs/performance.md", "amp_dtype"),
    ]:
        assert expected in found, expected
    # and the literal defaults of a typical multi-key row are read, not skipped as prose
    readme = {r.key: r.default_text for r in ROWS if r.doc == "README.md"}
    assert readme["max_epochs"] == "20" and readme["learning_rate"] == "1e-3"
    assert readme["target_spacing"] == "[1.5, 1.5, 1.5]" and readme["cache_dir"].startswith("null")


def test_the_checker_reports_a_drifted_default_and_an_unknown_key(tmp_path: Path) -> None:
    """A hand-written doc: train.yaml's batch_size is 32 and temperature lives in pretrain_simclr.yaml (0.5)."""
    doc = tmp_path / "drift.md"
    doc.write_text(
        "## Keys of `pretrain_simclr.yaml`\n\n| key | default | meaning |\n|---|---|---|\n"
        "| `temperature`, `batch_size` | 0.7, 128 | x |\n| `no_such_key` | 1 | x |\n| `amp` | CUDA available | x |\n"
        "| `max_epochs` / `proj_layers` | 50 / 2 | x |\n"
    )
    rows = key_rows(doc)
    assert [(r.key, r.default_text) for r in rows] == [
        ("temperature", "0.7"), ("batch_size", "128"), ("no_such_key", "1"), ("amp", "CUDA available"),
        ("max_epochs", "50"), ("proj_layers", "2"),
    ]
    problems = {r.key: check_row(r) for r in rows}
    assert "sets 0.5" in problems["temperature"] and "pretrain_simclr.yaml" in problems["temperature"]
    assert problems["batch_size"] is None  # the section names pretrain_simclr.yaml: its 128, not train.yaml's 32
    assert "is in no bundle config" in problems["no_such_key"]
    assert problems["amp"] is None  # prose default, expression in YAML: not compared
    assert problems["max_epochs"] is None and problems["proj_layers"] is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20", (True, 20.0)), ("1e-3", (True, 0.001)), ("false", (True, False)), ("`true`", (True, True)),
        ("null (half the available RAM)", (True, None)), ("0 (off)", (True, 0.0)), ("`runs/default`", (True, "runs/default")),
        ("[64, 64]", (True, [64, 64])), ("`[1.5, 1.5, 1.5]`", (True, [1.5, 1.5, 1.5])), ("`pca+tsne`", (True, "pca+tsne")),
        ("none", (True, "none")), ("CUDA available", (False, None)), ("NORMAL/PNEUMONIA", (False, None)),
        ("see config", (False, None)), ("`all_pairs`", (True, "all_pairs")),
    ],
)
def test_doc_literal(text: str, expected: tuple[bool, Any]) -> None:
    assert doc_literal(text) == expected


def test_split_top_respects_brackets_parentheses_and_backticks() -> None:
    assert split_top("none, [1.5, 1.5, 1.5], [40, 400], resize", ",") == ["none", "[1.5, 1.5, 1.5]", "[40, 400]", "resize"]
    assert split_top("null (`$X`, else `~/a, b`), true, null (half)", ",") == ["null (`$X`, else `~/a, b`)", "true", "null (half)"]
    assert split_top("overlay / 1.0", " / ") == ["overlay", "1.0"]
