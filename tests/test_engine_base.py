"""The trainers' common base (ffcl_monai/engines/base.py) and what it shares with the Forward-Forward engines: a step
with a NaN/inf loss or gradient is skipped in float32 and bf16 (as GradScaler skips it in fp16), counted, logged, and
too many in a row stop the run; MONAI's IterationEvents fire once per iteration in MONAI's order; every batch goes
through ``prepare_batch``; epoch means, ``lr`` and ``skipped_steps`` are in ``state.metrics`` before the config's
handlers run. Also the one backbone saver and the one history writer (ffcl_monai/handlers/checkpoint.py, history.py).

The nets are tiny (4-8 conv channels): CPU bf16 convolutions take PyTorch's slow reference kernels.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import IterationEvents
from torch import nn
from torch.utils.data import DataLoader

from ffcl_monai.engines.precision import Precision, SkippedStepGuard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ITERATION_EVENTS = [
    IterationEvents.FORWARD_COMPLETED,
    IterationEvents.LOSS_COMPLETED,
    IterationEvents.BACKWARD_COMPLETED,
    IterationEvents.MODEL_COMPLETED,
]


# ------------------------------------------------------------------------------------------------------ helpers
def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are NaN (what CI saw on another CPU in bf16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class _FaultyLoss(nn.Module):
    """Wraps a loss; on the chosen calls (1-based) it gives NaN gradients (``mode="grad"``) or a NaN loss."""

    def __init__(self, loss: nn.Module, bad_calls: set[int] | range, mode: str = "grad") -> None:
        super().__init__()
        self.loss, self.bad_calls, self.mode, self.calls = loss, bad_calls, mode, 0

    def forward(self, emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.bad_calls:
            emb = _NaNGrad.apply(emb) if self.mode == "grad" else emb * float("nan")
        return self.loss(emb, targets)


def _tiny_backbone():
    from ffcl_monai.networks.backbones import Backbone

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

    return Backbone([block(1, 4, 1), block(4, 8, 2)], ["b1", "b2"], [4, 8], "tiny", 2, 1)


class _TinyContrastive(nn.Module):
    """``forward(x) -> (h, z)`` like ContrastiveModel."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _tiny_backbone()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.proj(h)


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _tiny_backbone()
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sex": self.head(self.backbone(x))}


def _loader(n: int = 12, size: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(1, size, size, generator=g), "view1": torch.rand(1, size, size, generator=g),
              "view2": torch.rand(1, size, size, generator=g), "label": i % 2,
              "sex": torch.tensor(float(i % 2) if i % 3 else float("nan"))} for i in range(n)]
    return DataLoader(items, batch_size=batch_size, shuffle=False)


def _global(loss=None, amp: bool = False, **kwargs):
    from ffcl_monai.engines.ffcl import GlobalContrastiveTrainer
    from ffcl_monai.losses.ffcl_pair import FFCLPairLoss

    torch.manual_seed(0)
    bb = _tiny_backbone()
    trainer = GlobalContrastiveTrainer("cpu", kwargs.pop("max_epochs", 1), _loader(), bb,
                                       torch.optim.Adam(bb.parameters(), 1e-2), loss or FFCLPairLoss(), amp=amp,
                                       **kwargs)
    return trainer, bb


def _make(kind: str, **kwargs):
    """(trainer, trained module) of each BaseTrainer subclass on the tiny nets."""
    from ffcl_monai.losses.auxiliary import MaskedMultiHeadLoss
    from ffcl_monai.losses.ntxent import NTXentLoss

    torch.manual_seed(0)
    if kind == "two_view":
        from ffcl_monai.engines.two_view import TwoViewTrainer

        net = _TinyContrastive()
        return TwoViewTrainer("cpu", 1, _loader(), net, torch.optim.Adam(net.parameters(), 1e-3), NTXentLoss(0.5),
                              **kwargs), net
    if kind == "auxiliary":
        from ffcl_monai.engines.auxiliary import AuxiliaryTrainer

        net = _Heads()
        return AuxiliaryTrainer("cpu", 1, _loader(), net, torch.optim.Adam(net.parameters(), 1e-3),
                                MaskedMultiHeadLoss({"sex": {"kind": "bce"}}), **kwargs), net
    if kind in ("local", "local_greedy"):
        from ffcl_monai.engines.ffcl import LocalContrastiveTrainer

        bb = _tiny_backbone()
        schedule = "greedy" if kind == "local_greedy" else "single_pass"
        return LocalContrastiveTrainer("cpu", 2 if schedule == "greedy" else 1, _loader(), bb,
                                       torch.optim.Adam(bb.parameters(), 1e-3), schedule=schedule, amp=False,
                                       **kwargs), bb
    assert kind == "global"
    return _global(**kwargs)


