"""Where a run's files go by default, and where the generated dataset lives. No torch: configs resolve these."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_root() -> Path:
    """The generated default dataset's folder: $TADA_DIST_CACHE, else ~/.cache/tada-dist/synthetic."""
    return Path(os.environ.get("TADA_DIST_CACHE", Path.home() / ".cache" / "tada-dist" / "synthetic")).absolute()


def is_generated_data_root(root: str | Path) -> bool:
    """Whether `root` is the generated dataset's folder (written on first use), not a user's dataset."""
    return Path(root).absolute() == default_data_root()


def task_name(source: str, target: str) -> str:
    """<source>_to_<target> from the domains' names (image-list files by their stem)."""
    return f"{Path(source).stem}_to_{Path(target).stem}"


def default_output_dir(source: str, target: str, method: str, seed: int, world_size: int) -> Path:
    """runs/<source>_to_<target>/<method>-seed<seed>, with -<N>proc appended for N > 1 processes.

    The process count is part of the name because a checkpoint resumes only with the world size it
    was saved with: a one-process run and a two-process run of the same config must not share a folder.
    """
    name = f"{method}-seed{seed}" + (f"-{world_size}proc" if world_size > 1 else "")
    return Path("runs") / task_name(source, target) / name
