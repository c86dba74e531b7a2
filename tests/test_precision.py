"""Mixed precision shared by the project's engines (ffcl_monai/engines/precision.py): fp16 autocast with a GradScaler
(`amp_dtype: float16`) next to bf16, on CPU.

The helper's fp16 path is checked on a tiny Linear model (the gradients really are scaled, a step with an inf gradient
is skipped and lowers the scale, clipping sees unscaled gradients, several optimizers share one scaler), then every
engine runs two fp16 iterations on small networks. CPU convolutions in fp16/bf16 take PyTorch's slow reference
kernels (about 60x slower than float32 in backward), hence the tiny conv nets here. The fp16-vs-fp32 loss-curve check
is the parametrised autocast test in test_fast_path.py.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader

from conftest import CONFIGS
from ffcl_monai.engines.precision import Precision, resolve_amp_dtype

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INIT_SCALE = 2.0**16


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


class _Spy:
    """Counts calls of the scaler's ``scale`` and ``step`` (instance attributes shadow the methods)."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaled = self.stepped = 0
        scale, step = scaler.scale, scaler.step

        def counted_scale(*a, **k):
            self.scaled += 1
            return scale(*a, **k)

        def counted_step(*a, **k):
            self.stepped += 1
            return step(*a, **k)

        scaler.scale, scaler.step = counted_scale, counted_step


# ----------------------------------------------------------------------------------------------------- the helper
@pytest.mark.parametrize("value", ["float16", "torch.float16", " Float16", torch.float16])
def test_dtype_names_and_dtypes_resolve(value):
    assert resolve_amp_dtype(value) is torch.float16
    assert resolve_amp_dtype("bfloat16") is resolve_amp_dtype(torch.bfloat16) is torch.bfloat16


@pytest.mark.parametrize("bad", ["fp8", "float32", torch.float32, "half", None])
def test_bad_dtype_names_the_config_key(bad):
    with pytest.raises(ValueError, match=r"`amp_dtype`.*bfloat16.*float16"):
        resolve_amp_dtype(bad)
    with pytest.raises(ValueError, match="amp_dtype"):
        Precision("cpu", amp=False, dtype=bad)  # validated even with amp off: a typo fails at start


def test_bf16_and_off_have_no_scaler():
    x = torch.rand(2, 4)
    lin = nn.Linear(4, 3)
    bf16 = Precision("cpu", amp=True, dtype="bfloat16")
    assert bf16.scaler is None
    with bf16.autocast():
        assert lin(x).dtype == torch.bfloat16
    off = Precision("cpu", amp=False, dtype="float16")
    assert off.scaler is None and off.state_dict() == {}
    with off.autocast():
        assert lin(x).dtype == torch.float32


def test_fp16_scales_the_loss_and_steps_with_the_true_gradient():
    torch.manual_seed(0)
    x, y = torch.rand(8, 4), torch.rand(8, 3)
    ref, lin = nn.Linear(4, 3), nn.Linear(4, 3)
    lin.load_state_dict(ref.state_dict())
    p16 = Precision("cpu", amp=True, dtype="float16")
    assert isinstance(p16.scaler, torch.amp.GradScaler) and p16.scaler.is_enabled()
    with p16.autocast():
        out = lin(x)
    assert out.dtype == torch.float16
    loss = nn.functional.mse_loss(out.float(), y)
    nn.functional.mse_loss(ref(x), y).backward()
    p16.backward(loss)
    # the gradients carry the loss scale (fp16 rounding of the forward pass aside)
    torch.testing.assert_close(lin.weight.grad / INIT_SCALE, ref.weight.grad, rtol=5e-3, atol=1e-5)
    before = lin.weight.detach().clone()
    p16.step(torch.optim.SGD(lin.parameters(), lr=0.1))
    torch.testing.assert_close(before - lin.weight.detach(), 0.1 * ref.weight.grad, rtol=5e-3, atol=1e-6)
    assert p16.scaler.get_scale() == INIT_SCALE  # a good step keeps the scale (it grows after 2000 of them)


