"""How much of bundle/configs is copied: issue 14's count of repeated YAML lines.

A line counts when it is not a comment, is longer than 12 characters once its indentation and trailing comment are
stripped, and appears verbatim elsewhere among ``bundle/configs/*.yaml`` (in the same or another file). Lines repeated
only between ``train.yaml`` and ``inference.yaml`` are reported apart: both files must load on their own as MONAI
ConfigWorkflows (MONAI Label's bundle tasks, model-zoo tooling), so what they share cannot be a cross-file ``%``
reference. The target (tests/test_config_repetition.py) is that the rest stays under 20% of all counted lines.

    python scripts/config_repetition.py [--top 20]
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "bundle" / "configs"
STANDALONE_PAIR = frozenset({"train.yaml", "inference.yaml"})
MIN_CHARS = 12


@dataclass
class Repetition:
    """The count: ``counted`` lines in all, ``repeated`` of them seen elsewhere, ``pair_only`` of those only between
    train.yaml and inference.yaml; ``top`` the most repeated other lines with their count."""

    files: int
    counted: int
    repeated: int
    pair_only: int
    top: list[tuple[int, str]]

    @property
    def rest(self) -> int:
        return self.repeated - self.pair_only

    @property
    def rest_fraction(self) -> float:
        return self.rest / self.counted if self.counted else 0.0


def counted_lines(path: Path) -> list[str]:
    """The lines of one YAML file that the count considers (stripped, trailing comment dropped)."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if " #" in line:
            line = line.split(" #")[0].rstrip()
        if len(line) > MIN_CHARS:
            out.append(line)
    return out


def count(configs: Path = CONFIGS, top: int = 20) -> Repetition:
    """Count the repeated lines of ``configs/*.yaml`` (sub-folders, e.g. studies/, are plain data and left out)."""
    files = sorted(configs.glob("*.yaml"))
    lines = [(f.name, line) for f in files for line in counted_lines(f)]
    seen = collections.Counter(line for _, line in lines)
    where: dict[str, set[str]] = collections.defaultdict(set)
    for name, line in lines:
        where[line].add(name)
    repeated = [(name, line) for name, line in lines if seen[line] > 1]
    pair_only = [line for _, line in repeated if where[line] <= STANDALONE_PAIR]
    others = collections.Counter(line for _, line in repeated if not where[line] <= STANDALONE_PAIR)
    return Repetition(len(files), len(lines), len(repeated), len(pair_only),
                      [(k, line) for line, k in others.most_common(top)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=20, help="show the N most repeated lines outside the standalone pair")
    r = count(top=ap.parse_args().top)
    print(f"{r.files} files, {r.counted} counted lines, {r.repeated} repeated ({100 * r.repeated / r.counted:.0f}%)")
    print(f"  only between train.yaml and inference.yaml: {r.pair_only}")
    print(f"  the rest: {r.rest} ({100 * r.rest_fraction:.1f}%)")
    for k, line in r.top:
        print(f"  {k:3d}x {line[:100]}")


if __name__ == "__main__":
    main()
