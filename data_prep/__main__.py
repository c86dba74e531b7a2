"""Command line: ``python -m data_prep <layout> SRC --out DATALIST.json [options]``, ``python -m data_prep check``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .check import check_datalist, default_workers
from .common import LayoutError
from .pipeline import CommonOptions, ensure_outside_src, run_pipeline
from .splits import SplitError


def _common_parser() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("src", metavar="SRC", help="the raw download (never modified)")
    c.add_argument("--out", required=True, help="datalist JSON to write; image paths are stored relative to it")
    c.add_argument("--seed", type=int, default=0, help="seed of every random split (default 0)")
    c.add_argument("--salt", default=None,
                   help="salt of the patient-ID hash (default: $DATA_PREP_SALT, else the public constant in "
                        "data_prep/phi.py); never written to the datalist")
    c.add_argument("--no-check", dest="check", action="store_false",
                   help="skip opening every image (faster, but broken files and duplicates go unnoticed)")
    c.add_argument("--drop-bad", action="store_true",
                   help="exclude unreadable files instead of failing; they are listed in the header's dropped list")
    c.add_argument("--drop-duplicates", action="store_true",
                   help="when identical images sit in two splits (leakage in an official split), drop the copy in "
                        "the training split (or validation, if the other is in test); recorded in the header")
    c.add_argument("--workers", type=int, default=None, help=f"threads that open images (default {default_workers()})")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    c.add_argument("--name", default=None, help="datalist name in the header (default: the --out file stem)")
    return c


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (one subcommand per layout, plus ``check``)."""
    from .layouts import chexpert, kermany, nih, npz, tabular, volumes

    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn a raw medical-image download into a validated MONAI decathlon datalist. SRC is only read.",
        epilog="Run `python -m data_prep <command> --help` for the options of one command. See data_prep/README.md.",
    )
    p.add_argument("--version", action="version", version=f"data_prep {__version__}")
    sub = p.add_subparsers(dest="command", metavar="command", required=True)
    common = _common_parser()
    kermany.add_parser(sub, common)
    chexpert.add_parser(sub, common)
    nih.add_parser(sub, common)
    npz.add_parser(sub, common)
    volumes.add_parser(sub, common)
    tabular.add_parser(sub, common)

    ck = sub.add_parser(
        "check", help="open every image of a datalist and report problems",
        description="Open every image of DATALIST.json in parallel and report unreadable/truncated files, wrong "
                    "dimensionality, mixed channel counts, duplicates across splits (leakage), patients in two splits, "
                    "empty classes and class balance. Exit code 1 when something is wrong.",
        epilog="example: python -m data_prep check kermany/kermany.json",
    )
    ck.add_argument("datalist", metavar="DATALIST.json")
    ck.add_argument("--workers", type=int, default=None, help=f"threads (default {default_workers()})")
    ck.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ck.add_argument("--report-json", default=None, help="also write the findings as JSON to this file")
    return p


def _run_check(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    rep = check_datalist(args.datalist, workers=args.workers, progress=args.progress)
    print(rep.format(f"data_prep check {args.datalist}"))
    if args.report_json:
        from .writer import write_bytes_atomic

        write_bytes_atomic(args.report_json, (json.dumps(rep.to_dict(), indent=2) + "\n").encode())
    print(f"checked in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0 if rep.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _run_check(args)
        t0 = time.perf_counter()
        src, out = Path(args.src), Path(args.out)
        if not src.exists():
            raise LayoutError(f"SRC {src} does not exist")
        if out.suffix.lower() != ".json":
            raise LayoutError(f"--out {out} should end in .json")
        ensure_outside_src(src, out)
        if not args.check and (args.drop_bad or args.drop_duplicates):
            raise LayoutError("--drop-bad and --drop-duplicates need the image check; remove --no-check")
        scan = args.scan(args)
        opts = CommonOptions(
            src=src, out=out, seed=args.seed, salt=args.salt, check=args.check, drop_bad=args.drop_bad,
            drop_duplicates=args.drop_duplicates,
            workers=args.workers, progress=args.progress, name=args.name,
            val_count=getattr(args, "val_count", None), val_fraction=getattr(args, "val_fraction", None),
            test_count=getattr(args, "test_count", None), test_fraction=getattr(args, "test_fraction", None),
        )
        rc = run_pipeline(scan, opts)
        print(f"data_prep {args.command}: total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return rc
    except (LayoutError, SplitError) as exc:
        print(f"data_prep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
