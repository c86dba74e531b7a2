"""The trained classifier as an MLflow pyfunc model: image pixels in, class probabilities out.

The model holds two artifacts, the best checkpoint (``models/model.pt``, loaded with ``weights_only=True``) and
``preprocessing.json``, and is logged "from code" (:mod:`ffcl_monai.serving.pyfunc_entry`), so nothing in it is
unpickled. ``preprocessing.json`` is plain data written from the training's own config: the classes, the network
(``network_def``: the project's :class:`~ffcl_monai.networks.classifier.Classifier` and its arguments) and the
inference workflow's deterministic preprocessing (``deterministic_transforms`` of ``inference.yaml``, every ``@`` and
``$`` already evaluated). The file-loading transform that list starts with is replaced by in-memory decoding that
gives the same array; every transform after it is rebuilt from the JSON and applied as is.

Input (a pandas DataFrame, a dict of columns or a list of records), one image per row, in exactly one of:

- ``image``: the pixels as a nested list or array. 2D: ``H x W`` or ``H x W x C`` (C <= 4, channels last), in
  numpy / PIL order (``numpy.asarray(PIL.Image.open(f))``); 3D: ``X x Y x Z`` or ``X x Y x Z x C`` in the NIfTI
  voxel order ``numpy.asarray(nibabel.load(f).dataobj)`` gives (no reorientation). Any numeric dtype; intensities as
  stored (the model rescales each image to [0, 1] itself).
- ``image_bytes``: a PNG or JPEG file's bytes, base64-encoded (2D models), decoded with PIL exactly as MONAI's
  ``LoadImage`` (``PILReader``) decodes the file.

Strings in ``image``, and anything in ``image_bytes`` that is not base64 of a PNG/JPEG, are refused: a served model
never reads files or URLs of the machine it runs on. Output: a DataFrame with one probability column per class name
(softmax, or sigmoid for multi-label tasks), as ``inference.yaml`` writes them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ffcl_monai.errors import UserInputError

try:  # the serving process needs mlflow anyway; importing this module without it still works (spec building)
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[assignment,misc]

SPEC_FORMAT = "ffcl_monai.image_classifier/1"
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
INPUT_COLUMNS = ("image", "image_bytes")
#: Modules whose transforms a model's ``preprocessing.json`` may name (I/O transforms are refused in any case).
TRANSFORM_MODULES = ("monai.transforms", "ffcl_monai.data.transforms", "ffcl_monai.data.volume_presets")
#: Modules whose networks a model's ``preprocessing.json`` may name.
NETWORK_MODULES = ("ffcl_monai.networks",)
#: Longest side of the input example (one training image, downscaled) stored with the model.
EXAMPLE_MAX_SIDE = {2: 32, 3: 16}
BATCH_SIZE = 32
INPUT_DOC = {
    "image": "pixels as a nested list/array: 2D H x W or H x W x C (numpy/PIL order), 3D X x Y x Z [x C] (NIfTI voxel "
             "order, as nibabel gives it)",
    "image_bytes": "base64 of a PNG or JPEG file (2D)",
}
_PATH_HINT = ("file paths and URLs are never accepted (a served model does not read files of the machine it runs on): "
              "send the pixels in `image` (nested list/array) or the PNG/JPEG file's bytes, base64-encoded, in "
              "`image_bytes`")


class ImageInputError(UserInputError):
    """A request the model cannot take: the message names the row, the column and what to send instead."""


# ---------------------------------------------------------------------------------------------------------------------
# preprocessing.json: written from the training config, read back as plain data


def _qualified(target: str) -> str:
    """``ScaleIntensityd`` -> ``monai.transforms.intensity.dictionary.ScaleIntensityd`` (dotted names unchanged)."""
    if "." in target:
        return target
    from monai.bundle.config_item import ComponentLocator

    modules = ComponentLocator().get_component_module_name(target)
    modules = [modules] if isinstance(modules, str) else list(modules or [])
    modules = sorted(modules, key=lambda m: not m.startswith("monai.transforms"))
    if not modules:
        raise ValueError(f"cannot locate `_target_: {target}`")
    return f"{modules[0]}.{target}"


def _plain(value: Any, where: str) -> Any:
    """A parsed config value as JSON data; dtypes become ``{"__torch_dtype__": name}`` or
    ``{"__numpy_dtype__": name}``."""
    if isinstance(value, Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if not isinstance(value, str) else str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return {"__torch_dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return {"__numpy_dtype__": np.dtype(value).name}
    if isinstance(value, (list, tuple, torch.Size)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}#{k}") for k, v in value.items()}
    raise TypeError(f"config value `{where}` is a {type(value).__name__}, not plain data; the MLflow model stores "
                    "its preprocessing as JSON (numbers, strings, lists, dtypes).")


def _from_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_plain(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__torch_dtype__"}:
            dtype = getattr(torch, str(value["__torch_dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {value['__torch_dtype__']!r}")
            return dtype
        if set(value) == {"__numpy_dtype__"}:
            return np.dtype(str(value["__numpy_dtype__"]))
        return {k: _from_plain(v) for k, v in value.items()}
    return value


def _component(item: Mapping[str, Any], base: str, get: Any) -> dict[str, Any] | None:
    """One config component (dict with ``_target_``) with every argument evaluated; None when ``_disabled_``."""
    if not isinstance(item, Mapping) or "_target_" not in item:
        raise TypeError(f"`{base}` is not a `_target_` component; the MLflow model can only rebuild explicit "
                        "component lists (as in inference.yaml).")
    if "_disabled_" in item and get(f"{base}#_disabled_"):
        return None
    out = {"_target_": _qualified(str(item["_target_"]))}
    for key in item:
        if not str(key).startswith("_"):
            out[str(key)] = _plain(get(f"{base}#{key}"), f"{base}#{key}")
    return out


def _import(qualname: str, modules: Sequence[str]) -> Any:
    module, _, name = qualname.rpartition(".")
    if not any(module == m or module.startswith(m + ".") for m in modules):
        raise ValueError(f"`{qualname}` is not in {list(modules)}; the MLflow model refuses to build it.")
    return getattr(importlib.import_module(module), name)


def _is_loader(cls: Any) -> bool:
    from monai.transforms import LoadImage, LoadImaged

    return isinstance(cls, type) and issubclass(cls, (LoadImage, LoadImaged))


def model_spec_from_config(
    parser: Any, transforms_id: str = "deterministic_transforms", network_id: str = "network_def"
) -> dict[str, Any]:
    """What the served model needs, from a bundle ``ConfigParser``: classes, network, deterministic preprocessing.

    Raises:
        TypeError / ValueError: a transform or network argument that is not plain data, or a list entry that is not
            an explicit ``_target_`` component.
    """
    get = parser.get_parsed_content
    task = str(get("task"))
    transforms = [c for i, item in enumerate(parser.get(transforms_id))
                  if (c := _component(item, f"{transforms_id}#{i}", get)) is not None]
    loader = None
    if transforms and _is_loader(_import(transforms[0]["_target_"], TRANSFORM_MODULES)):
        loader = transforms.pop(0)
    network = _component(parser.get(network_id), network_id, get)
    scaling = next((
        {k: v for k, v in t.items() if k != "keys"} for t in transforms if "ScaleIntensity" in t["_target_"]), None)
    return {
        "format": SPEC_FORMAT,
        "task": task,
        "class_names": [str(c) for c in get("class_names")],
        "num_classes": int(get("num_classes")),
        "spatial_dims": int(get("spatial_dims")),
        "in_channels": int(get("in_channels")),
        "image_size": [int(s) for s in get("image_size")],
        "intensity_scaling": scaling,  # for people reading the file; `transforms` is what runs
        "activation": "sigmoid" if task == "multilabel" else "softmax",
        "network": network,
        "loader": loader,  # not run when serving: in-memory decoding gives its output (float32, channel first)
        "transforms": transforms,  # everything after the loader, applied to the decoded image as is
        "input": INPUT_DOC,
    }


def build_transforms(spec: Mapping[str, Any]) -> Any:
    """The spec's transforms as a MONAI ``Compose``; only transform classes of :data:`TRANSFORM_MODULES`, never I/O."""
    from monai.transforms import Compose, Transform

    built = []
    for item in spec["transforms"]:
        cls = _import(item["_target_"], TRANSFORM_MODULES)
        if not (isinstance(cls, type) and issubclass(cls, Transform)) or _is_loader(cls) or cls.__module__.startswith(
                "monai.transforms.io"):  # LoadImage(d), SaveImage(d): a served model reads and writes no files
            raise ValueError(f"`{item['_target_']}` is not an in-memory transform; the MLflow model refuses it.")
        built.append(cls(**{k: _from_plain(v) for k, v in item.items() if k != "_target_"}))
    return Compose(built)


