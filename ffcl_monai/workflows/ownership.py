"""One owner per output folder: a run claims its ``output_dir`` before it writes anything there.

Why: without it, a second run into a finished folder silently replaces ``models/model.pt`` and
``checkpoints/resume.pt`` and appends to ``history.jsonl``, and two runs started together into one new folder race in
the schema migration of the MLflow SQLite store ``mlruns.db`` and can leave it broken for good.

:func:`claim_output_dir` (a config's ``run_id``, evaluated in ``initialize`` BEFORE
``ffcl_monai.handlers.mlflow_tracking.check_tracking`` creates the store):

1. **Exclusive, non-blocking lock**: ``fcntl.flock`` on ``<output_dir>/.lock``, kept for the life of the process (the
   file descriptor lives in a module registry). Another process claiming the folder is refused at once with
   :class:`~ffcl_monai.errors.OutputDirInUseError`, which names the holder (pid, host, kind, start time, run id: see
   "holder's record" below) and says to wait or pick another ``--output_dir``. The kernel drops the lock when the
   holder exits, however it exits (crash, kill -9), so a stale lock never blocks a folder. DataLoader workers forked
   by the holder share the lock (flock belongs to the open file description) until they exit.
2. **Re-entrant within one process**: a pipeline, an experiment or MONAI Label's train task may claim the same folder
   again (its registry entry is reused: a second ``flock`` through a new descriptor would conflict with the process's
   own lock). A sub-folder of a folder the process owns is claimed with its own lock.
3. **torchrun**: only rank 0 (``torch.distributed`` rank, else ``RANK``, else ``LOCAL_RANK``) takes the lock, checks for
   earlier results and moves them aside; the other ranks of the job are never refused. Each rank > 0 gets its *own*
   run id: broadcasting rank 0's id would be a collective inside the claim, which deadlocks wherever rank 0 claims
   alone (the FFCL pipeline runs its evaluate steps on rank 0 while the other ranks wait at a barrier); ranks > 0
   write no history or MLflow runs (``ffcl_monai.data.distributed.rank0_handlers``), so their id is for logs only.
4. **Earlier results** (:data:`RESULT_MARKERS`, e.g. ``models/model.pt``, ``checkpoints/resume.pt``,
   ``history.jsonl``) are refused with :class:`~ffcl_monai.errors.OutputDirHasResultsError` unless the run says what
   to do with them: ``--resume True`` keeps them (continue the run; evaluation and inference, which add reports to a
   training's folder, always claim with ``resume=True``), ``--overwrite True`` starts over and moves the earlier
   run's outputs (:data:`MOVED_ON_OVERWRITE`, a fixed list: inputs such as ``datalist.json`` and other files stay)
   to ``<output_dir>/.overwritten/<timestamp>/``. Nothing is deleted. The MLflow store (``mlruns.db``, ``mlruns/``)
   stays where it is: it holds every run's record, the new run is added to it. Sub-folders are not looked into: they
   are other runs' folders (pipeline steps, per-split evaluations), each claimed on its own.

A re-entrant claim checks for results too: MONAI Label retrains into one folder on purpose and says so
(``overwrite=True``, ``monailabel_app/lib/trainers/classifier.py``), and a second training into a folder its own
process just filled is as much a mistake as one from another process.

The holder's record (pid, host, kind, start, run id) is written twice: into the locked ``.lock`` in place, the moment
the lock is taken (so a run refused a millisecond later can name the holder; it is cleared when the lock is given
back), and atomically into ``owner.json`` for people to read.

Also here: :func:`release_output_dir` (tests, long-lived processes), :func:`run_id_for` (history writers stamp rows
with the current run id), :func:`current_claim`, :func:`find_results` and :func:`overwritten_dirs`.

Filesystems without ``flock`` support (some network mounts) get a warning and an unlocked claim: the results check
and the overwrite rules still apply, concurrent runs are then not detected. NFSv4 and local disks support it.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime as _dt
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ffcl_monai.errors import OutputDirError, OutputDirHasResultsError, OutputDirInUseError

try:
    import fcntl
except ImportError:  # Windows: no flock; claims are unlocked there (documented above)
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "Claim",
    "claim_output_dir",
    "release_output_dir",
    "run_id_for",
    "current_claim",
    "find_results",
    "overwritten_dirs",
    "RESULT_MARKERS",
    "MOVED_ON_OVERWRITE",
    "LOCK_FILE",
    "OWNER_FILE",
    "OVERWRITTEN_DIR",
]

LOCK_FILE = ".lock"
OWNER_FILE = "owner.json"
OVERWRITTEN_DIR = ".overwritten"

#: Paths (relative to ``output_dir``) whose presence means "an earlier run's results are here".
RESULT_MARKERS: tuple[str, ...] = (
    "models/model.pt",             # best model (train, pretraining fine-tune)
    "checkpoints/resume.pt",       # resume state (every training workflow)
    "checkpoints/resume.prev.pt",  # its older generation, which a resume falls back to
    "backbone.pt",                 # pretraining / FFCL stage output
    "history.jsonl",               # per-epoch history
    "state.json",                  # a multi-step experiment's state (workflows.experiment)
    "metrics.json",                # evaluation report
)

#: Top-level entries of ``output_dir`` that ``overwrite=True`` moves to ``.overwritten/<timestamp>/``: what the
#: workflows write about a run. Anything else (inputs such as ``datalist.json``, the MLflow store, sub-folders) stays.
MOVED_ON_OVERWRITE: tuple[str, ...] = (
    "models", "checkpoints", "backbone.pt", "readout.pt", "init_backbone.pt",
    "history.jsonl", "embedding_monitor.jsonl",
    "state.json", "summary.json", "metrics.json",
    "config_resolved.json", "dataset_summary.json", "inference.json", "inference.csv", "predictions.csv",
    "training_curves.png", "goodness.png", "view_pairs.png", "roc.png", "confusion_matrix.png",
    "gradcam_grid.png", "embedding_monitor.png", "reliability.png",
)


@dataclasses.dataclass
class Claim:
    """This process's claim on one folder (see :func:`current_claim`).

    Attributes:
        path: the resolved folder.
        run_id: id of the latest claim (uuid4 hex); :func:`run_id_for` returns it.
        kind: what claimed it last (a workflow's ``run_name``, ``"inference"``, ...).
        rank: the torchrun rank that claimed (only rank 0 holds the lock).
        started: ISO time of the first claim by this process.
        fd: the locked descriptor of ``.lock`` (None on ranks > 0 and where flock is unsupported).
        pid: the claiming process (a forked child inherits the registry but owns nothing).
        moved_to: where ``overwrite=True`` moved the earlier results in the latest claim, else None.
    """

    path: Path
    run_id: str
    kind: str
    rank: int
    started: str
    fd: int | None
    pid: int
    moved_to: Path | None = None


_CLAIMS: dict[Path, Claim] = {}
_REGISTRY_LOCK = threading.Lock()


def _folder(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir).expanduser().resolve()


def _as_bool(value: Any, key: str) -> bool:
    """A ``resume``/``overwrite`` value from a config or command line (``True``, ``"true"``, ``1``...)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise OutputDirError(f"`{key}` must be True or False, got {value!r}; e.g. --{key} True")


def _rank() -> int:
    """torchrun rank without importing torch: the process group's if initialised, else ``RANK``, else ``LOCAL_RANK``."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
        except Exception:  # a half-initialised group: fall back to the environment
            pass
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                logger.warning("ignoring %s=%r (not an integer) when claiming output_dir", var, value)
    return 0


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def find_results(output_dir: str | os.PathLike) -> list[str]:
    """The :data:`RESULT_MARKERS` present in ``output_dir`` (relative paths; empty when none or no folder)."""
    folder = _folder(output_dir)
    return [m for m in RESULT_MARKERS if (folder / m).exists()]


def overwritten_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Folders under ``<output_dir>/.overwritten/`` holding earlier runs' results, oldest first."""
    root = _folder(output_dir) / OVERWRITTEN_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime, p.name))


