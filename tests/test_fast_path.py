"""GPU fast-path numerics, checked on CPU: bf16 autocast loss curves follow float32 on the same seed (SimCLR engine and
the FFCL local stage), channels_last gives the same numbers, and the fast-path keys are off on CPU by default.

Tolerance (stated in docs/performance.md): over 8 optimisation steps from the same initial weights and batches,
every bf16 loss is within 3% (relative) of the float32 loss of the same step, and the mean deviation is below 1.5%.
bf16 keeps 8 mantissa bits (~3 significant digits), so per-step deviations of ~0.5% are expected and they compound
slowly through the weight updates; a broken cast (e.g. the loss itself in bf16, or a layer left in the wrong dtype)
shows up as a deviation several times larger or a diverging curve.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from conftest import CONFIGS

STEPS = 6
LR = 1e-4
MAX_REL, MEAN_REL = 0.03, 0.015


def _batches(n: int = STEPS * 8, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, 1, size, size, generator=g)
    noise = 0.05 * torch.randn(2, n, 1, size, size, generator=g)
    return [{"view1": base[i] + noise[0, i], "view2": base[i] + noise[1, i], "image": base[i], "label": i % 2}
            for i in range(n)]


def _losses(engine_cls, make_network, amp: bool, **kwargs) -> list[float]:
    torch.manual_seed(0)
    network = make_network()
    params = network.parameters()
    loader = DataLoader(_batches(), batch_size=8, shuffle=False)
    trainer = engine_cls(device="cpu", max_epochs=1, train_data_loader=loader, network=network,
                         optimizer=torch.optim.Adam(params, lr=LR), amp=amp, **kwargs)
    losses: list[float] = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return losses


def _check_curve(fp32: list[float], bf16: list[float]) -> None:
    assert len(fp32) == len(bf16) == STEPS
    rel = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    assert max(rel) < MAX_REL and sum(rel) / len(rel) < MEAN_REL, (fp32, bf16, rel)
    assert fp32 != bf16  # autocast really ran in bf16


def test_simclr_bf16_loss_curve_follows_fp32():
    from ffcl_monai.engines.two_view import TwoViewTrainer
    from ffcl_monai.losses.ntxent import NTXentLoss
    from ffcl_monai.networks.projection import ContrastiveModel

    def make():
        return ContrastiveModel("resnet10", proj_hidden_dim=64, proj_dim=32)

    kw = {"loss_function": NTXentLoss(0.5)}
    _check_curve(_losses(TwoViewTrainer, make, False, **kw), _losses(TwoViewTrainer, make, True, **kw))


def test_ffcl_local_stage_bf16_loss_curve_follows_fp32():
    from ffcl_monai.engines.ffcl import LocalContrastiveTrainer
    from ffcl_monai.networks.backbones import build_backbone

    def make():
        return build_backbone("resnet10")

    _check_curve(_losses(LocalContrastiveTrainer, make, False), _losses(LocalContrastiveTrainer, make, True))


def test_channels_last_same_numbers():
    from ffcl_monai.engines.classification import prepare_network
    from ffcl_monai.networks.classifier import Classifier

    torch.manual_seed(0)
    ref = prepare_network(Classifier("resnet18", num_classes=2), "cpu")
    fast = prepare_network(Classifier("resnet18", num_classes=2), "cpu", channels_last=True)
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(4, 1, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    out_ref, out_fast = ref(x), fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-4)
    torch.nn.functional.cross_entropy(out_ref, y).backward()
    torch.nn.functional.cross_entropy(out_fast, y).backward()
    # float32 summation order differs between memory formats and BatchNorm over 4 samples amplifies it: the
    # gradients agree to 1e-3 of each tensor's largest entry (measured: <= 2e-4), plus 1e-6 absolute for the conv
    # biases in front of BatchNorm, whose true gradient is 0 and whose computed one is rounding noise (~1e-8).
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert (b.grad - a.grad).abs().max() <= 1e-3 * a.grad.abs().max() + 1e-6, name


def test_fast_path_keys_are_off_on_cpu():
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(CONFIGS / f) for f in ("common.yaml", "train.yaml")]))
    if torch.cuda.is_available():  # pragma: no cover - CI is CPU-only
        return
    for key in ("amp", "channels_last", "cache_on_device", "non_blocking"):
        assert parser.get_parsed_content(key) is False, key
    assert parser.get_parsed_content("compile") is False
    assert parser.get_parsed_content("amp_dtype") == "bfloat16"


def test_fast_path_keys_wire_through_train_yaml(tiny2d, tmp_path):
    """The GPU fast-path switches, forced on for a CPU run: the cache is moved by `to_device`, the network is
    channels_last, MetaTensor tracking is off during training and restored afterwards."""
    from monai.data import get_track_meta

    from conftest import FAST, cfg, run_bundle

    out = tmp_path / "fast"
    run_bundle(cfg("common.yaml", "train.yaml"), datalist=str(tiny2d), output_dir=str(out),
               **{**FAST, "max_epochs": 1}, cache_on_device=True, channels_last=True, non_blocking=True)
    assert (out / "models" / "model.pt").is_file()
    assert get_track_meta()  # finalize restored MONAI's default
