"""Checkpoints through DeepSpeed's `save_checkpoint`/`load_checkpoint`, plus per-rank RNG state.

DeepSpeed saves the module, optimizer, LR scheduler and our client state (step, data positions,
MLflow run id), and points `latest` at the newest tag. Client state is written by rank 0 only, so
each rank's own random generators go into a small file of their own beside it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_SUBDIR


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, output_dir: str | Path, step: int, client_state: dict[str, Any], rank: int) -> Path:
    """Collective: every rank must call it at the same step."""
    ckpt_dir = checkpoint_dir(output_dir)
    tag = step_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    tag_dir = ckpt_dir / tag
    torch.save(capture_rng_state(), _rng_file(tag_dir, rank))
    return tag_dir


def latest_tag(output_dir: str | Path) -> str | None:
    pointer = checkpoint_dir(output_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def load_latest(engine, output_dir: str | Path, rank: int) -> dict[str, Any] | None:
    """Restore engine and RNG state from the newest checkpoint; None when there is none."""
    if latest_tag(output_dir) is None:
        return None
    load_path, client_state = engine.load_checkpoint(str(checkpoint_dir(output_dir)))
    if load_path is None:
        return None
    rng_file = _rng_file(Path(load_path), rank)
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def load_module_weights(output_dir: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """The model weights of the latest checkpoint (for evaluation, without a DeepSpeed engine)."""
    tag = latest_tag(output_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(output_dir)} (expected a 'latest' file)")
    states_file = checkpoint_dir(output_dir) / tag / "mp_rank_00_model_states.pt"
    if not states_file.is_file():
        raise FileNotFoundError(f"checkpoint {tag} is incomplete: missing {states_file}")
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    weights = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in states["module"].items()}
    return weights, int(states.get("step", 0))
