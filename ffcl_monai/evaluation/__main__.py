"""``python -m ffcl_monai.evaluation`` = the label-efficiency curve command (see label_efficiency.py)."""

import sys

from ffcl_monai.evaluation.label_efficiency import main

if __name__ == "__main__":
    sys.exit(main())
