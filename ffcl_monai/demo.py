"""``make demo``: the main job end to end on the embedded real chest X-ray sample (480 Kermany images, 64 px).

    python -m ffcl_monai.demo [--output-dir runs/demo] [--local-epochs 3] [--global-epochs 3] [--epochs 10] [--rbp]

Runs the FFCL program (:func:`ffcl_monai.workflows.ffcl.run_ffcl`): local per-block contrastive -> global
contrastive -> fine-tune (validation AUC selects the checkpoint) -> the held-out test split once, then prints the test
metrics with bootstrap 95% CIs and the ``mlflow ui`` command. ``--rbp`` runs plain back-propagation (the same
program with no pretraining stage). An interrupted demo continues when rerun; a finished one is shown again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ffcl_monai.handlers.reports import format_metrics_table
from ffcl_monai.redaction import redact_uri
from ffcl_monai.workflows.ffcl import run_ffcl


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
    t0 = time.time()
    what = "plain back-propagation" if args.rbp else "FFCL: local -> global"
    print(f"== {what} -> fine-tune -> test once (ResNet-18, 64 px, validation AUC selects the checkpoint) ==", flush=True)
    summary = run_ffcl(["train.yaml", "ffcl.yaml"], {
        "output_dir": str(out), "stages": "none" if args.rbp else "local,global",
        "local_epochs": args.local_epochs, "global_epochs": args.global_epochs, "max_epochs": args.epochs})
    print(f"demo wall time: {time.time() - t0:.0f} s (all invocations: {summary['wall_s']:.0f} s)")
    test = out / "evaluate_test"
    result = json.loads((test / "metrics.json").read_text())
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlruns.db'}"
    print("\nDemo test metrics (n={}):\n{}".format(result["n"], format_metrics_table(
        result["metrics"], operating_point=result.get("operating_point"), calibration=result.get("calibration"))))
    print(f"\nFiles: {test}/metrics.json, predictions.csv, roc.png, confusion_matrix.png, "
          "reliability.png; "
          f"{out}/finetune/training_curves.png, models/model.pt")
    print(f"MLflow UI: mlflow ui --backend-store-uri {redact_uri(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
