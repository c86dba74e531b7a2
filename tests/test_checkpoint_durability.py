"""Checkpoints survive crashes and bad disks: fsync before rename, no temporary file left by a failed write, two
resume generations kept, and resume falls back to the older one when the newest is damaged, saying so."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import FAST, cfg, make_2d, run_bundle
from ffcl_monai.networks.checkpoints import atomic_save, atomic_write_text, previous_generation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_atomic_writes_fsync_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_save({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert events[:2] == ["fsync", "replace"], events  # the data is on disk before the name points at it
    events.clear()
    atomic_write_text(tmp_path / "a.json", "{}")
    assert events[:2] == ["fsync", "replace"], events


class _Unpicklable:
    def __reduce__(self):
        raise OSError("No space left on device")


def test_failed_write_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"v": 1}, path)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"v": 2, "bad": _Unpicklable()}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True) == {"v": 1}


def test_keep_previous_generation(tmp_path):
    path = tmp_path / "resume.pt"
    for v in range(3):
        atomic_save({"v": v}, path, keep_previous=True)
    assert torch.load(path, weights_only=True) == {"v": 2}
    assert torch.load(previous_generation(path), weights_only=True) == {"v": 1}
    assert previous_generation(path).name == "resume.prev.pt"


def _train(datalist: Path, out: Path, **extra) -> None:
    run_bundle(cfg("train.yaml"), datalist=str(datalist), output_dir=str(out),
               **{**FAST, "seed": 3, **extra})


def test_resume_falls_back_to_the_previous_generation_when_the_newest_is_damaged(tmp_path, capfd):
    datalist = make_2d(tmp_path / "data", counts=(8, 4, 4))
    out = tmp_path / "run"
    _train(datalist, out, max_epochs=2)
    newest, older = out / "checkpoints" / "resume.pt", out / "checkpoints" / "resume.prev.pt"
    assert torch.load(newest, weights_only=True)["trainer"]["epoch"] == 2
    assert torch.load(older, weights_only=True)["trainer"]["epoch"] == 1
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # truncated by a disk error
    capfd.readouterr()
    _train(datalist, out, max_epochs=3, resume=True)
    said = "".join(capfd.readouterr())  # the bundle's logging.conf writes to stdout
    assert "resume.pt is damaged" in said and "resuming from the previous generation" in said, said[-2000:]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    assert history[-1]["epoch"] == 3
    assert torch.load(newest, weights_only=True)["trainer"]["epoch"] == 3  # epochs 2 and 3 were trained again


def test_resume_under_another_lr_schedule_says_what_to_do(tmp_path):
    """A checkpoint written under one schedule and loaded under another (the config changed between kill and resume)
    stops with a message naming the checkpoint and the two ways out, not a bare KeyError."""
    import pytest
    import torch
    from ignite.engine import Engine

    from ffcl_monai.engines.optimizers import make_scheduler
    from ffcl_monai.handlers.training import ResumeHandler

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    path = tmp_path / "checkpoints" / "resume.pt"
    engine = Engine(lambda e, b: None)
    writer = ResumeHandler(path, net, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5))
    writer.save(engine)
    writer.wait()
    reader = ResumeHandler(path, net, opt, make_scheduler(opt, 5), resume=True)
    with pytest.raises(RuntimeError, match="another learning-rate schedule.*config_resolved.json.*--overwrite True"):
        reader.load(engine)
