"""Checkpoints that survive crashes: written under a temporary name, verified on load, pruned to the last N.

    checkpoints/
      step00000400/           complete: DeepSpeed's files, rng_rank<r>.pt per rank, manifest.json
      step00000500/
      latest                  "step00000500", replaced atomically after the rename
      .partial-step00000600/  a save in progress, or one a crash interrupted: never loaded, removed later

DeepSpeed writes the module, optimizer, LR scheduler and our client state (step, data positions,
MLflow run id); each rank adds its own random generators. Once every rank has written, rank 0 records
the size and SHA-256 of every file in manifest.json, renames the folder to its step tag and only then
points `latest` at it. A process killed at any moment therefore leaves either the previous complete
checkpoint or the new one, never half of one. On load, a checkpoint whose files no longer match its
manifest is skipped with a warning for the newest older one that does.

The manifest also records the run the checkpoint belongs to (world size, method, the data and model
settings), so that a resume which cannot work is refused before anything is loaded (see
tada_dist.preflight).

The checkpoint folder must be visible to every rank (a shared file system on several nodes), as
DeepSpeed's own resume requires. torch is imported only by the functions that save and load, so the
checks that read manifests run without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tada_dist.distributed import DistInfo

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
LATEST_FILE = "latest"  # DeepSpeed's name, so its own tools (zero_to_fp32.py) find our checkpoints
MANIFEST_FILE = "manifest.json"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's: module weights and client state
PARTIAL_PREFIX = ".partial-"
_TAG_PATTERN = re.compile(r"step(\d{8})")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_SUBDIR


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


def capture_rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- saving ---------------------------------------------------------------------------------------


def save(engine, output_dir: str | Path, step: int, client_state: dict[str, Any], dist_info: DistInfo,
         *, keep: int = 0, run: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it at the same step. Returns the complete checkpoint's folder.

    keep > 0 removes all but the newest `keep` complete checkpoints afterwards. `run` describes the
    run (see preflight.run_record) and goes into the manifest."""
    import torch

    from tada_dist.distributed import barrier

    ckpt_dir = checkpoint_dir(output_dir)
    tag = step_tag(step)
    partial = PARTIAL_PREFIX + tag
    if dist_info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_partial_saves(ckpt_dir)  # what an earlier crash left behind
    barrier()

    engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
    torch.save(capture_rng_state(), _rng_file(ckpt_dir / partial, dist_info.rank))
    barrier()  # every rank's files are on disk

    final = ckpt_dir / tag
    if dist_info.is_main:
        _write_manifest(ckpt_dir / partial, step, run or {})
        if final.exists():  # the same step saved again (a resumed run's last step): replace it
            shutil.rmtree(final)
        os.replace(ckpt_dir / partial, final)
        _write_atomically(ckpt_dir / LATEST_FILE, tag)
        if keep > 0:
            prune(ckpt_dir, keep)
    barrier()
    return final


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints; `latest`'s target is always kept."""
    pointed = read_latest(ckpt_dir)
    tags = complete_tags(ckpt_dir)
    removed = [tag for tag in tags[keep:] if tag != pointed]
    for tag in removed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return removed