def test_fp16_step_with_inf_gradient_is_skipped_and_halves_the_scale():
    lin = nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    p16 = Precision("cpu", amp=True, dtype=torch.float16)
    with p16.autocast():
        loss = lin(torch.rand(2, 4)).float().sum()
    p16.backward(loss)
    lin.weight.grad[0, 0] = float("inf")
    before = _params(lin)
    p16.step(opt)
    assert not _changed(lin, before)
    assert p16.scaler.get_scale() == INIT_SCALE / 2
    assert p16.state_dict()["scale"] == INIT_SCALE / 2


def test_fp16_clipping_sees_unscaled_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    p16 = Precision("cpu", amp=True, dtype="float16", init_scale=2.0**10)  # no overflow in this step
    with p16.autocast():
        loss = lin(torch.rand(8, 4)).float().pow(2).mean()
    before = _params(lin)
    p16.backward_step(loss, torch.optim.SGD(lin.parameters(), lr=1.0), max_grad_norm=1e-3)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, lin.parameters())])
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-3)  # clipping the scaled gradients: 2**10 x less


def test_fp16_optimizers_share_one_scaler_and_skip_only_the_overflowing_one():
    a, b, frozen = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(2, 2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b, frozen)]
    p16 = Precision("cpu", amp=True, dtype="float16", init_scale=2.0**10)  # no overflow but the one made below
    spy = _Spy(p16.scaler)
    with p16.autocast():
        h = a(torch.rand(3, 4))
        out = b(h.detach())  # FF-style: detached input, each layer its own loss
    p16.backward(h.float().pow(2).mean() + out.float().pow(2).mean())
    b.weight.grad[0, 0] = float("nan")
    before_a, before_b = _params(a), _params(b)
    p16.step(opts)  # `frozen` has no gradient: skipped instead of GradScaler's "no inf checks" error
    assert spy.scaled == 1 and spy.stepped == 2
    assert _changed(a, before_a) and not _changed(b, before_b)
    assert p16.scaler.get_scale() == 2.0**9  # one update for the step, not one per optimizer


def test_resume_handler_saves_and_restores_the_scaler(tmp_path):
    from ffcl_monai.handlers.training import ResumeHandler
    from ffcl_monai.networks.checkpoints import safe_load

    lin = nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    path = tmp_path / "resume.pt"

    def engine(dtype: str, amp: bool = True) -> Engine:
        e = Engine(lambda e, b: None)
        e.scaler = Precision("cpu", amp, dtype).scaler
        return e

    first = engine("float16")
    first.scaler.scale(torch.ones(()))
    first.scaler.update(INIT_SCALE / 8)  # as after three overflows
    ResumeHandler(path, lin, opt).attach(first)
    first.run([0], max_epochs=1)
    assert safe_load(path)["scaler"]["scale"] == INIT_SCALE / 8

    resumed = engine("float16")
    ResumeHandler(path, lin, opt, resume=True).attach(resumed)
    resumed.run([0], max_epochs=2)
    assert resumed.scaler.get_scale() == INIT_SCALE / 8

    bf16 = engine("bfloat16")
    ResumeHandler(tmp_path / "bf16.pt", lin, opt).attach(bf16)
    bf16.run([0], max_epochs=1)
    assert "scaler" not in safe_load(tmp_path / "bf16.pt")


