"""The FFCL paper's protocol as a preset (bundle/configs/paper.yaml, seed 000 §3) and the keys it needs: the cosine
schedule, early stopping of the contrastive stages on their own loss (resumable), the stages' augmentation switch,
and every step of the FFCL program resolved with the preset (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from conftest import make_2d
from ffcl_monai.engines.optimizers import make_scheduler
from ffcl_monai.handlers.training import LossEarlyStopper, ResumeHandler
from ffcl_monai.workflows import runner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------------
# lr_schedule


def _lrs(schedule: str, epochs: int, warmup: int = 0) -> list[float]:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = make_scheduler(opt, epochs, warmup, schedule)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_is_cosine_annealing_and_constant_is_constant():
    # CosineAnnealingLR(T_max=T, eta_min=0) in closed form: lr_e = lr0 * (1 + cos(pi e / T)) / 2
    got = _lrs("cosine", 100)
    want = [1e-4 * (1 + math.cos(math.pi * e / 100)) / 2 for e in range(100)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-12
    assert got[0] == 1e-4 and got[50] == pytest.approx(0.5e-4) and got[99] < 1e-7
    assert _lrs("constant", 5) == [1e-4] * 5
    # warm-up then constant: (e + 1) / (w + 1) for e < w
    assert _lrs("constant", 4, warmup=2) == pytest.approx([1e-4 / 3, 2e-4 / 3, 1e-4, 1e-4])
    with pytest.raises(ValueError, match="lr_schedule"):
        _lrs("cosnie", 3)


# ---------------------------------------------------------------------------------------------------------------------
# early stopping on an epoch loss


def _engine(losses: list[float]) -> Engine:
    """A trainer whose epoch metric `stage_loss` is losses[epoch - 1] (one iteration per epoch)."""
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e):  # registered first, as the project's trainers write their epoch means first
        e.state.metrics["stage_loss"] = losses[e.state.epoch - 1]

    return engine


def _run(engine: Engine, max_epochs: int, handlers: list) -> list[int]:
    seen: list[int] = []
    for h in handlers:
        h.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.epoch))  # after the stopper
    completed: list[bool] = []
    engine.add_event_handler(Events.COMPLETED, lambda e: completed.append(True))
    engine.run([0], max_epochs=max_epochs)
    assert completed == [True]  # a stopped run still completes (savers, MLflow close on COMPLETED)
    return seen


def test_loss_early_stopper_counts_epochs_without_a_new_lowest_loss():
    # by hand, patience 3: e1 1.0 (best), e2 0.9 (best), e3 0.95 (1), e4 0.92 (2), e5 0.91 (3 -> stop after e5)
    losses = [1.0, 0.9, 0.95, 0.92, 0.91, 0.5, 0.4]
    stopper = LossEarlyStopper(patience=3, metric="stage_loss")
    seen = _run(_engine(losses), 7, [stopper])
    assert seen == [1, 2, 3, 4, 5]  # the handlers after the stopper still ran for the stopping epoch
    assert stopper.stopped_epoch == 5
    assert stopper.state_dict() == {"counter": 3, "best_score": -0.9}
    # an equal loss is no improvement (patience 2: e2 -> 1, e3 -> 2, stop after e3); off = never stops
    assert _run(_engine([1.0] * 5), 5, [LossEarlyStopper(2, "stage_loss")]) == [1, 2, 3]
    assert _run(_engine(losses), 7, [LossEarlyStopper(0, "stage_loss")]) == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="patience"):
        LossEarlyStopper(-1)


def test_loss_early_stopper_resumes_through_the_resume_checkpoint(tmp_path):
    """Interrupted after epoch 3 and resumed: the same stopping epoch as the uninterrupted run (e5), because the
    stopper's best loss and counter travel in resume.pt (ResumeHandler extra_state); resumed from a checkpoint written
    at the stopping epoch, no further epoch is trained."""
    losses = [1.0, 0.9, 0.95, 0.92, 0.91, 0.5, 0.4]
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = tmp_path / "resume.pt"

    first = LossEarlyStopper(3, "stage_loss")
    saver = ResumeHandler(path, net, opt, extra_state={"stage_early_stop": first})
    assert _run(_engine(losses), 3, [first, saver]) == [1, 2, 3]  # "killed" after epoch 3
    saver.wait()
    assert torch.load(path, weights_only=True)["extra"] == {"stage_early_stop": {"counter": 1, "best_score": -0.9}}

    second = LossEarlyStopper(3, "stage_loss")
    loader = ResumeHandler(path, net, opt, resume=True, extra_state={"stage_early_stop": second})
    seen = _run(_engine(losses), 7, [second, loader])
    assert seen == [4, 5] and second.stopped_epoch == 5  # a fresh stopper would have run to epoch 7
    loader.wait()

    third = LossEarlyStopper(3, "stage_loss")
    again = ResumeHandler(path, net, opt, resume=True, extra_state={"stage_early_stop": third})
    assert _run(_engine(losses), 7, [third, again]) == []  # the checkpoint is at the stopping epoch: nothing more


def test_loss_early_stopper_refuses_the_greedy_local_schedule():
    engine = Engine(lambda e, b: None)
    engine.schedule = "greedy"
    with pytest.raises(ValueError, match="local_schedule"):
        LossEarlyStopper(5).attach(engine)
    LossEarlyStopper(0).attach(engine)  # off: nothing to refuse


# ---------------------------------------------------------------------------------------------------------------------
# stage_augment


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_2d(tmp_path_factory.mktemp("paper_tiny"), counts=(4, 4, 2), size=16)


def _stage_items(datalist, tmp_path, augment: bool, seeds=range(4)) -> list[torch.Tensor]:
    """The local stage's training preprocessing of the first training image under different random seeds."""
    from monai.transforms import Compose

    parser = runner.load(runner.config_files(["train.yaml", "ffcl.yaml", "ffcl_local.yaml"]), {
        "datalist": str(datalist), "output_dir": str(tmp_path / f"aug{augment}"), "image_size": [16, 16],
        "stage_augment": augment})
    pre: Compose = parser.get_parsed_content("train#preprocessing")
    item = parser.get_parsed_content("train#datalist")[0]
    out = []
    for s in seeds:
        pre.set_random_state(seed=s)
        out.append(torch.as_tensor(pre(dict(item))["image"]).clone())
    return out


