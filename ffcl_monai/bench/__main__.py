"""Benchmark suite entry point:
``python -m ffcl_monai.bench [all|ntxent|ffcl|ff|pipeline|simclr_epoch|monitor|cache] [--quick]``.

Each benchmark lives in its own module ``ffcl_monai/bench/<name>.py`` exposing
``run(device: str, quick: bool, data_root: str | None) -> BenchResult``. Modules are imported lazily so that one
missing optional piece does not stop the others. A bench that raises is logged with its traceback and recorded as
failed in the JSON; the benches after it still run, and the exit status is 1. Options a module's ``run`` also
accepts (``cache``: ``--n``, ``--size``, ...) are passed to it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys

import torch

from ffcl_monai.bench.common import BenchResult, write_report

logger = logging.getLogger(__name__)

BENCHMARKS = ["ntxent", "ffcl", "ff", "pipeline", "simclr_epoch", "monitor", "cache"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffcl_monai.bench", description=__doc__)
    parser.add_argument("which", nargs="*", default=["all"], help=f"all or any of {BENCHMARKS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (smoke test)")
    parser.add_argument("--data-root", default=None, help="path to shared/data for benches that use real images")
    parser.add_argument("--out", default="bench_results", help="folder for the JSON report")
    cache = parser.add_argument_group("cache (datasets larger than memory)")
    cache.add_argument("--n", type=int, default=None, help="synthetic images (default 2000; --quick 200)")
    cache.add_argument("--size", type=int, default=None, help="cached image size in px (default 224; --quick 64)")
    cache.add_argument("--source-size", type=int, default=None, help="size of the written PNGs (default: --size)")
    cache.add_argument("--subset", type=int, default=None, help="images of the RAM vs disk throughput (default 1000)")
    cache.add_argument("--budget-gb", type=float, default=None, help="planner budget (default 5%% of the float32 size)")
    cache.add_argument("--work-dir", default=None, help="where the images and caches go (default: the temp folder)")
    cache.add_argument("--keep", action="store_true", help="keep the images and caches")
    args = parser.parse_args(argv)
    which = BENCHMARKS if "all" in args.which else args.which
    unknown = [w for w in which if w not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from all, {', '.join(BENCHMARKS)}")
    results: list[BenchResult] = []
    for name in which:
        print(f"running {name} on {args.device} ...", flush=True)
        try:
            module = importlib.import_module(f"ffcl_monai.bench.{name}")
            accepted = inspect.signature(module.run).parameters
            extra = {k: v for k, v in vars(args).items() if k in accepted and k not in ("device", "quick", "data_root")}
            result = module.run(device=args.device, quick=args.quick, data_root=args.data_root, **extra)
        except Exception as exc:  # noqa: BLE001 - one broken bench must not lose the minutes the others took
            logger.exception("bench %s failed; the remaining benches still run", name)
            result = BenchResult(name=name, error=f"{type(exc).__name__}: {exc}")
        print(result.table(), flush=True)
        results.append(result)
    path = write_report(results, args.device, args.out)
    print(f"\nJSON report: {path}")
    failed = [r.name for r in results if r.error]
    if failed:
        print(f"FAILED: {', '.join(failed)} (tracebacks above)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