def build_network(spec: Mapping[str, Any]) -> torch.nn.Module:
    """The classifier from the spec's ``network`` entry (a class of :data:`NETWORK_MODULES`)."""
    item = dict(spec["network"])
    cls = _import(item.pop("_target_"), NETWORK_MODULES)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"`{spec['network']['_target_']}` is not a network class.")
    return cls(**{k: _from_plain(v) for k, v in item.items()})


# ---------------------------------------------------------------------------------------------------------------------
# request decoding


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _looks_like_path(text: str) -> bool:
    t = text.strip()
    return ("/" in t or "\\" in t or ":" in t or t.startswith(("~", ".")) or
            t.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".dcm", ".nii", ".nii.gz", ".npy", ".npz")))


def decode_image_bytes(value: Any, where: str = "image_bytes") -> np.ndarray:
    """Base64 PNG/JPEG -> float32 array ``(C, W, H)``: PIL's pixels with axes 0 and 1 swapped, as MONAI's
    ``PILReader`` returns a file's pixels (``reverse_indexing``), then channel first."""
    from PIL import Image

    from ffcl_monai.data.transforms import MAX_IMAGE_DIM

    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            if _looks_like_path(value):
                raise ImageInputError(f"{where} looks like a file path ({value[:80]!r}); {_PATH_HINT}.") from None
            raise ImageInputError(f"{where} is not valid base64; send the PNG/JPEG file's bytes, base64-encoded."
                                  ) from None
    else:
        raise ImageInputError(f"{where} is a {type(value).__name__}; send a base64 string of PNG/JPEG bytes.")
    try:
        img = Image.open(io.BytesIO(raw))  # reads the header only
        fmt = img.format
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"{where}: {e}") from None
    except Exception:
        fmt = None
    if fmt not in ("PNG", "JPEG"):
        raise ImageInputError(f"{where} is not a PNG or JPEG image ({len(raw)} bytes); {_PATH_HINT}.")
    if max(img.size) > MAX_IMAGE_DIM:  # from the header, before decoding the pixels
        raise ImageInputError(
            f"{where}: {img.size[0]} x {img.size[1]} pixels, above the limit of {MAX_IMAGE_DIM} per axis.")
    try:
        pixels = np.asarray(img)
    except Exception as e:
        raise ImageInputError(f"{where}: the {fmt} data cannot be decoded ({type(e).__name__}: {e}).") from None
    data = np.moveaxis(pixels, 0, 1).astype(np.float32)  # MONAI PILReader: reverse_indexing=True
    return data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)