def current_claim(output_dir: str | os.PathLike) -> Claim | None:
    """This process's claim on exactly ``output_dir`` (not a parent or sub-folder), or None."""
    claim = _CLAIMS.get(_folder(output_dir))
    return claim if claim is not None and claim.pid == os.getpid() else None


def run_id_for(output_dir: str | os.PathLike) -> str | None:
    """The run id of this process's latest claim on ``output_dir``, for stamping history rows; None when unclaimed."""
    claim = current_claim(output_dir)
    return claim.run_id if claim is not None else None


# ---------------------------------------------------------------------------------------------------- owner record
def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, empty, or being written
        return None
    return owner if isinstance(owner, dict) else None


def _read_owner(folder: Path) -> dict[str, Any] | None:
    return _read_record(folder / OWNER_FILE)


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return True


def _holder(folder: Path, wait_s: float = 1.0) -> str:
    """Who holds ``folder``: the record the holder wrote into ``.lock`` right after locking it, else ``owner.json``.

    Either may be missing, half-written or left by an earlier, dead owner for a moment after the holder took the lock,
    so they are read again for up to ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        for owner in (_read_record(folder / LOCK_FILE), _read_owner(folder)):
            fresh = owner is not None and (owner.get("host") != socket.gethostname() or _pid_alive(owner.get("pid")))
            if fresh:
                break
        if fresh or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if owner is None:
        return f"another process (its {folder / OWNER_FILE} is missing or unreadable)"
    return (
        f"pid {owner.get('pid')} on host {owner.get('host')}, kind {owner.get('kind')!r}, "
        f"started {owner.get('started')}, run id {owner.get('run_id')}"
    )


def _record(folder: Path, run_id: str, kind: str, started: str, resume: bool, overwrite: bool) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "kind": kind, "run_id": run_id, "started": started,
            "claimed": _now(), "output_dir": str(folder), "resume": resume, "overwrite": overwrite}


def _stamp_lock(fd: int | None, record: dict[str, Any]) -> None:
    """Write the owner record into the locked ``.lock`` itself, at once and without imports, so that a run refused
    in the next millisecond can already name the holder (``owner.json`` follows)."""
    if fd is None:
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)


def _write_owner(folder: Path, record: dict[str, Any]) -> None:
    from ffcl_monai.networks.checkpoints import atomic_write_text  # torch/MONAI: imported only by a lock holder

    atomic_write_text(folder / OWNER_FILE, json.dumps(record, indent=2))


# ---------------------------------------------------------------------------------------------------- locking
def _lock(folder: Path) -> int | None:
    """Take the exclusive lock on ``<folder>/.lock`` without waiting. Returns the descriptor (None: unsupported)."""
    if fcntl is None:
        logger.warning("no fcntl on this platform: %s is claimed without a lock; concurrent runs are not detected",
                       folder)
        return None
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputDirInUseError(
            f"output_dir {folder} is in use by another run: {_holder(folder)}. Two runs in one folder would replace "
            "each other's models/model.pt and checkpoints/resume.pt, mix their history.jsonl and can corrupt its "
            "MLflow store mlruns.db. Wait for that run to finish, or pick another --output_dir."
        ) from None
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            logger.warning("cannot lock %s (%s: the filesystem does not support flock); claiming it without a lock, "
                           "so a second run into this folder will not be detected", folder / LOCK_FILE, e)
            return None
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)  # the owner record in .lock lives exactly as long as the lock
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _move_aside(folder: Path) -> Path | None:
    """Move the :data:`MOVED_ON_OVERWRITE` entries of ``folder`` to a new ``.overwritten/<timestamp>/``."""
    entries = [name for name in MOVED_ON_OVERWRITE if os.path.lexists(folder / name)]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = folder / OVERWRITTEN_DIR / stamp
    n = 0
    while dest.exists():
        n += 1
        dest = folder / OVERWRITTEN_DIR / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in entries:
        os.replace(folder / name, dest / name)  # same filesystem: a rename, nothing is copied or deleted
    logger.warning("--overwrite True: moved the earlier run's results in %s (%s) to %s", folder, ", ".join(entries),
                   dest)
    return dest


# ---------------------------------------------------------------------------------------------------- public API
def claim_output_dir(
    output_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    kind: str = "run",
) -> str:
    """Claim ``output_dir`` for this run and return a new run id (uuid4 hex); see the module docstring.

    Call it before anything is written into the folder, in particular before
    ``ffcl_monai.handlers.mlflow_tracking.check_tracking`` creates the SQLite store there.

    Args:
        output_dir: the run's folder; created if missing (by rank 0 alone under torchrun).
        resume: the folder may hold an earlier run's results, which this run continues (they are kept).
        overwrite: the folder may hold an earlier run's results, which are moved to
            ``<output_dir>/.overwritten/<timestamp>/`` before this run starts.
        kind: what is claiming (e.g. the workflow's ``run_name``); shown to a run that is refused.

    Raises:
        OutputDirInUseError: another process holds the folder (raised at once, no waiting).
        OutputDirHasResultsError: the folder holds results and neither ``resume`` nor ``overwrite`` is true.
        OutputDirError: both ``resume`` and ``overwrite`` are true, or one of them is not a boolean.
    """
    resume = _as_bool(resume, "resume")
    overwrite = _as_bool(overwrite, "overwrite")
    folder = _folder(output_dir)
    if resume and overwrite:
        raise OutputDirError(
            f"--resume True and --overwrite True were both given for output_dir {folder}: --resume continues the "
            f"earlier run there, --overwrite starts over (its results are moved to {folder / OVERWRITTEN_DIR}/"
            "<timestamp>/). Pass only one of them."
        )
    run_id = uuid.uuid4().hex
    rank = _rank()

    with _REGISTRY_LOCK:
        if rank != 0:
            # torchrun: rank 0 of this job creates the folder, holds the lock and handles earlier results (module
            # docstring, point 3). Not even the folder is made here: on other nodes it is either rank 0's (a shared
            # filesystem) or would be a stray empty folder on the node's own disk.
            claim = Claim(folder, run_id, str(kind), rank, _now(), None, os.getpid())
            _CLAIMS[folder] = claim
            logger.debug("rank %d: %s is claimed by rank 0 of this job; run id %s", rank, folder, run_id)
            return run_id

        folder.mkdir(parents=True, exist_ok=True)
        held = current_claim(folder)
        reentrant = held is not None and held.rank == 0
        fd = held.fd if reentrant else _lock(folder)
        started = held.started if reentrant else _now()
        record = _record(folder, run_id, str(kind), started, resume, overwrite)
        try:
            found = find_results(folder)
            if found and not (resume or overwrite):
                raise OutputDirHasResultsError(
                    f"output_dir {folder} already holds the results of an earlier run ({', '.join(found)}). Pass "
                    f"--resume True to continue that run, or --overwrite True to start over (its results are moved "
                    f"to {folder / OVERWRITTEN_DIR}/<timestamp>/, nothing is deleted), or pick another --output_dir."
                )
            moved_to = _move_aside(folder) if overwrite and found else None
            _stamp_lock(fd, record)  # after the (fast) checks: a refused re-entrant claim leaves the record as it was
            claim = Claim(folder, run_id, str(kind), 0, started, fd, os.getpid(), moved_to)
            if fd is not None:
                _write_owner(folder, record)
        except BaseException:
            if not reentrant:
                _unlock(fd)  # a refused or failed claim does not keep the folder
            raise
        _CLAIMS[folder] = claim

    if found and resume:
        logger.info("%s: resume: the earlier results in %s are kept (%s)", kind, folder, ", ".join(found))
    elif found:
        logger.info("%s: overwrite: starting over in %s (earlier results moved to %s)", kind, folder, moved_to)
    logger.info("%s: claimed %s%s, run id %s", kind, folder, " again" if reentrant else "", run_id)
    return run_id


def release_output_dir(output_dir: str | os.PathLike) -> bool:
    """Give up this process's claim on ``output_dir`` (its ``owner.json`` is removed, then the lock released).

    For tests and long-lived processes; a run's claim otherwise ends with its process. Returns False when this
    process held no claim on exactly that folder. A forked child never releases its parent's lock.
    """
    folder = _folder(output_dir)
    with _REGISTRY_LOCK:
        claim = _CLAIMS.pop(folder, None)
        if claim is None or claim.pid != os.getpid():
            return False
        if claim.fd is not None:
            owner = _read_owner(folder)
            if owner is not None and owner.get("pid") == claim.pid and owner.get("host") == socket.gethostname():
                (folder / OWNER_FILE).unlink(missing_ok=True)  # before unlocking: the next owner writes its own
            _unlock(claim.fd)
    logger.debug("released %s", folder)
    return True


@atexit.register
def _release_all() -> None:
    for folder in list(_CLAIMS):
        try:
            release_output_dir(folder)
        except Exception:  # exiting: the kernel drops the locks anyway
            pass
