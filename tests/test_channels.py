"""Mixed grey/RGB sources (the real Kermany OCT release has 2 RGB files among 683 grey ones): data_prep accepts them
and says the loader converts them; EnsureChannelsd makes every image `in_channels` channels (grey -> 3 repeats,
RGB(A) -> 1 averages, RGBA -> 3 drops alpha), and a 2-channel image is still refused naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from data_prep.__main__ import main
from data_prep._testing import make_image
from ffcl_monai.data.transforms import EnsureChannelsd, ImageReadError, LoadImageNamedd


def _img(c: int, seed: int = 0) -> MetaTensor:
    g = torch.Generator().manual_seed(seed)
    return MetaTensor(torch.rand(c, 5, 6, generator=g), meta={"filename_or_obj": f"/data/img{c}.png"})


def test_grey_is_repeated_for_three_channels():
    grey = _img(1)
    out = EnsureChannelsd("image", channels=3)({"image": grey})["image"]
    assert out.shape == (3, 5, 6)
    for c in range(3):
        assert torch.equal(out[c], grey[0])


def test_rgba_drops_alpha_for_three_and_averages_rgb_for_one():
    rgba = _img(4)
    assert torch.equal(EnsureChannelsd("image", channels=3)({"image": rgba})["image"], rgba[:3])
    one = EnsureChannelsd("image", channels=1)({"image": rgba})["image"]
    assert torch.allclose(one[0], rgba[:3].mean(0))


def test_two_channels_are_refused_naming_the_file():
    with pytest.raises(ImageReadError, match=r"img2\.png has 2 channels.*in_channels"):
        EnsureChannelsd("image", channels=1)({"image": _img(2)})


def _oct_tree(root, rgb: set[int]):
    k = 0
    for cls in ("CNV", "DME", "DRUSEN", "NORMAL"):
        for p in range(3):
            k += 1
            make_image(root / "train" / cls / f"{cls}-{100 + k}-1.jpeg", k, size=(16, 12),
                       mode="RGB" if k in rgb else "L")
    return root


def test_oct2017_with_rgb_files_is_accepted_and_loads_as_grey(tmp_path, capsys):
    src = _oct_tree(tmp_path / "OCT", rgb={1, 7})
    out = tmp_path / "oct.json"
    assert main(["oct2017", str(src), "--out", str(out), "--val-count", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "mixed channel counts, converted by the loader" in text
    d = json.loads(out.read_text())
    # every file, grey or RGB, loads as one 16x12 grey channel
    load = LoadImageNamedd("image", image_only=True, ensure_channel_first=True)
    chans = EnsureChannelsd("image", channels=1)
    shapes = set()
    for e in d["training"] + d["validation"]:
        img = chans(load({"image": str(out.parent / e["image"])}))["image"]
        shapes.add(tuple(img.shape))
    assert shapes == {(1, 16, 12)}, shapes
    rgb_file = next(e for e in d["training"] + d["validation"] if e["image"].endswith("CNV-101-1.jpeg"))
    raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out.parent / rgb_file["image"]))
    assert raw.ndim == 3 and raw.shape[2] == 3  # the source really is RGB


def test_oct_overlay_trains_on_mixed_grey_and_rgb_files(tmp_path, capsys):
    """train.yaml + oct.yaml on an oct2017 datalist with RGB files among grey ones: one epoch runs, the model is
    selected on the patient-grouped validation split, and the overlay's settings are the ones used."""
    from conftest import CONFIGS, cfg, run_bundle

    src = _oct_tree(tmp_path / "OCT", rgb={1, 7})
    dl = tmp_path / "oct.json"
    assert main(["oct2017", str(src), "--out", str(dl), "--val-count", "4", "--no-progress"]) == 0
    out = tmp_path / "run"
    run_bundle(cfg("train.yaml", "oct.yaml"), datalist=str(dl), output_dir=str(out), max_epochs=1, batch_size=4,
               backbone="resnet10", progress=False, log_model=False)
    resolved = json.loads((out / "config_resolved.json").read_text())
    assert resolved["image_size"] == [64, 128] and resolved["loss_name"] == "ce"
    # keys computed from the datalist header are recorded with the values the run used, not only as expressions
    values = resolved["resolved_values"]
    assert values["task"] == "multiclass" and values["num_classes"] == 4
    assert values["class_names"] == ["CNV", "DME", "DRUSEN", "NORMAL"]
    # task and classes came from the datalist header: a 4-way head, no --num_classes on the command line
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    state = state.get("model", state)
    assert state["head.weight"].shape[0] == 4
    assert (CONFIGS / "oct.yaml").is_file()


def test_checkpoint_refuses_other_inputs_and_warns_about_size(tmp_path, caplog):
    """models/model.pt records in_channels / input_norm / image_size; loading it for other inputs is refused (another
    channel count or normalisation runs silently wrong), another size is a warning, and old checkpoints load."""
    from ffcl_monai.networks.checkpoints import atomic_save, load_model

    net = torch.nn.Linear(2, 2)
    trained = {"in_channels": 3, "input_norm": "imagenet", "image_size": [224, 224]}
    path = atomic_save({"model": net.state_dict(), "input": trained}, tmp_path / "model.pt")
    load_model(torch.nn.Linear(2, 2), path, expect={"in_channels": "3", "input_norm": "ImageNet", "image_size": (224, 224)})
    with pytest.raises(ValueError, match=r"input_norm='imagenet'.*--input_norm 'imagenet'"):
        load_model(torch.nn.Linear(2, 2), path, expect={**trained, "input_norm": "none"})
    with pytest.raises(ValueError, match=r"in_channels=3"):
        load_model(torch.nn.Linear(2, 2), path, expect={**trained, "in_channels": 1})
    with caplog.at_level("WARNING"):
        load_model(torch.nn.Linear(2, 2), path, expect={**trained, "image_size": [64, 64]})
    assert "image_size=[224, 224]" in caplog.text
    old = atomic_save({"model": net.state_dict()}, tmp_path / "old.pt")  # written before inputs were recorded
    load_model(torch.nn.Linear(2, 2), old, expect={**trained, "input_norm": "none"})