def array_to_channel_first(value: Any, spatial_dims: int, where: str = "image") -> np.ndarray:
    """Pixels as sent (2D ``H x W [x C]`` numpy order, 3D ``X x Y x Z [x C]``) -> float32 ``(C, *spatial)`` in MONAI's
    loader order (2D: axes 0 and 1 swapped, as ``PILReader`` does)."""
    from ffcl_monai.data.transforms import MAX_IMAGE_DIM, MAX_IMAGE_VOXELS

    if isinstance(value, (str, bytes)):
        text = value if isinstance(value, str) else value[:200].decode("utf-8", "replace")
        raise ImageInputError(f"{where} is a string ({text[:80]!r}), not pixels; {_PATH_HINT}.")
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged nested lists
        raise ImageInputError(f"{where}: not a rectangular array of numbers ({type(e).__name__}).") from None
    if arr.dtype.kind in "USO":
        if arr.dtype.kind == "O":
            try:
                arr = arr.astype(np.float64)
            except (TypeError, ValueError):
                raise ImageInputError(f"{where}: not a rectangular array of numbers; {_PATH_HINT}.") from None
        else:
            raise ImageInputError(f"{where} holds strings, not pixels; {_PATH_HINT}.")
    if arr.dtype.kind not in "biuf":
        raise ImageInputError(f"{where}: pixels must be numbers, got dtype {arr.dtype}.")
    shape = arr.shape
    if arr.ndim == spatial_dims:
        arr = arr[None]
    elif arr.ndim == spatial_dims + 1 and 1 <= shape[-1] <= 4:
        arr = np.moveaxis(arr, -1, 0)
    else:
        layout = "H x W or H x W x C" if spatial_dims == 2 else "X x Y x Z or X x Y x Z x C"
        raise ImageInputError(f"{where} has shape {shape}; this {spatial_dims}D model takes {layout} (C <= 4).")
    if min(arr.shape[1:]) < 1 or max(arr.shape[1:]) > MAX_IMAGE_DIM or arr.size > MAX_IMAGE_VOXELS:
        raise ImageInputError(f"{where} has shape {shape}; each axis must be 1..{MAX_IMAGE_DIM}.")
    if spatial_dims == 2:
        arr = np.swapaxes(arr, 1, 2)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, Mapping):
        return pd.DataFrame({k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in model_input.items()})
    if isinstance(model_input, list) and all(isinstance(r, Mapping) for r in model_input):
        return pd.DataFrame(model_input)
    raise ImageInputError(f"the input is a {type(model_input).__name__}; send a DataFrame / JSON object with an "
                          "`image` or `image_bytes` column.")


