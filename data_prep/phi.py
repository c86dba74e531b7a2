"""Protected health information (PHI) policy helpers.

Patient identifiers (file-name IDs, CSV "Patient ID" columns, DICOM PatientID) are only ever held in memory. What
reaches a datalist, a log line or a report is a salted HMAC-SHA256 digest, truncated to 16 hex characters (64 bits),
so that images of one patient can be grouped without revealing who the patient is. Splits never depend on the salt:
they are computed from the raw identifiers in memory (:mod:`data_prep.splits`), so the same data and seed give the
same split on every machine, whatever the salt.

Where the salt comes from (:class:`SaltResolver`), first match wins:

1. ``--salt`` (visible in ``ps`` and shell history: prefer the next two);
2. the environment variable ``DATA_PREP_SALT``;
3. the salt file: ``$DATA_PREP_SALT_FILE``, else ``$XDG_CONFIG_HOME/ffcl-monai/data_prep_salt`` (``XDG_CONFIG_HOME``
   defaults to ``~/.config``), when it exists;
4. when the identifiers are private (read from DICOM tags or a CSV column, or when paths are pseudonymised): a new
   secret from :func:`secrets.token_hex`, written to that salt file with owner-only permissions (0600) and reused by
   every later run;
5. otherwise the public constant :data:`DEFAULT_SALT`, with a loud warning. It makes datalists reproducible across
   machines, but anybody holding the raw identifiers can recompute the digests (a dictionary of MRNs is enough), so
   it is never used for private identifiers.

The salt value is never written to a datalist, a report or a log; the header only says ``"salt": "custom"``
(``--salt``/``DATA_PREP_SALT``), ``"file"`` (the salt file) or ``"default"``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import LayoutError, is_inside, log

#: Public default salt. Documented on purpose: it gives pseudonymisation and reproducibility, not secrecy.
DEFAULT_SALT = "ffcl-monai/data_prep/v1"

#: Environment variables: the salt itself, and the file that stores a generated one.
SALT_ENV = "DATA_PREP_SALT"
SALT_FILE_ENV = "DATA_PREP_SALT_FILE"

#: DICOM keywords that identify a person or an encounter. They are never copied anywhere; the converter builds NIfTI
#: headers from scratch and reads only geometry and pixel tags. The list exists for tests, for :func:`redact` and for
#: the README.
PHI_DICOM_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName", "MedicalRecordLocator",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName", "InstitutionAddress",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "DeviceSerialNumber",
    "StationName",
)


def resolve_salt(salt: str | None) -> tuple[str, str]:
    """Return ``(salt, kind)`` from the explicit argument, then ``$DATA_PREP_SALT``, then :data:`DEFAULT_SALT`.

    The salt file is not consulted here; :class:`SaltResolver` adds it (and generates one when needed).
    """
    if salt:
        return salt, "custom"
    env = os.environ.get(SALT_ENV)
    if env:
        return env, "custom"
    return DEFAULT_SALT, "default"


def default_salt_file() -> Path:
    """``$DATA_PREP_SALT_FILE``, else ``$XDG_CONFIG_HOME/ffcl-monai/data_prep_salt`` (default ``~/.config/...``)."""
    env = os.environ.get(SALT_FILE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ffcl-monai" / "data_prep_salt"


@dataclass(frozen=True)
class Salt:
    """A resolved salt. ``kind`` ("custom", "file" or "default") is what the header records; the value never is."""

    value: str = field(repr=False)
    kind: str

    @property
    def public(self) -> bool:
        """True for :data:`DEFAULT_SALT` (pseudonyms can be recomputed by anyone who has the raw IDs)."""
        return self.kind == "default"


class SaltResolver:
    """Resolves the salt once per run, lazily, so a scan and the pipeline share it (see the module docstring).

    A generated salt file is refused directly in ``out_dir`` (the datalist's folder: it would be shared with the
    datalist) and anywhere below ``src_root`` (SRC is never written).
    """

    def __init__(self, explicit: str | None = None, out_dir: str | os.PathLike | None = None,
                 src_root: str | os.PathLike | None = None):
        self.explicit = explicit
        self.out_dir = out_dir
        self.src_root = src_root
        self._salt: Salt | None = None

    def get(self, need_secret: bool) -> Salt:
        """The salt; with ``need_secret`` never the public default (one is generated and stored instead)."""
        if self._salt is not None and not (need_secret and self._salt.public):
            return self._salt
        value, kind = resolve_salt(self.explicit)
        if kind == "custom":
            self._salt = Salt(value, "custom")
            return self._salt
        path = default_salt_file()
        if path.exists():
            self._salt = Salt(_read_salt_file(path), "file")
            log.info(f"data_prep: using the secret salt stored in {path}")
        elif need_secret:
            self._check_location(path)
            self._salt = Salt(_create_salt_file(path), "file")
            log.warning(
                f"data_prep: generated a secret salt for the patient pseudonyms and stored it in {path} (mode 0600, "
                "owner only). Later runs reuse it; keep it private and back it up (without it the pseudonyms cannot "
                f"be reproduced). Set ${SALT_ENV} or ${SALT_FILE_ENV} to use another one."
            )
        else:
            self._salt = Salt(DEFAULT_SALT, "default")
        return self._salt

    def _check_location(self, path: Path) -> None:
        real_dir = os.path.realpath(path.parent)
        next_to_datalist = self.out_dir is not None and real_dir == os.path.realpath(self.out_dir)
        in_src = self.src_root is not None and is_inside(real_dir, os.path.realpath(self.src_root))
        if next_to_datalist or in_src:
            where = "next to the datalist it protects" if next_to_datalist else "inside SRC, which is never written"
            raise LayoutError(
                f"the salt file {path} would be created {where}. Set ${SALT_FILE_ENV} to a private path outside both "
                "(default: ~/.config/ffcl-monai/data_prep_salt)."
            )


def _read_salt_file(path: Path) -> str:
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise LayoutError(f"salt file {path} is not a regular file; point ${SALT_FILE_ENV} at a file")
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise LayoutError(f"cannot read the salt file {path} ({type(exc).__name__}); fix its permissions or set "
                          f"${SALT_ENV}") from exc
    if not text:
        raise LayoutError(f"salt file {path} is empty; delete it (a new one is generated) or write a secret into it")
    if st.st_mode & 0o077:
        log.warning(f"data_prep: the salt file {path} can be read by other users (mode {oct(st.st_mode & 0o777)}); "
                    f"run: chmod 600 {path}")
    return text


def _create_salt_file(path: Path) -> str:
    token = secrets.token_hex(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another run created it in the meantime: use that one
        return _read_salt_file(path)
    except OSError as exc:
        raise LayoutError(
            f"cannot create the salt file {path} ({type(exc).__name__}: {exc.strerror}). Set ${SALT_ENV} to a secret, "
            f"or ${SALT_FILE_ENV} to a writable private path."
        ) from exc
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def patient_hash(raw_id: str, salt: str) -> str:
    """Salted, keyed digest of a raw patient identifier (16 hex characters).

    HMAC rather than ``sha256(salt + id)`` so that the salt cannot be confused with part of the identifier.
    Identifiers are stripped first so that ``" 123"`` and ``"123"`` from two CSVs group together.
    """
    digest = hmac.new(salt.encode("utf-8"), str(raw_id).strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:16]


def path_pseudonym(rel_path: str, salt: str) -> str:
    """Salted digest (20 hex characters) naming a file under ``--pseudonymize-paths``.

    Domain-separated from :func:`patient_hash` (``"path:"`` prefix), so a file name and a patient ID that happen to be
    the same string get different pseudonyms.
    """
    msg = ("path:" + rel_path).encode("utf-8", "surrogateescape")
    return hmac.new(salt.encode("utf-8"), msg, hashlib.sha256).hexdigest()[:20]


#: Random key of this process, never stored: lets the check compare DICOM PatientIDs across files without keeping
#: or printing them, and without a digest that a dictionary could invert later.
_SESSION_KEY = secrets.token_bytes(32)


def session_token(raw_id: str) -> str:
    """In-memory-only token of a raw identifier (equal IDs give equal tokens within one process)."""
    return hmac.new(_SESSION_KEY, str(raw_id).strip().encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def redact(text: str, ds: Any) -> str:
    """Replace the values of identifying DICOM tags of ``ds`` (if they occur in ``text``) by ``<redacted>``.

    Used on exception messages from DICOM decoders before they reach a terminal or a report.
    """
    for kw in PHI_DICOM_KEYWORDS:
        try:
            v = ds.get(kw, None) if ds is not None else None
        except Exception:  # a broken element must not break the error path
            continue
        if v is None:
            continue
        values = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
        for one in values:
            s = str(one).strip()
            if len(s) >= 2 and s in text:
                text = text.replace(s, "<redacted>")
    return text


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: int | None = None


class quiet_dicom:  # noqa: N801 - used as a context manager, reads like one
    """Context manager: pydicom does not validate element values on reading while it is active.

    pydicom's validation warnings quote the offending value (``Invalid value for VR DA: '19311227x'``), which would put
    tag values into logs. Reference-counted and locked, so threads of the file check can nest it.
    """

    def __enter__(self) -> "quiet_dicom":
        global _quiet_depth, _quiet_saved
        from pydicom import config

        with _quiet_lock:
            if _quiet_depth == 0:
                _quiet_saved = config.settings.reading_validation_mode
                config.settings.reading_validation_mode = config.IGNORE
            _quiet_depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        global _quiet_depth
        from pydicom import config

        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                config.settings.reading_validation_mode = _quiet_saved