def _remove_partial_saves(ckpt_dir: Path) -> None:
    for leftover in ckpt_dir.glob(PARTIAL_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _write_manifest(tag_dir: Path, step: int, run: dict[str, Any]) -> None:
    paths = [path for path in sorted(tag_dir.rglob("*")) if path.is_file()]
    # The other ranks wait at a barrier while rank 0 hashes: hash the files side by side (hashlib
    # releases the GIL on large blocks), as many at once as there are cores to read them with.
    workers = max(1, min(len(paths), len(os.sched_getaffinity(0)), 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(_sha256, paths))
    files = {
        str(path.relative_to(tag_dir)): {"bytes": path.stat().st_size, "sha256": digest}
        for path, digest in zip(paths, digests)
    }
    _write_atomically(tag_dir / MANIFEST_FILE, json.dumps({"step": step, "run": run, "files": files}, indent=1))


def read_manifest(tag_dir: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint: {"step", "run", "files"} ("run" is {} in older ones)."""
    manifest = json.loads((tag_dir / MANIFEST_FILE).read_text())
    manifest.setdefault("run", {})
    return manifest


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary name, flush it to disk, then rename: readers see the old or the new file."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -- finding and verifying ------------------------------------------------------------------------


def latest_step(output_dir: str | Path) -> int:
    """The step `latest` points at; 0 before the first checkpoint."""
    tag = read_latest(checkpoint_dir(output_dir))
    return int(_TAG_PATTERN.fullmatch(tag).group(1)) if tag else 0


def read_latest(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if _TAG_PATTERN.fullmatch(tag) else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the folders that finished saving (renamed, with a manifest), newest step first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [path.name for path in ckpt_dir.iterdir()
            if _TAG_PATTERN.fullmatch(path.name) and (path / MANIFEST_FILE).is_file()]
    return sorted(tags, reverse=True)


def verify(tag_dir: Path) -> str | None:
    """Why the checkpoint in `tag_dir` is unusable, or None when every file matches its manifest."""
    try:
        manifest = json.loads((tag_dir / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST_FILE} ({err})"
    for name, expected in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def find_resumable(output_dir: str | Path) -> Path | None:
    """The newest verified checkpoint: `latest`'s target, else the newest older one that verifies.

    Each one skipped is named in a warning with the reason. Checkpoints newer than `latest` are not
    considered: they belong to an earlier run in the same folder that this one has replaced."""
    ckpt_dir = checkpoint_dir(output_dir)
    tags = complete_tags(ckpt_dir)
    pointed = read_latest(ckpt_dir)
    if pointed is not None:
        tags = [pointed] + [tag for tag in tags if tag < pointed]
    for tag in tags:
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return ckpt_dir / tag
        log.warning("checkpoint %s is unusable: %s; trying the previous one", ckpt_dir / tag, problem)
    return None


# -- loading --------------------------------------------------------------------------------------


def load_latest(engine, output_dir: str | Path, dist_info: DistInfo) -> dict[str, Any] | None:
    """Restore engine and RNG state from the newest usable checkpoint; None when there is none.

    Rank 0 picks and verifies it and tells the others, so every rank loads the same one."""
    import torch

    from tada_dist.distributed import broadcast_object

    chosen = find_resumable(output_dir) if dist_info.is_main else None
    chosen = broadcast_object(None if chosen is None else chosen.name)
    if chosen is None:
        return None
    ckpt_dir = checkpoint_dir(output_dir)
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=chosen)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / chosen}")
    rng_file = _rng_file(ckpt_dir / chosen, dist_info.rank)
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def load_module_weights(output_dir: str | Path) -> tuple[dict[str, Any], int]:
    """The model weights of the newest usable checkpoint (for evaluation, without a DeepSpeed engine)."""
    tag_dir = find_resumable(output_dir)
    if tag_dir is None:
        raise FileNotFoundError(
            f"no usable checkpoint in {checkpoint_dir(output_dir)} (expected step<N>/ folders with a {MANIFEST_FILE})"
        )
    return module_weights(tag_dir)


def module_weights(tag_dir: Path) -> tuple[dict[str, Any], int]:
    """(fp32 model weights, step) of one checkpoint folder."""
    import torch

    states = torch.load(tag_dir / MODEL_STATES_FILE, map_location="cpu", weights_only=False)
    weights = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in states["module"].items()}
    return weights, int(states.get("step", 0))


# -- the trainer's checkpointing --------------------------------------------------------------------


class Checkpointer:
    """When and how the trainer saves: every `every` steps and at the last step (and whenever the trainer
    must stop), never twice for one step, and never weights that hold NaN/inf (the newest checkpoint
    then stays the last good one)."""

    def __init__(self, output_dir: str | Path, *, every: int, keep: int, total_steps: int, dist_info: DistInfo,
                 run: dict[str, Any]):
        self.output_dir = Path(output_dir)
        self.every = every
        self.keep = keep
        self.total_steps = total_steps
        self.dist_info = dist_info
        self.run = run
        self.saved_step: int | None = None

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.total_steps

    def resume(self, engine) -> dict[str, Any] | None:
        """Load the newest usable checkpoint into `engine`; its client state, or None without one."""
        state = load_latest(engine, self.output_dir, self.dist_info)
        if state is not None:
            self.saved_step = int(state["step"])
        return state

    def save(self, engine, model, step: int, client_state: dict[str, Any]) -> bool:
        """Collective. Whether a checkpoint of `step` exists afterwards."""
        import torch

        from tada_dist.distributed import any_rank, average_batchnorm_statistics

        if self.saved_step == step:
            return True
        weights_finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
        if any_rank([not bool(weights_finite)], self.dist_info.device)[0]:
            log.warning("step %d: not saving a checkpoint: the weights hold NaN/inf", step)
            return False
        average_batchnorm_statistics(model)
        save(engine, self.output_dir, step, client_state, self.dist_info, keep=self.keep, run=self.run)
        self.saved_step = step
        return True

    def last_good(self) -> Path | None:
        """The checkpoint `latest` points at, if any."""
        tag = read_latest(checkpoint_dir(self.output_dir))
        return checkpoint_dir(self.output_dir) / tag if tag else None