def iter_images(model_input: Any, spatial_dims: int) -> Iterator[np.ndarray]:
    """Each row's image as float32 ``(C, *spatial)`` (MONAI loader order), or :class:`ImageInputError`."""
    frame = _frame(model_input)
    columns = [c for c in INPUT_COLUMNS if c in frame.columns]
    if not columns:
        raise ImageInputError(f"no `image` or `image_bytes` column (got {[str(c) for c in frame.columns]}); "
                              f"{_PATH_HINT}.")
    for i in range(len(frame)):
        given = [c for c in columns if not _missing(frame[c].iloc[i])]
        if len(given) != 1:
            raise ImageInputError(f"row {i}: give exactly one of `image` or `image_bytes` (got {given or 'none'}).")
        value = frame[given[0]].iloc[i]
        where = f"row {i} `{given[0]}`"
        if given[0] == "image_bytes":
            if spatial_dims != 2:
                raise ImageInputError(f"{where}: PNG/JPEG bytes are 2D; this model takes 3D volumes in `image`.")
            arr = decode_image_bytes(value, where)
        else:
            arr = array_to_channel_first(value, spatial_dims, where)
        if not np.isfinite(arr).all():
            raise ImageInputError(f"{where} holds {int(np.isnan(arr).sum())} NaN and {int(np.isinf(arr).sum())} "
                                  "infinite value(s); send finite pixels.")
        yield arr


# ---------------------------------------------------------------------------------------------------------------------
# the pyfunc


class ImageClassifierModel(PythonModel):
    """MLflow pyfunc: ``image`` / ``image_bytes`` rows -> one probability column per class (see the module doc)."""

    def load_context(self, context: Any) -> None:
        from ffcl_monai.networks.checkpoints import load_model

        self.spec = json.loads(Path(context.artifacts["preprocessing"]).read_text())
        if self.spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"preprocessing.json has format {self.spec.get('format')!r}, expected {SPEC_FORMAT!r}.")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.transforms = build_transforms(self.spec)
        network = build_network(self.spec)
        load_model(network, context.artifacts["checkpoint"])  # torch.load(..., weights_only=True)
        self.network = network.to(self.device).eval()

    def _preprocess(self, arr: np.ndarray) -> torch.Tensor:
        from monai.data import MetaTensor

        from ffcl_monai.data.transforms import ImageReadError

        try:
            out = self.transforms({"image": MetaTensor(torch.from_numpy(arr))})["image"]
        except ImageReadError as e:  # e.g. channel count (EnsureChannelsd)
            raise ImageInputError(str(e)) from None
        return torch.as_tensor(out).float()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        spec = self.spec
        try:
            images = [self._preprocess(arr) for arr in iter_images(model_input, int(spec["spatial_dims"]))]
        except ImageInputError as e:  # 400 with this message when served
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        probs = []
        with torch.no_grad():
            for i in range(0, len(images), BATCH_SIZE):
                logits = self.network(torch.stack(images[i : i + BATCH_SIZE]).to(self.device)).float()
                p = torch.sigmoid(logits) if spec["activation"] == "sigmoid" else torch.softmax(logits, dim=1)
                probs.append(p.cpu())
        values = torch.cat(probs).double().numpy() if probs else np.zeros((0, len(spec["class_names"])))
        return pd.DataFrame(values, columns=list(spec["class_names"]))


# ---------------------------------------------------------------------------------------------------------------------
# saving / logging


