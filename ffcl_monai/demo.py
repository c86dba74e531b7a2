"""``make demo``: the main job end to end on the embedded real chest X-ray sample (480 Kermany images, 64 px).

    python -m ffcl_monai.demo [--output-dir runs/demo] [--local-epochs 3] [--global-epochs 3] [--epochs 10] [--rbp]

Runs the FFCL pipeline (``bundle/configs/ffcl.yaml``): local per-block contrastive -> global contrastive ->
fine-tune (validation AUC selects the checkpoint) -> the held-out test split once, then prints the test metrics
with bootstrap 95% CIs and the ``mlflow ui`` command. ``--rbp`` runs plain back-propagation (train + evaluate)
instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from monai.bundle import run as bundle_run

import ffcl_monai
from ffcl_monai.redaction import redact_uri
from ffcl_monai.handlers.reports import format_metrics_table


def configs(*names: str) -> list[str]:
    """Paths of bundle config files by name."""
    root = Path(ffcl_monai.bundle_root()) / "configs"
    return [str(root / n) for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffcl_monai.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--global-epochs", type=int, default=3)
    parser.add_argument("--rbp", action="store_true", help="plain back-propagation instead of FFCL")
    parser.add_argument("--fresh", action="store_true", help="delete the output dir first")
    args = parser.parse_args(argv)
    out = Path(args.output_dir).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    if (out / "metrics.json").exists():
        # A finished demo in this folder: keep it (a rerun would append a second run to the same store).
        print(f"{out} already holds a finished demo; use --fresh or another --output-dir to run again.")
    else:
        t0 = time.time()
        common = dict(meta_file=configs("metadata.json")[0], logging_file=configs("logging.conf")[0], output_dir=str(out))
        if args.rbp:
            print("== train (ResNet-18, 64 px, validation AUC selects the checkpoint) ==", flush=True)
            bundle_run(config_file=configs("common.yaml", "train.yaml"), max_epochs=args.epochs, **common)
            print("== evaluate on the held-out test split (once) ==", flush=True)
            bundle_run(config_file=configs("common.yaml", "evaluate.yaml"), **common)
        else:
            print("== FFCL: local -> global -> fine-tune -> test (ResNet-18, 64 px) ==", flush=True)
            bundle_run(config_file=configs("common.yaml", "ffcl.yaml"), local_epochs=args.local_epochs,
                       global_epochs=args.global_epochs, max_epochs=args.epochs, **common)
        print(f"demo wall time: {time.time() - t0:.0f} s")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlruns.db'}"
    print("\nDemo test metrics (n={}):\n{}".format(
        json.loads((out / "metrics.json").read_text())["n"], format_metrics_table(metrics)))
    print(f"\nFiles: {out}/metrics.json, predictions.csv, roc.png, confusion_matrix.png, training_curves.png")
    print(f"MLflow UI: mlflow ui --backend-store-uri {redact_uri(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
