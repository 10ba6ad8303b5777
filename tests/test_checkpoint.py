"""Checkpoint files without a training run: manifests, the corrupt-checkpoint fallback, pruning,
the skipped-step optimizer and the stop signal."""

import json
import logging
import os
import signal

import pytest
import torch

from tada_dist import checkpoint
from tada_dist.preemption import StopRequest
from tada_dist.trainer import frozen_optimizer, zero_gradient_loss


def fake_checkpoint(output_dir, step, payload=b"weights", run=None):
    """A folder shaped like a finished save: files, manifest (with the `run` record), `latest` pointing at it."""
    ckpt_dir = checkpoint.checkpoint_dir(output_dir)
    tag_dir = ckpt_dir / checkpoint.step_tag(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / checkpoint.MODEL_STATES_FILE).write_bytes(payload + bytes([step]))
    (tag_dir / "rng_rank0.pt").write_bytes(b"rng")
    checkpoint._write_manifest(tag_dir, step, run or {})
    checkpoint._write_atomically(ckpt_dir / checkpoint.LATEST_FILE, tag_dir.name)
    return tag_dir


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    tag_dir = fake_checkpoint(tmp_path, 5)
    manifest = json.loads((tag_dir / checkpoint.MANIFEST_FILE).read_text())
    assert manifest["step"] == 5
    assert set(manifest["files"]) == {checkpoint.MODEL_STATES_FILE, "rng_rank0.pt"}
    assert manifest["files"]["rng_rank0.pt"]["bytes"] == 3
    assert checkpoint.verify(tag_dir) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_latest_falls_back_to_the_previous_checkpoint(tmp_path, damage, caplog):
    fake_checkpoint(tmp_path, 4)
    latest = fake_checkpoint(tmp_path, 6)
    states = latest / checkpoint.MODEL_STATES_FILE
    if damage == "flip":
        states.write_bytes(b"X" + states.read_bytes()[1:])
    elif damage == "truncate":
        states.write_bytes(states.read_bytes()[:3])
    elif damage == "delete":
        states.unlink()
    else:
        (latest / checkpoint.MANIFEST_FILE).write_text("{not json")
    assert checkpoint.verify(latest) is not None
    with caplog.at_level(logging.WARNING, logger="tada_dist"):
        assert checkpoint.find_resumable(tmp_path).name == "step00000004"
    assert "step00000006 is unusable" in caplog.text


def test_no_usable_checkpoint_gives_none_and_eval_names_the_folder(tmp_path):
    assert checkpoint.find_resumable(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no usable checkpoint in .*checkpoints"):
        checkpoint.load_module_weights(tmp_path)


def test_partial_saves_and_checkpoints_newer_than_latest_are_never_loaded(tmp_path):
    fake_checkpoint(tmp_path, 2)
    ckpt_dir = checkpoint.checkpoint_dir(tmp_path)
    (ckpt_dir / ".partial-step00000003").mkdir()  # a save killed half-way
    stale = fake_checkpoint(tmp_path, 9)  # from an earlier run that this one replaced...
    checkpoint._write_atomically(ckpt_dir / checkpoint.LATEST_FILE, "step00000002")  # ...which points back
    assert checkpoint.complete_tags(ckpt_dir) == ["step00000009", "step00000002"]
    assert checkpoint.find_resumable(tmp_path).name == "step00000002"
    assert stale.exists()


def test_prune_keeps_the_newest_and_the_one_latest_points_at(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    ckpt_dir = checkpoint.checkpoint_dir(tmp_path)
    assert checkpoint.prune(ckpt_dir, keep=2) == ["step00000002", "step00000001"]
    assert checkpoint.complete_tags(ckpt_dir) == ["step00000004", "step00000003"]
    checkpoint._write_atomically(ckpt_dir / checkpoint.LATEST_FILE, "step00000003")
    fake_checkpoint(tmp_path, 5)
    checkpoint._write_atomically(ckpt_dir / checkpoint.LATEST_FILE, "step00000003")
    assert checkpoint.prune(ckpt_dir, keep=1) == ["step00000004"]


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "latest"
    checkpoint._write_atomically(target, "step00000001")
    checkpoint._write_atomically(target, "step00000002")
    assert target.read_text() == "step00000002"
    assert os.listdir(tmp_path) == ["latest"]


@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.9, 5e-4, True), (0.0, 0.0, False)])
def test_frozen_optimizer_step_changes_nothing_and_restores_the_settings(momentum, weight_decay, nesterov):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov)
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()  # momentum buffers exist from here on
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [optimizer.state[p].get("momentum_buffer") for p in model.parameters()]
    buffers = [None if b is None else b.clone() for b in buffers]

    optimizer.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()  # real, non-zero gradients
    with frozen_optimizer(optimizer):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for parameter, saved in zip(model.parameters(), buffers):
        current = optimizer.state[parameter].get("momentum_buffer")
        assert (current is None and saved is None) or torch.equal(current, saved)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (momentum, weight_decay)


def test_zero_gradient_loss_gives_exact_zero_gradients_even_for_inf_weights():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    zero_gradient_loss(model).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_stop_request_records_sigterm_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_stop_request_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_manifest_records_the_run_and_old_manifests_read_as_empty(tmp_path):
    tag_dir = tmp_path / "step00000002"
    tag_dir.mkdir()
    (tag_dir / "weights.pt").write_bytes(b"w")
    checkpoint._write_manifest(tag_dir, 2, {"world_size": 2, "method": "tada"})
    manifest = checkpoint.read_manifest(tag_dir)
    assert manifest["step"] == 2 and manifest["run"] == {"world_size": 2, "method": "tada"}
    assert checkpoint.verify(tag_dir) is None
    (tag_dir / checkpoint.MANIFEST_FILE).write_text(json.dumps({"step": 2, "files": {}}))
    assert checkpoint.read_manifest(tag_dir)["run"] == {}
