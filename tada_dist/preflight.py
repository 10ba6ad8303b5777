"""Checks that run before anything heavy starts, for the mistakes that no restart can fix.

Each failure is a one-line ConfigError naming the path, URI or setting and the ways out. None of
these checks imports torch: `tada-train` runs them before it loads DeepSpeed, decodes a single image
or builds a model, and every rank of a job reaches the same verdict from the same files.

- the output folder must be writable (and the sqlite tracking store beside it);
- an MLflow tracking server must answer within a few seconds;
- a checkpoint already in the output folder must belong to this run: same world size, method, data
  and model settings, and no more steps done than train.steps asks for.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tada_dist import checkpoint
from tada_dist.config import Config, ConfigError, flatten, to_dict
from tada_dist.tracking import resolve_tracking_uri

# A tracking server that has not answered by then is treated as unreachable.
TRACKING_PROBE_SECONDS = 5.0

# The settings a checkpoint is tied to: the model's shape (method, model.*, the crop that fixes K and
# the flattened width), the data it counts positions in, and how DeepSpeed laid out its optimizer state.
RESUME_KEYS = ("method", "data.root", "data.source", "data.target", "data.crop", "data.source_holdout",
               "distributed.zero_stage",
               "distributed.precision")


def run_record(config: Config, world_size: int) -> dict[str, Any]:
    """What a checkpoint remembers of its run, to refuse a resume that cannot work."""
    values = flatten(to_dict(config))
    record = {key: values[key] for key in values if key in RESUME_KEYS or key.startswith("model.")}
    return {"world_size": world_size, **record}


def check_output_dir(output_dir: Path) -> None:
    """Write a file in the folder, or in the nearest of its parents that exists, or fail naming the
    folder. Nothing is created for the test: every rank of a job runs this check at the same moment,
    and a folder one of them made and removed again could vanish under another's probe."""
    existing = next(folder for folder in (output_dir, *output_dir.parents) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir} is not writable ({existing} is a file, not a folder); "
                          "choose another with output_dir=...")
    probe = existing / f".write-test-{uuid.uuid4().hex}"  # unique across the nodes of a shared file system
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"output_dir {output_dir} is not writable ({error.strerror or error}); choose another with output_dir=..."
        ) from None


def check_tracking(config: Config) -> None:
    """The tracking store must take writes: a sqlite file in a writable folder, or a server that answers."""
    if not config.tracking.enabled:
        return
    uri = resolve_tracking_uri(config.tracking.uri, Path(config.output_dir))
    way_out = "or train without tracking: tracking.enabled=false"
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        writable = os.access(database, os.W_OK) if database.exists() else _creatable(database.parent)
        if not writable:
            raise ConfigError(f"MLflow store {database} is not writable; set tracking.uri to a writable "
                              f"sqlite:///PATH, {way_out}")
    elif uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=TRACKING_PROBE_SECONDS) as response:
                response.read(16)
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(f"MLflow tracking server {uri} did not answer within {TRACKING_PROBE_SECONDS:.0f} s "
                              f"({reason}); start it, {way_out}") from None


def _creatable(folder: Path) -> bool:
    """Whether `folder` exists and is writable, or could be created under its nearest existing parent."""
    while not folder.exists():
        if folder.parent == folder:
            return False
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def check_resume(config: Config, world_size: int) -> int | None:
    """The step the run will resume from, or None when it starts afresh. Fails when the newest
    checkpoint in output_dir belongs to another run or has done more steps than train.steps."""
    output_dir = Path(config.output_dir)
    ckpt_dir = checkpoint.checkpoint_dir(output_dir)
    tag = checkpoint.read_latest(ckpt_dir) if config.checkpoint.resume else None
    if tag is None or not (ckpt_dir / tag / checkpoint.MANIFEST_FILE).is_file():
        return None
    try:
        manifest = checkpoint.read_manifest(ckpt_dir / tag)
    except (OSError, ValueError):
        return None  # an unreadable manifest: checkpoint.find_resumable falls back past it with a warning
    ways_out = ("train elsewhere with output_dir=..., or start over in this folder with checkpoint.resume=false")
    saved, now = dict(manifest["run"]), run_record(config, world_size)
    for record in (saved, now):  # the same images reached through another symlink are the same run
        if isinstance(record.get("data.root"), str):
            record["data.root"] = os.path.realpath(record["data.root"])
    differences = [f"{key} {saved[key]!r} there, {now.get(key)!r} now"
                   for key in sorted(saved) if saved[key] != now.get(key)]
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ConfigError(f"{output_dir} holds a checkpoint (step {manifest['step']}) of a different run: {shown}; "
                          f"{ways_out}")
    if manifest["step"] > config.train.steps:
        raise ConfigError(f"{output_dir} holds a checkpoint at step {manifest['step']}, beyond "
                          f"train.steps={config.train.steps}; raise train.steps to continue it, or {ways_out}")
    return manifest["step"]


def check_before_training(config: Config, world_size: int) -> int | None:
    """Every check above, in order; returns the step a resume will start from (None: a fresh start)."""
    check_output_dir(Path(config.output_dir))
    check_tracking(config)
    return check_resume(config, world_size)