def test_stage_augment_false_trains_the_stages_on_the_deterministic_transforms(tiny, tmp_path):
    off = _stage_items(tiny, tmp_path, augment=False)
    on = _stage_items(tiny, tmp_path, augment=True)
    assert all(torch.equal(off[0], x) for x in off[1:])  # every draw gives the same tensor
    assert any(not torch.equal(on[0], x) for x in on[1:])  # the default (true) augments, as before


@pytest.mark.slow
def test_stage_early_stopping_inside_a_stage_run(tiny, tmp_path):
    """The wiring in ffcl.yaml: with a constant learning rate as the watched metric (never a new lowest value) and
    patience 1, a 5-epoch local stage stops after epoch 2, and its checkpoints say so."""
    import json

    from conftest import run_bundle

    out = tmp_path / "stage"
    run_bundle(runner.config_files(["train.yaml", "ffcl.yaml", "ffcl_local.yaml"]), datalist=str(tiny),
               output_dir=str(out), image_size=[16, 16], backbone="resnet10", batch_size=4, local_epochs=5,
               lr_schedule="constant", stage_early_stop_patience=1, stage_early_stop_metric="lr", progress=False,
               monitor_interval=0)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    assert max(r.get("epoch", 0) for r in rows) == 2
    resume = torch.load(out / "checkpoints" / "resume.pt", weights_only=True)
    assert resume["trainer"]["epoch"] == 2 and resume["extra"]["stage_early_stop"]["counter"] == 1
    assert torch.load(out / "backbone.pt", weights_only=True)["epochs"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# the preset, every step as the FFCL program builds it


@pytest.mark.slow
@pytest.mark.parametrize("init", ["random", "imagenet"])
def test_paper_preset_reaches_every_step_of_the_program(tiny, tmp_path, init):
    """Resolve (no training) every step the program would run with paper.yaml appended, and check the paper's §3
    settings in each: 224 px, batch 10, Adam at 1e-4 with cosine annealing over the step's epochs (fine-tuning 100,
    local 50, global 50), stage early stopping at patience 5, one random partner per image, BCE, no augmentation in
    the stages, and, with an ImageNet init, 3 channels and ImageNet mean/std."""
    from monai.transforms.transform import RandomizableTrait

    from ffcl_monai.workflows.ffcl import plan_steps
    from test_imagenet_mapping import torchvision_resnet_state

    overrides = {"datalist": str(tiny), "output_dir": str(tmp_path / "run"), "backbone": "resnet18"}
    if init == "imagenet":
        weights = tmp_path / "resnet18.pth"
        torch.save(torchvision_resnet_state([2, 2, 2, 2], bottleneck=False), weights)
        overrides["init"] = f"imagenet:{weights}"
    entry = runner.config_files(["train.yaml", "ffcl.yaml", "paper.yaml"])
    steps = plan_steps(entry, overrides)
    assert [s.name for s in steps] == ["stage1_local", "stage2_global", "finetune", "evaluate_validation",
                                       "evaluate_test"]
    epochs = {"stage1_local": 50, "stage2_global": 50, "finetune": 100}
    for step in steps:
        assert step.files[-1].endswith("paper.yaml"), step.name  # the preset is in every step
        parser = runner.load(step.files, {**step.overrides, "output_dir": str(tmp_path / step.name)})
        get = parser.get_parsed_content
        where = step.name
        assert get("image_size") == [224, 224] and get("batch_size") == 10, where
        assert get("loss_name") == "bce", where  # fine-tuning's loss (and what the stages would pass on)
        if init == "imagenet":
            assert get("in_channels") == 3 and get("input_norm") == "imagenet", where
            assert "NormalizeInputd" in [type(t).__name__ for t in get("deterministic_transforms")], where
        else:
            assert get("in_channels") == 1 and get("input_norm") == "none", where
        if step.kind == "evaluate":
            continue
        n = epochs[step.name]
        assert get("max_epochs") == n, where
        optimizer = get("optimizer")
        assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-4, where
        assert optimizer.param_groups[0]["weight_decay"] == 0.0, where
        sched = get("lr_scheduler")
        assert get("lr_schedule") == "cosine" and get("warmup_epochs") == 0, where
        for e in (0, n // 3, n // 2, n - 1):  # CosineAnnealingLR(T_max = the step's epochs, eta_min = 0)
            assert sched.lr_lambdas[0](e) == pytest.approx((1 + math.cos(math.pi * e / n)) / 2), (where, e)
        if step.kind == "stage":
            assert get("stage_lr") == 1e-4, where
            assert get("pair_mode") == "random_partner" and get("ffcl_loss").pair_mode == "random_partner", where
            assert get("global_objective") == "eq1", where  # Eq. 1 in both stages
            stopper = get("stage_early_stopper")
            assert stopper.enabled and stopper.patience == 5, where
            assert get("train#handlers")[0] is stopper, where
            assert get("resume_handler").extra_state["stage_early_stop"] is stopper, where
            transforms = get("train#preprocessing").transforms
            assert not [t for t in transforms if isinstance(t, RandomizableTrait)], where  # no augmentation
        else:  # fine-tuning: model selection on validation AUC, no early stopping, augmentations as by default
            assert get("early_stop_patience") == 0 and get("validation") is True, where
