"""What every benchmark report ends with: the machine it was measured on and the command that produced it."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path


def machine_description() -> str:
    import torch

    accelerator = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {accelerator}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_report(path: str | Path, lines: list[str]) -> None:
    """Write a markdown report ending with the machine and the command that produced it; echo it."""
    lines = [*lines, f"Machine: {machine_description()}.", "", "Command:", "",
             "    python " + shlex.join(sys.argv), ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))
    print("\n".join(lines))
