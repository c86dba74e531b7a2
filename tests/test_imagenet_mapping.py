"""torchvision ResNet ImageNet state dict -> MONAI ResNet backbone, with a file written here (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from ffcl_monai.networks.backbones import build_backbone
from ffcl_monai.networks.checkpoints import init_backbone
from ffcl_monai.networks.classifier import Classifier
from ffcl_monai.networks.imagenet import load_imagenet_resnet, torchvision_resnet_to_backbone


def torchvision_resnet_state(layers: list[int], bottleneck: bool, seed: int = 0,
                             kaiming: bool = False) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ResNet key names and shapes (torchvision.models.resnet), random values.

    ``kaiming``: conv weights scaled by sqrt(2 / fan_in) (He et al. 2015) and small BN shifts, so that activations stay
    of order 1 through the whole network and a forward pass can be compared at 1e-5."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, out_c, in_c, k):
        w = torch.randn(out_c, in_c, k, k, generator=g)
        sd[f"{name}.weight"] = w * (2.0 / (in_c * k * k)) ** 0.5 if kaiming else w

    def bn(name, c):
        shift = 0.1 if kaiming else 1.0
        sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.bias"] = torch.randn(c, generator=g) * shift
        sd[f"{name}.running_mean"] = torch.randn(c, generator=g) * shift
        sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    expansion = 4 if bottleneck else 1
    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (planes, n) in enumerate(zip([64, 128, 256, 512], layers), start=1):
        for b in range(n):
            p = f"layer{i}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            if b == 0 and (i > 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1), bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = torch.randn(1000, 512 * expansion, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resnet18_file_grayscale_and_rgb(tmp_path):
    tv = torchvision_resnet_state([2, 2, 2, 2], bottleneck=False)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(tv, path)

    gray = build_backbone("resnet18", in_channels=1)
    report = load_imagenet_resnet(gray, path)
    sd = gray.state_dict()
    assert report["loaded"] == len(sd)
    # grey: conv1 summed over R, G, B (the trained filter's response to a grey image repeated to 3 channels)
    torch.testing.assert_close(sd["blocks.0.conv1.weight"], tv["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(sd["blocks.0.bn1.running_var"], tv["bn1.running_var"])
    torch.testing.assert_close(sd["blocks.1.1.conv2.weight"], tv["layer1.1.conv2.weight"])
    torch.testing.assert_close(sd["blocks.3.0.downsample.0.weight"], tv["layer3.0.downsample.0.weight"])
    torch.testing.assert_close(sd["blocks.4.1.bn2.bias"], tv["layer4.1.bn2.bias"])
    assert torch.count_nonzero(sd["blocks.2.0.downsample.0.bias"]) == 0  # torchvision has no shortcut bias
    # Every tensor of the file except fc lands somewhere, and the mapped net runs.
    mapped = {k for k in sd if not k.endswith("downsample.0.bias")}
    assert len(mapped) == len([k for k in tv if not k.startswith("fc.")])
    assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 512)

    rgb = build_backbone("resnet18", in_channels=3)
    load_imagenet_resnet(rgb, path)
    torch.testing.assert_close(rgb.state_dict()["blocks.0.conv1.weight"], tv["conv1.weight"])

    # Through the pipeline's `init` key, wrapped the way users may save it ({"state_dict": ..., "module." keys}).
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.items()}}, wrapped)
    net = init_backbone(Classifier("resnet18"), f"imagenet:{wrapped}")
    torch.testing.assert_close(net.backbone.blocks[2][1].conv1.weight, tv["layer2.1.conv1.weight"])


def test_resnet50_bottleneck_mapping():
    tv = torchvision_resnet_state([3, 4, 6, 3], bottleneck=True, seed=1)
    bb = build_backbone("resnet50")
    mapped = torchvision_resnet_to_backbone(tv, bb)
    bb.load_state_dict(mapped, strict=True)
    torch.testing.assert_close(bb.state_dict()["blocks.1.0.downsample.1.weight"], tv["layer1.0.downsample.1.weight"])
    torch.testing.assert_close(bb.state_dict()["blocks.3.5.conv3.weight"], tv["layer3.5.conv3.weight"])


def test_refusals_name_the_config_key():
    tv = torchvision_resnet_state([2, 2, 2, 2], bottleneck=False)
    with pytest.raises(ValueError, match="spatial_dims"):
        torchvision_resnet_to_backbone(tv, build_backbone("resnet18", spatial_dims=3))
    with pytest.raises(ValueError, match="backbone"):
        torchvision_resnet_to_backbone(tv, build_backbone("resnet34"))  # depth mismatch
    with pytest.raises(ValueError, match="conv1_kernel"):
        torchvision_resnet_to_backbone(tv, build_backbone("resnet18", conv1_kernel=3, conv1_stride=1))


# ---------------------------------------------------------------------------------------------------------------------
# The mapping checked by function: a ResNet-18 written here from the published architecture (He, Zhang, Ren, Sun 2016,
# "Deep residual learning for image recognition", Table 1, 18-layer column, in torchvision's module layout and names),
# plain torch, no torchvision and nothing from the project.


class RefBasicBlock(torch.nn.Module):
    """Two 3x3 convs with BN, ReLU after the first and after the residual sum; 1x1/stride-2 conv + BN shortcut
    (He et al. 2016, option B) where the shape changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class RefResNet18(torch.nn.Module):
    """conv 7x7/2 (64) -> BN -> ReLU -> maxpool 3x3/2 -> BasicBlocks [2, 2, 2, 2] of 64, 128, 256, 512 channels (the
    first block of stages 2-4 with stride 2) -> adaptive average pool -> fc (1000)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, planes in enumerate([64, 128, 256, 512], start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(RefBasicBlock(inplanes, planes, stride),
                                                     RefBasicBlock(planes, planes, 1)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 512-vector that feeds fc."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def test_mapped_resnet18_computes_the_reference_features():
    """Random torchvision-layout weights, loaded strictly into the reference and mapped into the MONAI backbone: the
    same pooled features (eval mode, BN running statistics) within 1e-5; with in_channels 3 for RGB-like input and,
    with conv1 summed, in_channels 1 for a grey image (= the reference on the grey image repeated to 3 channels)."""
    torch.manual_seed(0)
    tv = torchvision_resnet_state([2, 2, 2, 2], bottleneck=False, seed=3, kaiming=True)
    ref = RefResNet18().eval()
    ref.load_state_dict(tv, strict=True)  # the file's names and shapes are exactly the published layout's

    x = torch.rand(2, 3, 64, 64)
    rgb = build_backbone("resnet18", in_channels=3).eval()
    rgb.load_state_dict(torchvision_resnet_to_backbone(tv, rgb), strict=True)
    with torch.no_grad():
        want = ref.features(x)
        got = rgb(x)
    assert want.shape == got.shape == (2, 512)
    assert 0.01 < float(want.abs().mean()) < 100  # activations of order 1: the 1e-5 tolerance is meaningful
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # Grey: in float64, because summing conv1 over R, G, B before the convolution rounds differently in float32
    # (measured: 4e-5 absolute on features of magnitude ~7, i.e. 6e-6 relative); in float64 the identity is exact to
    # rounding, and an averaged conv1 (the former mapping) would be off by a factor ~3 in the stem.
    grey = build_backbone("resnet18", in_channels=1).eval()
    grey.load_state_dict(torchvision_resnet_to_backbone(tv, grey), strict=True)
    g = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(grey.double()(g), ref.double().features(g.repeat(1, 3, 1, 1)), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet normalisation reaches the network's input in every step of an ImageNet-initialised run


def _known_image(root):
    """An 8-bit grey PNG with known pixel values (columns 0, 64, 128, 255), 4 datalist entries of it."""
    import json

    import numpy as np
    from PIL import Image

    values = np.array([0, 64, 128, 255], dtype=np.uint8)
    pixels = np.tile(np.repeat(values, 4), (16, 1))  # 16 x 16
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(root / "img.png")
    entries = [{"image": "img.png", "label": i % 2} for i in range(4)]
    dl = root / "datalist.json"
    dl.write_text(json.dumps({"task": "binary", "labels": {"0": "A", "1": "B"}, "num_classes": 2, "spatial_dims": 2,
                              "training": entries, "validation": entries, "test": entries}))
    x = pixels.astype(np.float64) / 255.0  # ScaleIntensityd: min-max to [0, 1] (min 0, max 255 here)
    return dl, float(x.mean()), float(x.std())


def _assert_imagenet_normalised(img, mean_x, std_x, where):
    from ffcl_monai.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    t = torch.as_tensor(img, dtype=torch.float64)
    assert t.shape == (3, 16, 16), where
    for c in range(3):  # (x - mu_c) / sigma_c: mean (mean_x - mu_c) / sigma_c, population std std_x / sigma_c
        assert abs(float(t[c].mean()) - (mean_x - IMAGENET_MEAN[c]) / IMAGENET_STD[c]) < 1e-5, (where, c)
        assert abs(float(t[c].std(unbiased=False)) - std_x / IMAGENET_STD[c]) < 1e-5, (where, c)


def test_imagenet_normalisation_reaches_every_step_and_serving(tmp_path):
    import numpy as np
    from monai.data import MetaTensor
    from PIL import Image

    from ffcl_monai.serving.mlflow_pyfunc import array_to_channel_first, build_transforms, model_spec_from_config
    from ffcl_monai.workflows import runner
    from ffcl_monai.workflows.ffcl import plan_steps

    dl, mean_x, std_x = _known_image(tmp_path / "data")
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet_state([2, 2, 2, 2], bottleneck=False), weights)
    base = {"datalist": str(dl), "image_size": [16, 16], "cache": "ram", "progress": False,
            "output_dir": str(tmp_path / "run")}
    entry = runner.config_files(["train.yaml", "ffcl.yaml"])

    # an ImageNet init, no other key: every step of the program gets 3 channels and ImageNet mean/std
    steps = {s.name: s for s in plan_steps(entry, {**base, "init": f"imagenet:{weights}", "stages": "local"})}
    assert set(steps) == {"stage1_local", "finetune", "evaluate_validation", "evaluate_test"}
    for name, step in steps.items():
        parser = runner.load(step.files, {**step.overrides, "output_dir": str(tmp_path / name), "stage_augment": False})
        get = parser.get_parsed_content
        assert (get("in_channels"), get("input_norm")) == (3, "imagenet"), name
        dataset = get("train#dataset") if step.kind == "stage" else get("validate#dataset")
        _assert_imagenet_normalised(dataset[0]["image"], mean_x, std_x, name)
        if name == "finetune":  # the MLflow model of the fine-tuning: preprocessing.json carries the normalisation
            spec = model_spec_from_config(parser)
            pixels = array_to_channel_first(np.asarray(Image.open(dl.parent / "img.png")), 2)  # as served
            served = build_transforms(spec)({"image": MetaTensor(torch.from_numpy(pixels))})["image"]
            _assert_imagenet_normalised(served, mean_x, std_x, "mlflow model")

    # a random init: unchanged (one channel in [0, 1], no normalisation entry)
    steps = plan_steps(entry, {**base, "stages": "local"})
    for step in steps:
        parser = runner.load(step.files, {**step.overrides, "output_dir": str(tmp_path / "r" / step.name)})
        get = parser.get_parsed_content
        assert (get("in_channels"), get("input_norm")) == (1, "none"), step.name
        assert "NormalizeInputd" not in [type(t).__name__ for t in get("deterministic_transforms")], step.name

    # inference.yaml on its own, with the training's two keys
    get = runner.load(runner.config_files(["inference.yaml"]), {
        "images": [str(dl.parent / "img.png")], "in_channels": 3, "input_norm": "imagenet", "image_size": [16, 16],
        "output_dir": str(tmp_path / "infer")}).get_parsed_content
    _assert_imagenet_normalised(get("dataset")[0]["image"], mean_x, std_x, "inference.yaml")


def test_input_norm_values_and_channels():
    from ffcl_monai.data.transforms import IMAGENET_MEAN, IMAGENET_STD, NormalizeInputd

    img = torch.full((1, 4, 4), 0.5)
    out = NormalizeInputd("image", "imagenet")({"image": img})["image"]
    # one channel: the mean of the three means and of the three standard deviations
    want = (0.5 - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3)
    assert torch.allclose(out, torch.full((1, 4, 4), want))
    assert torch.equal(img, torch.full((1, 4, 4), 0.5))  # the input is not modified
    assert NormalizeInputd("image", "none")({"image": img})["image"] is img
    with pytest.raises(ValueError, match="input_norm"):
        NormalizeInputd("image", "imagenett")
    with pytest.raises(ValueError, match="in_channels"):
        NormalizeInputd("image", "imagenet")({"image": torch.zeros(2, 4, 4)})
