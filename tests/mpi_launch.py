"""What the ``mpiexec`` tests share: the rank count, the environment, a checked launch and the ranks' PIDs.

Imported by the test modules (``from mpi_launch import ...``, like ``conftest``); not a test module itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np

NP = 2
TIMEOUT = 240  # seconds per launcher call: a hung rank fails the test instead of blocking it


def env() -> dict[str, str]:
    """The test process's environment with one OpenMP thread per rank and unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def mpirun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``mpiexec -n NP args...`` in ``cwd``; fails the test (with the output) on a non-zero exit status."""
    proc = subprocess.run(
        [shutil.which("mpiexec"), "-n", str(NP), *args], cwd=cwd, env=env(), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process in ``/proc``."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    """PIDs of the launcher's descendants that run ``latflow`` (its ranks; the launcher's proxies do not)."""
    tree, found, todo = _children(), [], [launcher.pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            try:
                cmdline = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"latflow") for part in cmdline[:2]):
                found.append(child)
    return found


ROW_GROUPS = ("fields", "markov", "weights", "observables")


def committed_rows(path: Path) -> dict[str, np.ndarray]:
    """Every per-row dataset of an ensemble, rows ``[0, n_committed)``."""
    out = {}
    with h5py.File(path, "r") as f:
        n = int(f.attrs["n_committed"])
        for group in ROW_GROUPS:
            for name, ds in f[group].items() if group in f else ():
                out[f"{group}/{name}"] = ds[:n]
    return out


def assert_same_ensembles(a: Path, b: Path, field: str) -> None:
    """``a`` and ``b`` hold the same committed rows, dtype for dtype and bit for bit, and the same sha256 of
    ``fields/<field>``."""
    ra, rb = committed_rows(a), committed_rows(b)
    assert ra.keys() == rb.keys()
    for key in rb:
        assert ra[key].dtype == rb[key].dtype, key
        np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)
    with h5py.File(a, "r") as f1, h5py.File(b, "r") as f2:
        assert f1[f"fields/{field}"].attrs["sha256"] == f2[f"fields/{field}"].attrs["sha256"]
