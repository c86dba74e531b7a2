"""Every benchmark of ``python -m ffcl_monai.bench`` runs end to end in ``--quick`` mode and reports its ratios.

The benches are the project's performance record (docs/performance.md), and they import the workflow layer, the
configs and the engines. A refactor that moves something they use broke ``bench all`` after minutes of work, with no
test noticing: the monitor bench imported a constant that the workflow layer had removed. These tests run each
bench at its smoke-test sizes on synthetic data. They check what the bench reports, not how fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest

from ffcl_monai.bench.__main__ import BENCHMARKS, main

# The headline ratio (or ratios) each bench must report as a finite, positive number.
HEADLINES = {
    "ntxent": "speedup_B256",
    "ffcl": "local_single_pass / supervised epoch",
    "ff": "predict B=1: label_loop / batched",
    "pipeline": "2d_end_to_end_over_model_only",
    "simclr_epoch": "project_over_model_only",
    "monitor": "monitored_over_plain_at_default_interval",
    "cache": "float32_over_compact_bytes",
}

# Slow-marked: the benches that take 5-25 s even at --quick sizes (measured on 2 cores); `ff` takes about 2 s.
SLOW = {"ntxent", "pipeline", "simclr_epoch", "monitor", "cache", "ffcl"}


def test_every_bench_has_a_headline_here():
    assert set(HEADLINES) == set(BENCHMARKS)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BENCHMARKS]
)
def test_bench_quick_reports_its_headline(name, tmp_path):
    rc = main([name, "--quick", "--out", str(tmp_path)])
    assert rc == 0
    reports = list(tmp_path.glob("bench_*.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    (result,) = [r for r in report["results"] if r["name"] == name]
    assert result.get("error") is None
    value = result["ratios"][HEADLINES[name]]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)


def test_one_failing_bench_does_not_lose_the_others(tmp_path, monkeypatch, caplog):
    """``bench all`` runs for many minutes: a bench that raises is reported (traceback in the log, error in the
    JSON, exit status 1), and the benches after it still run and are written."""
    import ffcl_monai.bench.ff as ff_bench
    import ffcl_monai.bench.ntxent as ntxent_bench
    from ffcl_monai.bench.common import BenchResult

    def broken(device, quick, data_root):
        raise ImportError("cannot import name 'X'")

    def fine(device, quick, data_root):
        return BenchResult(name="ff", ratios={"r": 2.0})

    monkeypatch.setattr(ntxent_bench, "run", broken)
    monkeypatch.setattr(ff_bench, "run", fine)
    with caplog.at_level("ERROR"):
        rc = main(["ntxent", "ff", "--quick", "--out", str(tmp_path)])
    assert rc == 1
    assert "ntxent" in caplog.text and "cannot import name 'X'" in caplog.text
    (report,) = tmp_path.glob("bench_*.json")
    results = {r["name"]: r for r in json.loads(report.read_text())["results"]}
    assert "ImportError: cannot import name 'X'" in results["ntxent"]["error"]
    assert results["ff"]["ratios"] == {"r": 2.0} and results["ff"]["error"] is None
