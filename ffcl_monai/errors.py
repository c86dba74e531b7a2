"""Errors caused by user input (data, configs, checkpoints), and a last line that states them plainly.

MONAI's config runner wraps every failure in ``RuntimeError("Failed to evaluate ...")``, which buries the useful
message in the middle of a long traceback. The excepthook installed on import prints the innermost
:class:`UserInputError` again as the very last line, where people look.
"""

from __future__ import annotations

import sys
from types import TracebackType


class UserInputError(ValueError):
    """Bad input from the user: the message names the file, datalist entry or config key, and the fix."""


def _innermost_user_error(exc: BaseException | None) -> BaseException | None:
    found = None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (UserInputError, FloatingPointError)) or type(exc).__name__ in ("ImageReadError",):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found


def install_excepthook() -> None:
    """Print the user-facing error once more, alone, after the traceback (idempotent)."""
    previous = sys.excepthook
    if getattr(previous, "_ffcl_monai", False):
        return

    def hook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        previous(etype, value, tb)
        user_error = _innermost_user_error(value)
        if user_error is not None and user_error is not value:
            print(f"\nERROR: {user_error}", file=sys.stderr)

    hook._ffcl_monai = True  # type: ignore[attr-defined]
    sys.excepthook = hook


class ImageReadError(UserInputError):
    """An image could not be read or has the wrong shape; the message names the file and the fix.

    Defined here (and re-exported by :mod:`ffcl_monai.data.transforms`, its historical home) so that the image readers
    (:mod:`ffcl_monai.data.dicom`) and the transforms share it without importing each other."""


class OutputDirError(UserInputError):
    """``output_dir`` cannot be used by this run (:mod:`ffcl_monai.workflows.ownership`): it is in use by another run,
    or it holds an earlier run's results and neither ``--resume True`` nor ``--overwrite True`` was given."""


class OutputDirInUseError(OutputDirError):
    """Another process holds the lock on ``output_dir``; the message names the holder (pid, host, kind, start)."""


class OutputDirHasResultsError(OutputDirError):
    """``output_dir`` holds an earlier run's results; the message names them and both fixes."""
