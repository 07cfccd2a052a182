"""Atomic checkpoints: write to a temporary file in the same folder, then rename.

Checkpoints hold tensors, numbers, strings and nested containers only, and are
loaded with ``weights_only=True`` (no arbitrary objects are unpickled).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Save ``obj`` to ``path`` so that a reader sees either the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)