# ----------------------------------------------------------------------------------------- every engine in fp16
class _TinyContrastive(nn.Module):
    """``forward(x) -> (h, z)`` like ContrastiveModel, with 4 conv channels (CPU fp16 convolutions are slow)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.proj = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x).mean(dim=(2, 3))
        return h, self.proj(h)


def _tiny_backbone():
    from ffcl_monai.networks.backbones import Backbone

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

    return Backbone([block(1, 4, 1), block(4, 8, 2)], ["b1", "b2"], [4, 8], "tiny", 2, 1)


def _loader(n: int = 8, size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(1, size, size, generator=g), "view1": torch.rand(1, size, size, generator=g),
              "view2": torch.rand(1, size, size, generator=g), "label": i % 2} for i in range(n)]
    return DataLoader(items, batch_size=4, shuffle=False)


def _run_fp16(trainer, module: nn.Module) -> list[float]:
    """Run ``trainer`` (two iterations); check the scaler did the steps, the losses are finite, the weights moved."""
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler is trainer.precision.scaler
    spy = _Spy(trainer.scaler)
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    before = _params(module)
    trainer.run()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert spy.scaled == 2 and spy.stepped == 2
    assert _changed(module, before)
    return losses


def test_two_view_trainer_fp16():
    from ffcl_monai.engines.two_view import TwoViewTrainer
    from ffcl_monai.losses.ntxent import NTXentLoss

    torch.manual_seed(0)
    net = _TinyContrastive()
    trainer = TwoViewTrainer("cpu", 1, _loader(), net, torch.optim.Adam(net.parameters(), 1e-3), NTXentLoss(0.5),
                             amp=True, amp_dtype="float16")
    _run_fp16(trainer, net)


def test_auxiliary_trainer_fp16():
    from ffcl_monai.engines.auxiliary import AuxiliaryTrainer
    from ffcl_monai.losses.auxiliary import MaskedMultiHeadLoss

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _TinyContrastive()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"label": self.body(x)[1][:, :1]}

    torch.manual_seed(0)
    net = Heads()
    trainer = AuxiliaryTrainer("cpu", 1, _loader(), net, torch.optim.Adam(net.parameters(), 1e-3),
                               MaskedMultiHeadLoss({"label": {"kind": "bce"}}), amp=True, amp_dtype="float16")
    _run_fp16(trainer, net)


def test_ffcl_local_stage_fp16_single_pass_and_greedy():
    from ffcl_monai.engines.ffcl import LocalContrastiveTrainer

    for schedule, epochs in (("single_pass", 1), ("greedy", 2)):
        torch.manual_seed(0)
        bb = _tiny_backbone()
        loader = _loader() if epochs == 1 else _loader(n=4)  # greedy: one iteration per block
        trainer = LocalContrastiveTrainer("cpu", epochs, loader, bb, torch.optim.Adam(bb.parameters(), 1e-3),
                                          schedule=schedule, amp=True, amp_dtype="float16")
        assert not trainer.bf16
        _run_fp16(trainer, bb)
        assert ("local_loss_b1" in trainer.state.metrics) == (schedule == "single_pass")
        assert "local_loss_b2" in trainer.state.metrics


def test_ffcl_global_stage_fp16():
    from ffcl_monai.engines.ffcl import GlobalContrastiveTrainer
    from ffcl_monai.networks.projection import GlobalContrastModel

    torch.manual_seed(0)
    model = GlobalContrastModel(_tiny_backbone(), projection="linear", proj_dim=8)
    trainer = GlobalContrastiveTrainer("cpu", 1, _loader(), model, torch.optim.Adam(model.parameters(), 1e-3),
                                       amp=True, amp_dtype="float16")
    _run_fp16(trainer, model)


def _ff_data(n: int = 40, d: int = 16, m: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % m
    return torch.rand(n, d, generator=g) + 0.5 * nn.functional.one_hot(y, d).float(), y


@pytest.mark.parametrize("negatives", ["hard", "other_sample"])
def test_ff_trainer_fp16_with_one_optimizer_per_layer(negatives):
    from ffcl_monai.engines.forward_forward import TensorBatches, create_ff_trainer, ff_scores
    from ffcl_monai.networks.forward_forward import FFNet

    torch.manual_seed(0)
    x, y = _ff_data()
    net = FFNet(16, 3, (32, 32))
    opts = [torch.optim.Adam(layer.parameters(), 1e-2) for layer in net.layers]
    engine = create_ff_trainer(net, opts, negatives=negatives, hard_layers=1, threshold=32.0, amp=True,
                               amp_dtype="float16", lr_schedule="cosine")
    assert isinstance(engine.scaler, torch.amp.GradScaler)
    spy = _Spy(engine.scaler)
    before = [_params(layer) for layer in net.layers]
    engine.run(TensorBatches(x, y, 20), max_epochs=1)
    assert spy.scaled == 2 and spy.stepped == 2 * len(opts)  # one shared scaler, every layer's optimizer stepped
    assert all(_changed(layer, b) for layer, b in zip(net.layers, before))
    assert all(torch.isfinite(torch.tensor(v)) for k, v in engine.state.metrics.items() if k != "train_time_s")
    scores = ff_scores(net, x[:5], amp=True, amp_dtype="float16")
    assert scores.shape == (5, 3) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_ff_greedy_fp16_skips_the_frozen_layers_optimizer():
    from ffcl_monai.engines.forward_forward import TensorBatches, create_ff_trainer
    from ffcl_monai.networks.forward_forward import FFNet

    torch.manual_seed(0)
    x, y = _ff_data()
    net = FFNet(16, 3, (32, 32))
    opts = [torch.optim.Adam(layer.parameters(), 1e-2) for layer in net.layers]
    engine = create_ff_trainer(net, opts, schedule="greedy", epochs_per_layer=1, negatives="wrong_label",
                               threshold=32.0, amp=True, amp_dtype="float16")
    spy = _Spy(engine.scaler)
    engine.run(TensorBatches(x, y, 20), max_epochs=2)
    assert spy.stepped == 4  # one optimizer (the trained layer's) per iteration
    assert torch.isfinite(torch.tensor(engine.state.metrics["loss"]))


def test_backprop_baseline_fp16():
    from ffcl_monai.engines.forward_forward import TensorBatches, create_trainer
    from ffcl_monai.networks.forward_forward import MLP

    torch.manual_seed(0)
    x, y = _ff_data()
    model = MLP(16, 3, (32,))
    engine = create_trainer("backprop", model, torch.optim.Adam(model.parameters(), 1e-2), amp=True,
                            amp_dtype="float16", schedule="greedy")
    spy = _Spy(engine.scaler)
    before = _params(model)
    engine.run(TensorBatches(x, y, 20), max_epochs=1)
    assert spy.stepped == 2 and _changed(model, before)


# ------------------------------------------------------------------------------------------------- bundle wiring
@pytest.mark.parametrize(
    "files, keys",
    [
        (["train.yaml", "pretrain_simclr.yaml"], ["train#trainer#amp_kwargs"]),
        (["train.yaml", "pretrain_simclr.yaml", "pretrain_barlow.yaml"], ["train#trainer#amp_kwargs"]),
        (["train.yaml", "pretrain_aux.yaml"], ["train#trainer#amp_kwargs"]),
        (["train.yaml", "ffcl.yaml", "ffcl_local.yaml"], ["train#trainer#amp_kwargs"]),
        (["train.yaml", "ffcl.yaml", "ffcl_global.yaml"], ["train#trainer#amp_kwargs"]),
        (["train.yaml", "ff.yaml"], ["train#trainer#amp_dtype", "validate#evaluator#amp_kwargs", "evaluate#evaluator#amp_kwargs"]),
        (["train.yaml"], ["train#trainer#amp_kwargs", "validate#evaluator#amp_kwargs"]),
        (["train.yaml", "evaluate.yaml"], ["validate#evaluator#amp_kwargs"]),
        (["inference.yaml"], ["evaluator#amp_kwargs"]),
    ],
)
def test_configs_pass_amp_dtype_to_every_engine(files, keys):
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(CONFIGS / f) for f in files]))
    parser["amp_dtype"] = "float16"
    for key in keys:
        value = parser.get_parsed_content(key)
        assert (value["dtype"] if isinstance(value, dict) else value) in ("float16", torch.float16), key


def test_bad_amp_dtype_in_a_config_names_the_key():
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(CONFIGS / f) for f in ("train.yaml",)]))
    parser["amp_dtype"] = "float61"
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("train#trainer#amp_kwargs")
    chain, e = [], err.value
    while e is not None:  # MONAI wraps it in "Failed to evaluate ConfigExpression"; the traceback shows the cause
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("`amp_dtype`" in m and "float16" in m for m in chain), chain
