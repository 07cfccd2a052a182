"""Sampler-state checkpoint: two alternating slots, ``checkpoint/state_0`` and ``checkpoint/state_1``."""

from __future__ import annotations

import h5py
import numpy as np

from ._h5 import _decode, _set_attr
from .meta import EnsembleError

CHECKPOINT_GROUP = "checkpoint"
_SLOTS = ("state_0", "state_1")
_STATE_CHUNK = 64 * 1024


def _ensure_checkpoint(f: h5py.File) -> None:
    """Create the checkpoint group and its two slots where missing (new files, foreign files)."""
    g = f.require_group(CHECKPOINT_GROUP)
    if "current" not in g.attrs:
        g.attrs.create("current", np.int64(-1))
    if "description" not in g.attrs:
        g.attrs["description"] = (
            "sampler state (opaque bytes) saved with each commit, alternating between two slots; "
            "the current slot is the one whose n_committed equals the root n_committed; nbytes -1: no state"
        )
    for name in _SLOTS:
        if name in g:
            ds = g[name]
            if not isinstance(ds, h5py.Dataset) or ds.dtype != np.uint8 or ds.ndim != 1 or ds.maxshape[0] is not None:
                raise EnsembleError(f"{f.filename}: {CHECKPOINT_GROUP}/{name} is not a resizable uint8 dataset")
            continue
        ds = g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(_STATE_CHUNK,))
        ds.attrs.create("n_committed", np.int64(-1))
        ds.attrs.create("nbytes", np.int64(-1))


def _write_state(ds: h5py.Dataset, state: bytes | bytearray | memoryview | None, n_new: int) -> None:
    if state is None:
        _set_attr(ds, "nbytes", np.int64(-1))
    else:
        blob = np.frombuffer(bytes(state), dtype=np.uint8)
        if blob.size > ds.shape[0]:
            ds.resize(max(blob.size, 2 * ds.shape[0]), axis=0)  # grow only: nothing is freed
        if blob.size:
            ds[: blob.size] = blob
        _set_attr(ds, "nbytes", np.int64(blob.size))
    _set_attr(ds, "n_committed", np.int64(n_new))


def _read_state(f: h5py.File, n: int) -> tuple[bytes | None, int]:
    """(blob, slot) of the checkpoint slot that belongs to commit ``n``; (None, -1) if none does."""
    grp = f.get(CHECKPOINT_GROUP)
    if not isinstance(grp, h5py.Group) or n <= 0:
        return None, -1
    hint = _decode(grp.attrs.get("current", -1))
    order = [hint] + [i for i in (0, 1) if i != hint] if hint in (0, 1) else [0, 1]
    for i in order:
        ds = grp.get(_SLOTS[i])
        if not isinstance(ds, h5py.Dataset):
            continue
        if _decode(ds.attrs.get("n_committed", -1)) != n:
            continue
        nbytes = int(_decode(ds.attrs.get("nbytes", -1)))
        if nbytes < 0:
            return None, i
        if nbytes > ds.shape[0]:
            raise EnsembleError(f"{f.filename}: {CHECKPOINT_GROUP}/{_SLOTS[i]} is shorter than its nbytes")
        return (ds[:nbytes].tobytes() if nbytes else b""), i
    return None, -1
