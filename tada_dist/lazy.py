"""Packages that import their submodules on first use.

`tada_dist.data`, `tada_dist.model` and `tada_dist.config` are imported by commands that only read or
check a config (`tada-train --help`, `--list-keys`, `--print-config`); importing torch, torchvision or
DALI for those would cost seconds. The packages therefore re-export their public names lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `exports[name]` (a submodule) when `name` is read."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value  # later reads skip this function
        return value

    return __getattr__
