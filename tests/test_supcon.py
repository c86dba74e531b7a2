"""SupCon (Khosla et al. 2020, Eq. 2, L^sup_out) for FFCL's global stage: against a literal loop over anchors and
positives in float64, a worked example by hand, stability at tau = 0.01, scale invariance, the no-positive batch, a
tiny optimisation, DDP gathering (slow), and the `global_objective: supcon` wiring of ffcl_global.yaml on a real run."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from conftest import cfg, run_bundle
from ffcl_monai.losses.ffcl_pair import FFCLPairLoss, ffcl_pair_loss, same_class_mask
from ffcl_monai.losses.supcon import SupConLoss, global_stage_loss, positive_mask, supcon_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(emb: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 2 of the paper written out: for each anchor i with P(i) non-empty,
    -1/|P(i)| * sum_p log(exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)); then the mean over those anchors.
    float64, plain exp (no log-sum-exp trick), explicit loops; label rows equal = same class."""
    z = emb.double().flatten(1)
    z = z / z.norm(dim=1, keepdim=True)
    lab = labels.reshape(len(labels), -1)
    n = len(z)
    terms = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and torch.equal(lab[p], lab[i])]
        if not positives:
            continue
        denom = sum(torch.exp(z[i] @ z[a] / tau) for a in range(n) if a != i)
        term = sum(torch.log(torch.exp(z[i] @ z[p] / tau) / denom) for p in positives)
        terms.append(-term / len(positives))
    return torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("tau", [0.07, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_literal_formula_value_and_gradient(classes, tau, seed):
    g = torch.Generator().manual_seed(seed * 10 + classes)
    b = 6 + 3 * seed
    emb = torch.randn(b, 5, generator=g)
    labels = torch.randint(0, classes, (b,), generator=g)
    labels[0] = 99  # an anchor without any positive: left out of the mean, still a negative for the others
    got_x = emb.clone().requires_grad_(True)
    got = supcon_loss(got_x, labels, tau)
    want_x = emb.double().requires_grad_(True)
    want = reference(want_x, labels, tau)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(got_x.grad.double(), want_x.grad, rtol=1e-4, atol=1e-6)


def test_float64_input_stays_float64_and_passes_gradcheck():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    assert supcon_loss(emb, labels, 0.3).dtype == torch.float64
    torch.testing.assert_close(supcon_loss(emb, labels, 0.3), reference(emb, labels, 0.3), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda e: supcon_loss(e, labels, 0.3), (emb,))


def test_worked_example_by_hand():
    """Two classes, two copies each, on orthogonal axes. Each anchor: one positive at cos 1, two negatives at cos 0,
    so L = -log(e^{1/tau} / (e^{1/tau} + 2)) = log(1 + 2 e^{-1/tau}) for every anchor."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    for tau in (1.0, 0.5, 0.1):
        # abs: at tau = 0.1 the value is 9.1e-5 = 10 - logsumexp(...), a float32 difference of numbers near 10
        assert supcon_loss(emb, labels, tau).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), abs=2e-6)
    # tau = 1: log(1 + 2/e) = 0.551444...
    assert supcon_loss(emb, labels, 1.0).item() == pytest.approx(0.5514447, abs=1e-6)
    # The mean over positives is OUTSIDE the log (L_out): anchor 0 with positives at cos 1 and cos 0 (labels 0,0,0,1)
    emb2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels2 = torch.tensor([0, 0, 0, 1])
    tau = 0.5
    d0 = math.exp(2) + 2  # anchor 0: candidates at cos 1, 0, 0
    d2 = 2 + math.exp(2)  # anchor 2: candidates at cos 0, 0, 1 (its positives: 0 and 1, both at cos 0)
    l0 = -(math.log(math.exp(2) / d0) + math.log(1 / d0)) / 2
    l2 = -(math.log(1 / d2) + math.log(1 / d2)) / 2
    expected = (l0 + l0 + l2) / 3  # anchor 3 has no positive
    assert supcon_loss(emb2, labels2, tau).item() == pytest.approx(expected, rel=1e-6)


def test_label_forms_agree_and_multilabel_positives_are_identical_rows():
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(8, 6, generator=g)
    idx = torch.tensor([0, 2, 1, 0, 2, 1, 1, 0])
    one_hot = F.one_hot(idx, 3)
    assert supcon_loss(emb, idx, 0.2) == supcon_loss(emb, one_hot, 0.2) == supcon_loss(emb, one_hot.float(), 0.2)
    binary = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0], [0.0], [0.0], [1.0]])
    assert supcon_loss(emb, binary, 0.2) == supcon_loss(emb, binary[:, 0].long(), 0.2)
    multi = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 1], [-1, 0, 1]])
    torch.testing.assert_close(supcon_loss(emb, multi, 0.2).double(), reference(emb, multi, 0.2), rtol=1e-5, atol=1e-6)
    # the same "same class" as Eq. 1, in rectangular form
    assert torch.equal(positive_mask(multi, multi), same_class_mask(multi))
    assert positive_mask(multi, multi)[0, 1] and not positive_mask(multi, multi)[0, 2]


# ------------------------------------------------------------------------------------------------- numerics
def test_stable_at_tau_001_with_large_and_tiny_embeddings_under_bf16_autocast():
    torch.manual_seed(0)
    base = torch.randn(32, 64)
    labels = torch.arange(32) % 2
    # nearly aligned same-class rows: similarities near 1, so exp(sim / 0.01) ~ e^100 would overflow float32
    base[labels == 0] = base[0] + 1e-3 * base[labels == 0]
    for scale in (1e-25, 1.0, 1e4, 1e25):  # squares of 1e25 overflow float32, of 1e-25 underflow
        x = (base * scale).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = supcon_loss(x, labels, 0.01)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), scale
        loss.backward()
        assert torch.isfinite(x.grad).all(), scale
        torch.testing.assert_close(loss.double(), reference(base, labels, 0.01), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e3])
def test_invariant_to_the_embedding_scale(scale):
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(10, 8, generator=g)
    labels = torch.randint(0, 2, (10,), generator=g)
    torch.testing.assert_close(supcon_loss(emb * scale, labels, 0.1), supcon_loss(emb, labels, 0.1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2, 3]), torch.tensor([5])], ids=["distinct", "single"])
def test_no_positive_pair_gives_zero_with_a_graph(labels):
    x = torch.randn(len(labels), 3, requires_grad=True)
    loss = supcon_loss(x, labels, 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_bad_inputs_name_the_key():
    with pytest.raises(ValueError, match="supcon_temperature"):
        SupConLoss(temperature=0)
    with pytest.raises(ValueError, match="supcon_temperature"):
        supcon_loss(torch.randn(3, 2), torch.zeros(3), temperature=-1.0)
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(torch.randn(4, 2), torch.zeros(3))
    eq1 = FFCLPairLoss()
    assert global_stage_loss("eq1", eq1) is eq1
    assert isinstance(global_stage_loss("SupCon", eq1, 0.2), SupConLoss)
    with pytest.raises(ValueError, match="`global_objective`"):
        global_stage_loss("supcom", eq1)


def test_minimising_it_separates_two_classes():
    """Free embeddings of two interleaved classes, started at random: Adam on SupCon separates the classes with a
    margin and reaches the loss's lower bound. With |P(i)| = 7 positives per anchor, Jensen gives
    L_out >= log 7 (equality when an anchor's positives are equally similar and the negatives' exp terms vanish), so
    the bound is a value known in advance; it does not force a class to collapse to a point."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 8, generator=g).requires_grad_(True)
    labels = torch.arange(16) % 2
    same = same_class_mask(labels)
    off_diag = ~torch.eye(16, dtype=torch.bool)

    def margin():
        z = F.normalize(x.detach(), dim=1)
        c = z @ z.T
        return c[same & off_diag].min().item() - c[~same].max().item()

    assert margin() < 0  # at the start some image is closer to the other class than to one of its own
    opt = torch.optim.Adam([x], lr=0.05)
    first = supcon_loss(x, labels, 0.1).item()
    for _ in range(150):
        opt.zero_grad()
        loss = supcon_loss(x, labels, 0.1)
        loss.backward()
        opt.step()
    assert margin() > 0.3  # every same-class pair is more similar than every different-class pair, by 0.3
    assert first > math.log(7) + 1.0
    assert supcon_loss(x, labels, 0.1).item() == pytest.approx(math.log(7), abs=1e-3)
    # nearest-class-mean classification of the embeddings is perfect
    z = F.normalize(x.detach(), dim=1)
    means = torch.stack([z[labels == k].mean(0) for k in (0, 1)])
    assert torch.equal((z @ means.T).argmax(1), labels)


def test_differs_from_eq1():
    """Not Eq. 1 under another name: the wiring test below relies on the two values being far apart."""
    g = torch.Generator().manual_seed(7)
    emb, labels = torch.randn(8, 4, generator=g), torch.arange(8) % 2
    assert abs(supcon_loss(emb, labels, 0.1).item() - ffcl_pair_loss(emb, labels).item()) > 0.5


# ------------------------------------------------------------------------------------------------- distributed
def test_gather_flag_is_noop_without_distributed():
    g = torch.Generator().manual_seed(8)
    emb, labels = torch.randn(6, 5, generator=g), torch.tensor([0, 1, 0, 1, 1, 2])
    assert torch.equal(supcon_loss(emb, labels, 0.3, gather_distributed=True), supcon_loss(emb, labels, 0.3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, emb: torch.Tensor, labels: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = emb.shape[0] // world
        x = emb[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = supcon_loss(x, labels[rank * b : (rank + 1) * b], 0.2, gather_distributed=True)
        loss.backward()
        out[rank] = (loss.detach(), x.grad / world)  # DDP averages gradients over ranks
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns 2 processes; `make test-slow`
def test_gather_distributed_two_ranks_equals_global_batch():
    """2 CPU processes (gloo). Rank 0 holds classes {0, 1, 2}, rank 1 {0, 1, 1, 1}: class 2's anchor has no positive
    anywhere, the class-0 anchors have theirs only on the other rank, and the ranks hold different numbers of valid
    anchors. The mean of the rank losses and the DDP-averaged gradients equal SupCon on the whole batch."""
    import torch.multiprocessing as mp

    torch.manual_seed(9)
    world = 2
    emb = torch.randn(8, 6)
    labels = torch.tensor([0, 1, 2, 1, 0, 1, 1, 1])
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(_ddp_worker, args=(world, _free_port(), emb, labels, out), nprocs=world, start_method="spawn")
    full_x = emb.clone().requires_grad_(True)
    full = supcon_loss(full_x, labels, 0.2)
    full.backward()
    torch.testing.assert_close(full.double(), reference(emb, labels, 0.2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(out[r][0] for r in range(world)) / world, full.detach(), rtol=1e-6, atol=1e-6)
    for r in range(world):
        torch.testing.assert_close(out[r][1], full_x.grad[r * 4 : (r + 1) * 4], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- wiring
def _global_parser(**overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files(cfg("train.yaml", "ffcl.yaml", "ffcl_global.yaml")))
    for k, v in overrides.items():
        parser[k] = v
    return parser


def test_global_stage_config_picks_the_loss():
    parser = _global_parser()   # the default since the defaults study (docs/ffcl.md): SupCon at tau 0.1
    assert parser["global_objective"] == "supcon" and parser["supcon_temperature"] == 0.1
    assert isinstance(parser.get_parsed_content("loss"), SupConLoss)
    assert isinstance(_global_parser(global_objective="eq1").get_parsed_content("loss"), FFCLPairLoss)
    loss = _global_parser(global_objective="supcon", supcon_temperature=0.2).get_parsed_content("loss")
    assert isinstance(loss, SupConLoss) and loss.temperature == 0.2 and not loss.gather_distributed
    with pytest.raises(Exception) as info:
        _global_parser(global_objective="simclr").get_parsed_content("loss")
    chain, e = [], info.value
    while e is not None:  # MONAI wraps the ValueError in "Failed to evaluate ConfigExpression"
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("`global_objective`" in c for c in chain), chain
    # the local stage keeps Eq. 1 whatever global_objective says
    from monai.bundle import ConfigParser

    local = ConfigParser(ConfigParser.load_config_files(cfg("train.yaml", "ffcl.yaml", "ffcl_local.yaml")))
    local["global_objective"] = "supcon"
    assert isinstance(local.get_parsed_content("loss"), FFCLPairLoss)


class _FirstIteration:
    """Records the first iteration's embeddings, labels and loss (a handler the test puts in `method_handlers`)."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self._record)

    def _record(self, engine) -> None:
        out = engine.state.output
        self.seen = {"pred": out["pred"].detach().clone(), "label": out["label"].clone(), "loss": float(out["loss"])}


def test_global_stage_runs_supcon_and_records_it(tiny2d, tmp_path):
    import mlflow

    from ffcl_monai.networks.checkpoints import safe_load

    spy = _FirstIteration()
    out = tmp_path / "global"
    run_bundle(cfg("train.yaml", "ffcl.yaml", "ffcl_global.yaml"), datalist=str(tiny2d), output_dir=str(out),
               image_size=[16, 16], backbone="resnet10", batch_size=12, global_epochs=1, monitor_interval=0,
               monitor_plot="none", progress=False, global_objective="supcon", supcon_temperature=0.2,
               method_handlers=[spy])
    # the loss the engine back-propagated on the first batch is SupCon (tau 0.2) of that batch, computed here by the
    # literal formula, and not Eq. 1
    assert spy.seen, "the first iteration was not recorded"
    pred, label = spy.seen["pred"], spy.seen["label"]
    assert len(label) == 12 and len(set(label.flatten().tolist())) == 2
    assert spy.seen["loss"] == pytest.approx(reference(pred, label, 0.2).item(), rel=1e-5)
    assert abs(spy.seen["loss"] - ffcl_pair_loss(pred, label).item()) > 0.1
    # one batch per epoch: the epoch's global_loss is that value
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert history[-1]["global_loss"] == pytest.approx(spy.seen["loss"], rel=1e-5)
    # the MLflow params of the stage and the checkpoint say which loss trained it
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("ffcl_monai")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["global_objective"] == "supcon" and float(run.data.params["supcon_temperature"]) == 0.2
    assert run.data.params["stage"] == "global"
    ckpt = safe_load(out / "backbone.pt")
    assert ckpt["global_objective"] == "supcon" and ckpt["supcon_temperature"] == 0.2 and ckpt["stage"] == "global"