def signature(spec: Mapping[str, Any]) -> Any:
    """Input: optional ``image`` (any nested list/array) and ``image_bytes`` (base64 string); output: one double per
    class name."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(AnyType(), "image", required=False),
                     ColSpec(DataType.string, "image_bytes", required=False)])
    outputs = Schema([ColSpec(DataType.double, str(c)) for c in spec["class_names"]])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(image_file: str | os.PathLike, spec: Mapping[str, Any]) -> pd.DataFrame:
    """One image file (a training image) as a request row: its pixels, read with the training's own loader and
    downscaled to at most :data:`EXAMPLE_MAX_SIDE` per axis, in the ``image`` column's axis order. No file name."""
    from monai.transforms import Resize

    dims = int(spec["spatial_dims"])
    loader = dict(spec["loader"] or {"_target_": "monai.transforms.LoadImaged", "keys": "image", "image_only": True})
    cls = _import(loader.pop("_target_"), TRANSFORM_MODULES)
    kwargs = {k: _from_plain(v) for k, v in loader.items()}
    kwargs.update(keys="image", image_only=True, ensure_channel_first=True)
    img = torch.as_tensor(cls(**kwargs)({"image": str(image_file)})["image"]).float()  # (C, *spatial), loader order
    side = EXAMPLE_MAX_SIDE.get(dims, 16)
    if max(img.shape[1:]) > side:
        img = torch.as_tensor(Resize(spatial_size=side, size_mode="longest", mode="area")(img)).float()
    arr = img.numpy()
    if dims == 2:
        arr = np.swapaxes(arr, 1, 2)  # back to numpy / PIL order
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    return pd.DataFrame({"image": [np.round(arr.astype(np.float64), 2).tolist()]})


def pip_requirements() -> list[str]:
    """The serving environment: the packages this model imports, pinned to the training's versions."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("torch", "monai", "numpy", "pandas", "pillow", "mlflow"):
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")  # no local label (2.13.0+cpu)
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


@contextlib.contextmanager
def _model_files(checkpoint: str | os.PathLike, spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Temporary ``preprocessing.json`` and a copy of the ``ffcl_monai`` package (the model's ``code/``), and the
    keyword arguments of ``mlflow.pyfunc.save_model`` / ``log_model`` that use them."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    with tempfile.TemporaryDirectory(prefix="ffcl_mlflow_model_") as tmp:
        spec_path = Path(tmp) / "preprocessing.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        package = Path(__file__).resolve().parents[1]
        code = Path(tmp) / "code" / package.name
        shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield {
            "python_model": str(ENTRY_FILE),
            "artifacts": {"checkpoint": str(checkpoint), "preprocessing": str(spec_path)},
            "code_paths": [str(code)],
            "signature": signature(spec),
            "pip_requirements": pip_requirements(),
        }


def save_classifier_model(
    path: str | os.PathLike, checkpoint: str | os.PathLike, spec: Mapping[str, Any], example: pd.DataFrame | None = None
) -> str:
    """Write the pyfunc model to a local folder (no tracking server). Returns the folder."""
    import mlflow

    with _model_files(checkpoint, spec) as kwargs:
        mlflow.pyfunc.save_model(str(path), input_example=example, **kwargs)
    return str(path)


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent calls inside ``Model.log`` (model finalisation, registration) go to ``uri``."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - older/newer MLflow
        import mlflow

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)
        return
    with _use_tracking_uri(uri):
        yield


def log_classifier_model(
    tracking_uri: str,
    run_id: str,
    checkpoint: str | os.PathLike,
    spec: Mapping[str, Any],
    example: pd.DataFrame | None = None,
    registered_model_name: str | None = None,
    name: str = "model",
    await_registration_for: int = 60,
) -> Any:
    """Log the pyfunc model to run ``run_id`` (an MLflow 3 LoggedModel in the run's experiment, linked to the run),
    and register it as a new version of ``registered_model_name`` when given. Returns MLflow's ``ModelInfo``.

    The run is left as it is (open or closed): the training's MLflow handler owns it.
    """
    import mlflow
    from mlflow.models import Model

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    with _model_files(checkpoint, spec) as kwargs, _tracking_uri(tracking_uri):
        # created here so that it lands in the run's experiment (Model.log would use the fluent active experiment)
        logged = client.create_logged_model(
            experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, model_type="image-classifier",
            tags={"ffcl_monai.task": str(spec.get("task")), "ffcl_monai.classes": ",".join(spec["class_names"])},
        )
        return Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
            registered_model_name=registered_model_name or None, await_registration_for=await_registration_for,
            input_example=example, **kwargs,
        )