class _EventRecorder:
    """An ordinary handler with ``attach``: records MONAI's iteration events and what the output held at each."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.events: list = []
        self.seen: dict = {}

    def attach(self, engine: Engine) -> None:
        for event in ITERATION_EVENTS:
            engine.add_event_handler(event, self._record, event)
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)

    def _start(self, engine: Engine) -> None:
        self.before = _params(self.module)

    def _record(self, engine: Engine, event) -> None:
        self.events.append(event)
        out = engine.state.output
        grads = [p.grad for p in self.module.parameters() if p.requires_grad]
        self.seen.setdefault(event, []).append({
            "keys": set(out),
            "has_grad": any(g is not None for g in grads),
            "moved": not _same(self.module, self.before),
        })


# ------------------------------------------------------------------------------------- Precision.step on its own
def test_fp32_and_bf16_step_with_nan_gradient_is_skipped_per_optimizer():
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b)]
    for amp in (False, True):  # float32, then bf16 autocast (no scaler either way)
        p = Precision("cpu", amp=amp, dtype="bfloat16")
        assert p.scaler is None
        with p.autocast():
            h = a(torch.rand(3, 4))
            out = b(h.detach())
        p.backward(h.float().pow(2).mean() + out.float().pow(2).mean())
        b.weight.grad[0, 0] = float("nan")
        before_a, before_b = _params(a), _params(b)
        assert p.step(opts) is False
        assert not _same(a, before_a) and _same(b, before_b)  # only the optimizer with the NaN gradient skipped
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss = a(torch.rand(3, 4)).float().sum() * float("nan")  # a NaN loss skips every optimizer
        p.backward(loss)
        before_a = _params(a)
        assert p.step(opts, loss=loss) is False and _same(a, before_a)
        for opt in opts:
            opt.zero_grad(set_to_none=True)


def test_fp16_skip_is_reported():
    lin = nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    p16 = Precision("cpu", amp=True, dtype="float16", init_scale=2.0**10)  # no overflow but the one made below
    with p16.autocast():
        loss = lin(torch.rand(2, 4)).float().sum()
    p16.backward(loss)
    lin.weight.grad[0, 0] = float("inf")
    assert p16.step(opt) is False and p16.scaler.get_scale() == 2.0**9
    opt.zero_grad(set_to_none=True)
    with p16.autocast():
        loss = lin(torch.rand(2, 4)).float().sum()
    assert p16.backward_step(loss, opt) is True


def test_guard_counts_and_stops_after_max_consecutive(caplog):
    engine = Engine(lambda e, b: None)
    guard = SkippedStepGuard(max_consecutive=3)
    guard.attach(engine)
    with caplog.at_level(logging.WARNING, logger="ffcl_monai.engines.precision"):
        guard.record(engine, False)
        guard.record(engine, True)  # a good step resets the run of skipped ones
        guard.record(engine, False)
        guard.record(engine, False)
        with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row.*`learning_rate`.*`amp: false`"):
            guard.record(engine, False)
    assert guard.epoch_skipped == 4 and len([r for r in caplog.records if "step skipped" in r.message]) == 4
    assert SkippedStepGuard(max_consecutive=0).max_consecutive == 0  # counting only


# --------------------------------------------------------------------------------- the guard inside the trainers
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["grad", "loss"], ids=["nan_gradient", "nan_loss"])
def test_non_finite_step_leaves_the_weights_and_is_counted(amp, mode, caplog):
    from ffcl_monai.losses.ffcl_pair import FFCLPairLoss

    trainer, bb = _global(_FaultyLoss(FFCLPairLoss(), {2}, mode), amp=amp)
    assert trainer.scaler is None and trainer.bf16 == amp
    moved: dict[int, bool] = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        engine.before = _params(bb)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after(engine):
        moved[engine.state.iteration] = not _same(bb, engine.before)

    with caplog.at_level(logging.WARNING, logger="ffcl_monai.engines.precision"):
        trainer.run()
    assert moved == {1: True, 2: False, 3: True}  # the bad step changed nothing, the next one trained again
    assert trainer.state.metrics["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in bb.parameters())
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("iteration 2" in m and "step skipped" in m for m in warnings), warnings


def test_consecutive_non_finite_steps_stop_the_run_with_the_last_good_weights():
    from ffcl_monai.losses.ffcl_pair import FFCLPairLoss

    trainer, bb = _global(_FaultyLoss(FFCLPairLoss(), range(2, 100)), max_epochs=3, max_skipped_steps=4)
    snapshots = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: snapshots.append(_params(bb)))
    with pytest.raises(FloatingPointError, match="4 optimizer steps in a row") as err:
        trainer.run()
    assert "learning_rate" in str(err.value) and "amp" in str(err.value)
    assert trainer.state.iteration == 5  # 1 good step, then 4 skipped: epoch 2, iteration 5
    assert _same(bb, snapshots[0])


# ------------------------------------------------------------------------------------ events, batches, metrics
@pytest.mark.parametrize("kind", ["two_view", "auxiliary", "local", "local_greedy", "global"])
def test_iteration_events_fire_once_per_iteration_in_monai_order(kind):
    trainer, module = _make(kind)
    recorder = _EventRecorder(module)
    trainer._register_handlers([recorder])  # as a config's train_handlers
    loss_calls = []
    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, lambda e: loss_calls.append(e.state.iteration))
    trainer.run()
    n = trainer.state.iteration
    assert loss_calls == list(range(1, n + 1))  # once per iteration
    assert recorder.events == ITERATION_EVENTS * n
    fwd, loss, bwd, done = (recorder.seen[e] for e in ITERATION_EVENTS)
    assert all({"image", "label", "pred"} <= s["keys"] and "loss" not in s["keys"] for s in fwd)
    assert all("loss" in s["keys"] for s in loss)
    # as in MONAI: gradients exist after the backward pass, the weights move only after BACKWARD_COMPLETED
    assert all(s["has_grad"] and not s["moved"] for s in bwd)
    assert all(s["moved"] for s in done)
    assert isinstance(trainer.state.output["loss"], torch.Tensor) and trainer.state.output["loss"].ndim == 0


@pytest.mark.parametrize("kind", ["ff", "backprop"])
def test_forward_forward_engines_fire_the_same_events(kind):
    from ffcl_monai.engines.forward_forward import TensorBatches, create_trainer
    from ffcl_monai.networks.forward_forward import MLP, FFNet

    torch.manual_seed(0)
    x, y = torch.rand(40, 16), torch.arange(40) % 3
    net = FFNet(16, 3, (16, 16)) if kind == "ff" else MLP(16, 3, (16,))
    engine = create_trainer(kind, net, torch.optim.Adam(net.parameters(), 1e-2), threshold=16.0)
    recorder = _EventRecorder(net)
    recorder.attach(engine)
    engine.run(TensorBatches(x, y, 20), max_epochs=2)
    assert recorder.events == ITERATION_EVENTS * 4
    assert all(s["moved"] for s in recorder.seen[IterationEvents.MODEL_COMPLETED])
    assert engine.state.metrics["skipped_steps"] == 0 and math.isfinite(engine.state.metrics["loss"])


def test_every_batch_goes_through_prepare_batch_which_a_config_can_replace():
    from ffcl_monai.engines.two_view import PrepareTwoViewBatch

    calls = []

    def from_image(batch, device=None, non_blocking=False, **kwargs):
        """Both views from the ``image`` key: a config-level prepare_batch."""
        calls.append(1)
        x = batch["image"].to(device)
        return (x, x.flip(-1)), None

    trainer, _ = _make("two_view", prepare_batch=from_image)
    trainer.run()
    assert len(calls) == trainer.state.iteration == 3
    default, _ = _make("two_view")
    assert isinstance(default.prepare_batch, PrepareTwoViewBatch)
    with pytest.raises(KeyError, match="view2"):
        default.prepare_batch({"view1": torch.zeros(1)}, "cpu")
    with pytest.raises(ValueError, match="needs class labels"):
        _make("global")[0]._prepare({"image": torch.zeros(2, 1, 8, 8)})


def test_epoch_metrics_are_written_before_the_config_handlers():
    seen = {}

    class ConfigHandler:  # e.g. MLflow, StatsHandler, HistoryWriter
        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.update(e.state.metrics))

    trainer, _ = _make("global", train_handlers=[ConfigHandler()])
    trainer.run()
    assert {"global_loss", "lr", "skipped_steps"} <= set(seen) and seen["lr"] == 1e-2

    seen.clear()
    trainer, _ = _make("auxiliary", train_handlers=[ConfigHandler()])
    per_batch = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: per_batch.append((e.state.output["loss_sex"], e.state.output["known_sex"])))
    trainer.run()
    # the head's epoch loss is a mean over the samples with a known target, not over batches
    expected = sum(v * n for v, n in per_batch) / sum(n for _, n in per_batch)
    assert seen["aux_loss_sex"] == pytest.approx(expected, rel=1e-6)


def test_base_trainer_refuses_what_it_does_not_do():
    with pytest.raises(ValueError, match="accumulation"):
        _make("global", accumulation_steps=2)
    with pytest.raises(TypeError, match="decollate"):
        _make("global", decollate=True)


# --------------------------------------------------------------------------------- saver and history writer
def test_backbone_saver_every_epoch_with_extra_and_metrics(tmp_path):
    from ffcl_monai.handlers.checkpoint import BackboneSaver
    from ffcl_monai.networks.checkpoints import load_backbone, safe_load

    trainer, bb = _make("global", max_epochs=2)
    saves = []
    saver = BackboneSaver(tmp_path / "backbone.pt", trainer.model, {"stage": "global"})
    saver.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saves.append(safe_load(tmp_path / "backbone.pt")))
    trainer.run()
    assert [s["epochs"] for s in saves] == [1, 2]
    ckpt = safe_load(tmp_path / "backbone.pt")
    assert ckpt["stage"] == "global" and "global_loss" in ckpt["metrics"] and ckpt["backbone_name"] == "tiny"
    fresh = _tiny_backbone()
    load_backbone(fresh, tmp_path / "backbone.pt")
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), bb.parameters()))
    with pytest.raises(ValueError, match="reserved"):
        BackboneSaver(tmp_path / "x.pt", bb, {"backbone_name": "x"})
    with pytest.raises(TypeError, match="Backbone"):
        BackboneSaver(tmp_path / "x.pt", nn.Linear(2, 2))


def test_history_writer_rows_carry_the_run_id(tmp_path):
    from ffcl_monai.handlers.history import HistoryWriter

    trainer, _ = _make("local", train_handlers=[HistoryWriter(tmp_path, run_id="run-42")])
    trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["run_id"] == "run-42" and rows[0]["epoch"] == 1
    assert {"train_loss", "lr", "local_loss", "local_loss_b1", "skipped_steps"} <= set(rows[0])
    assert rows[0]["train_loss"] == pytest.approx(rows[0]["local_loss"])
    assert trainer.state.metrics["train_loss_epoch"] == rows[0]["train_loss"]
    assert (tmp_path / "training_curves.png").stat().st_size > 1000

    out = tmp_path / "stage"
    writers = [HistoryWriter(out, title="stage", filename="stage_history.jsonl", plot_filename="stage_curves.png")
               for _ in range(2)]
    for w in writers:
        trainer, _ = _make("global", train_handlers=[w])
        trainer.run()
    rows = [json.loads(x) for x in (out / "stage_history.jsonl").read_text().splitlines()]
    ids = [r["run_id"] for r in rows]
    assert ids == [w.run_id for w in writers] and len(set(ids)) == 2 and all(len(i) == 32 for i in ids)
    assert (out / "stage_curves.png").is_file() and not (out / "history.jsonl").exists()
