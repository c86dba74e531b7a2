"""Protected health information (PHI) policy helpers.

Patient identifiers (file-name IDs, CSV "Patient ID" columns, DICOM PatientID) are only ever held in memory. What
reaches a datalist, a log line or a report is a salted HMAC-SHA256 digest, truncated to 16 hex characters (64 bits),
so that images of one patient can be grouped without revealing who the patient is.

The salt comes from ``--salt`` or the environment variable ``DATA_PREP_SALT``; otherwise :data:`DEFAULT_SALT` is used.
The default salt is a public constant: it makes datalists reproducible across machines, but anybody holding the raw
identifiers can recompute the digests. Use a private salt when the identifiers themselves are sensitive (hospital
MRNs, DICOM PatientID). The salt value is never written to a datalist; the header only says ``"salt": "default"`` or
``"salt": "custom"``.
"""

from __future__ import annotations

import hashlib
import hmac
import os

#: Public default salt. Documented on purpose: it gives pseudonymisation and reproducibility, not secrecy.
DEFAULT_SALT = "ffcl-monai/data_prep/v1"

#: DICOM keywords that identify a person or an encounter. They are never copied anywhere; the converter builds NIfTI
#: headers from scratch and reads only geometry and pixel tags. The list exists for tests and for the README.
PHI_DICOM_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName", "MedicalRecordLocator",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName", "InstitutionAddress",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "DeviceSerialNumber",
    "StationName",
)


def resolve_salt(salt: str | None) -> tuple[str, str]:
    """Return ``(salt, kind)`` where kind is ``"custom"`` or ``"default"``.

    Order: the explicit argument, then ``$DATA_PREP_SALT``, then :data:`DEFAULT_SALT`.
    """
    if salt:
        return salt, "custom"
    env = os.environ.get("DATA_PREP_SALT")
    if env:
        return env, "custom"
    return DEFAULT_SALT, "default"


def patient_hash(raw_id: str, salt: str) -> str:
    """Salted, keyed digest of a raw patient identifier (16 hex characters).

    HMAC rather than ``sha256(salt + id)`` so that the salt cannot be confused with part of the identifier.
    Identifiers are stripped first so that ``" 123"`` and ``"123"`` from two CSVs group together.
    """
    digest = hmac.new(salt.encode("utf-8"), str(raw_id).strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:16]
