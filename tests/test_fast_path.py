"""GPU fast-path numerics, checked on CPU: autocast loss curves (bf16, and fp16 with its GradScaler) follow float32 on
the same seed (SimCLR engine and the FFCL local stage), channels_last gives the same numbers, and the fast-path keys
are off on CPU by default.

Tolerance (stated in docs/performance.md): over 6 optimisation steps from the same initial weights and batches,
every autocast loss is within 3% (relative) of the float32 loss of the same step, and the mean deviation is below
1.5%, for both dtypes. bf16 keeps 8 mantissa bits (~3 significant digits), so per-step deviations of ~0.5% are
expected and they compound slowly through the weight updates; a broken cast (e.g. the loss itself in low precision,
or a layer left in the wrong dtype) shows up as a deviation several times larger or a diverging curve. fp16 keeps
11 bits, and its GradScaler skips the steps whose scaled gradients overflow: on the SimCLR net the first three (the
scales 2**16, 2**15 and 2**14 overflow an fp16 weight gradient; from 2**13 on every step is taken), on the FFCL
local stage none. bf16 has no scaler, but the engines skip a step whose loss or gradients are NaN/inf in every
precision (engines/precision.py): CI on another CPU once got a finite first bf16 loss of the FFCL local stage with
non-finite gradients, which Adam then spread to every weight (NaN losses from step 2 on); with the skip the weights
stay those of the last good step. At lr 1e-4 over 6 steps the curves measure the forward/loss numerics more than
the updates (a SimCLR run with no update at all stays within 2.6% / 1.0%), so every autocast run may skip up to half
of its steps (the engine's ``skipped_steps``; for fp16 it must match the scaler's own record, and the scaler must
have run on every step); tests/test_precision.py checks the scaler's arithmetic and that every engine's weights move
in fp16, tests/test_engine_base.py the skipping itself.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import CONFIGS

STEPS = 6
LR = 1e-4
MAX_REL, MEAN_REL = 0.03, 0.015
AMP_DTYPES = ["bfloat16", "float16"]
MAX_SKIPPED = STEPS // 2  # steps an autocast run may skip: fp16 while the GradScaler lowers its initial scale 2**16,
# bf16 when a backward pass gives a NaN/inf gradient (CPU-dependent, see the module docstring)


# One intra-op thread for every comparison, on any machine: the bf16 deviation depends on the reduction order.
# Measured on the 2-core dev CPU, the SimCLR curve deviated by at most 1.6% on one thread and 2.3% on two (with one
# skipped NaN-gradient step), against the 3% tolerance; a CI machine with more cores ran it on more threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batches(n: int = STEPS * 8, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, 1, size, size, generator=g)
    noise = 0.05 * torch.randn(2, n, 1, size, size, generator=g)
    return [{"view1": base[i] + noise[0, i], "view2": base[i] + noise[1, i], "image": base[i], "label": i % 2}
            for i in range(n)]


def _losses(engine_cls, make_network, amp: bool, amp_dtype: str = "bfloat16", **kwargs) -> list[float]:
    """Per-step losses of one epoch of ``STEPS`` batches; checks that at most ``MAX_SKIPPED`` steps were skipped for
    a non-finite loss or gradient (none in float32), and for fp16 that the GradScaler ran every step and that the
    engine's count matches the scaler's."""
    torch.manual_seed(0)
    network = make_network()
    params = network.parameters()
    loader = DataLoader(_batches(), batch_size=8, shuffle=False)
    trainer = engine_cls(device="cpu", max_epochs=1, train_data_loader=loader, network=network,
                         optimizer=torch.optim.Adam(params, lr=LR), amp=amp, amp_dtype=amp_dtype, **kwargs)
    losses: list[float] = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    scales: list[float] = []
    if trainer.scaler is not None:  # fp16: every step's loss goes through the engine's GradScaler
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: scales.append(trainer.scaler.get_scale()))
    trainer.run()
    assert len(scales) == (STEPS if amp and amp_dtype == "float16" else 0)
    skipped = trainer.state.metrics["skipped_steps"]  # every precision: steps with a NaN/inf loss or gradient
    if scales:
        # a skipped step (inf/NaN gradient) halves the scale; it only grows after 2000 good steps
        assert skipped == sum(new < old for old, new in zip([2.0**16, *scales], scales)), (skipped, scales)
    assert skipped <= (MAX_SKIPPED if amp else 0), (skipped, scales, losses)
    return losses


def _check_curve(fp32: list[float], low: list[float]) -> None:
    assert len(fp32) == len(low) == STEPS
    rel = [abs(a - b) / abs(a) for a, b in zip(fp32, low)]
    assert max(rel) < MAX_REL and sum(rel) / len(rel) < MEAN_REL, (fp32, low, rel)
    assert fp32 != low  # autocast really ran in low precision


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
def test_simclr_autocast_loss_curve_follows_fp32(amp_dtype):
    from ffcl_monai.engines.two_view import TwoViewTrainer
    from ffcl_monai.losses.ntxent import NTXentLoss
    from ffcl_monai.networks.projection import ContrastiveModel

    def make():
        return ContrastiveModel("resnet10", proj_hidden_dim=64, proj_dim=32)

    kw = {"loss_function": NTXentLoss(0.5)}
    _check_curve(_losses(TwoViewTrainer, make, False, **kw), _losses(TwoViewTrainer, make, True, amp_dtype, **kw))


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
def test_ffcl_local_stage_autocast_loss_curve_follows_fp32(amp_dtype):
    from ffcl_monai.engines.ffcl import LocalContrastiveTrainer
    from ffcl_monai.networks.backbones import build_backbone

    def make():
        return build_backbone("resnet10")

    _check_curve(_losses(LocalContrastiveTrainer, make, False),
                 _losses(LocalContrastiveTrainer, make, True, amp_dtype))


def test_channels_last_same_numbers():
    from ffcl_monai.networks.classifier import Classifier, prepare_network

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

    parser = ConfigParser(ConfigParser.load_config_files([str(CONFIGS / f) for f in ("train.yaml",)]))
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
    run_bundle(cfg("train.yaml"), datalist=str(tiny2d), output_dir=str(out),
               **{**FAST, "max_epochs": 1}, cache_on_device=True, channels_last=True, non_blocking=True)
    assert (out / "models" / "model.pt").is_file()
    assert get_track_meta()  # finalize restored MONAI's default
