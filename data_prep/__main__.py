"""Command line: ``python -m data_prep <layout> SRC --out DATALIST.json [options]``, ``python -m data_prep check``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .check import check_datalist, default_workers
from .common import LayoutError, log
from .phi import SaltResolver
from .pipeline import CommonOptions, ensure_outside_src, run_pipeline, source_root
from .splits import SplitError


def _text(s: str) -> str:
    """Printable whatever it holds (file names that are not UTF-8 become escapes instead of crashing print)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


class _StderrHandler(logging.Handler):
    """Log records to the *current* ``sys.stderr`` (so redirections made after setup, e.g. by pytest, are honoured).

    INFO lines are printed as they are; WARNING and above get a ``WARNING:``/``ERROR:`` prefix so they stand out.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if record.levelno >= logging.WARNING:
                msg = f"{record.levelname}: {msg}"
            sys.stderr.write(_text(msg) + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never crash the command
            self.handleError(record)


def _setup_logging() -> None:
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def _common_parser() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("src", metavar="SRC", help="the raw download (never modified)")
    c.add_argument("--out", required=True, help="datalist JSON to write; image paths are stored relative to it")
    c.add_argument("--seed", type=int, default=0, help="seed of every random split (default 0)")
    c.add_argument("--salt", default=None,
                   help="secret salt of the patient-ID and file-name pseudonyms (visible in `ps`: prefer "
                        "$DATA_PREP_SALT). Default: $DATA_PREP_SALT, else the salt file ($DATA_PREP_SALT_FILE or "
                        "~/.config/ffcl-monai/data_prep_salt, generated with mode 0600 when patient IDs come from "
                        "DICOM tags or a CSV column), else the public constant in data_prep/phi.py (with a "
                        "warning). Never written to the datalist; splits do not depend on it")
    c.add_argument("--no-check", dest="check", action="store_false",
                   help="skip opening every image (faster, but broken files and duplicates go unnoticed)")
    c.add_argument("--drop-bad", action="store_true",
                   help="exclude unreadable files instead of failing; they are listed in the header's dropped list")
    c.add_argument("--drop-duplicates", action="store_true",
                   help="when identical images sit in two splits (leakage in an official split), drop the copy in "
                        "the training split (or validation, if the other is in test); identical images under two "
                        "labels (an error otherwise) keep the official test/validation copy, or are all dropped; "
                        "recorded in the header")
    c.add_argument("--pseudonymize-paths", action="store_true",
                   help="for sources whose file or folder names carry patient names or MRNs: the datalist points to "
                        "links with salted-hash names in <out stem>_links/ next to it and names no original file or "
                        "folder (needs a secret salt; SRC is never modified)")
    c.add_argument("--link-mode", choices=("symlink", "copy"), default="symlink",
                   help="with --pseudonymize-paths: symbolic links (default; copies where links are impossible) or "
                        "copies (a folder that can be shared without the original names in link targets)")
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
    _setup_logging()
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
        # one salt per run, shared by the scan (volumes names converted series with it) and the pipeline
        args.salt_resolver = SaltResolver(args.salt, out_dir=Path(out).absolute().parent, src_root=source_root(src))
        scan = args.scan(args)
        opts = CommonOptions(
            src=src, out=out, seed=args.seed, salt=args.salt, check=args.check, drop_bad=args.drop_bad,
            drop_duplicates=args.drop_duplicates,
            workers=args.workers, progress=args.progress, name=args.name,
            val_count=getattr(args, "val_count", None), val_fraction=getattr(args, "val_fraction", None),
            test_count=getattr(args, "test_count", None), test_fraction=getattr(args, "test_fraction", None),
            pseudonymize_paths=args.pseudonymize_paths, link_mode=args.link_mode, salt_resolver=args.salt_resolver,
        )
        rc = run_pipeline(scan, opts)
        print(f"data_prep {args.command}: total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return rc
    except (LayoutError, SplitError) as exc:
        print(_text(f"data_prep {args.command}: error: {exc}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
