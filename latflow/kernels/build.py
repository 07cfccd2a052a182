"""Compile the C++ kernels of this package at first use and load them with ctypes.

Each kernel is one source file ``latflow/kernels/<name>.cpp`` of plain ``extern "C"`` functions on raw
pointers (no torch or Python headers). :func:`load` compiles it with the system C++ compiler into a
per-user cache,

    ``${LATFLOW_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/latflow}/kernels/``

under a file name keyed by a hash of the source, the flags, the compiler's ``--version`` and the machine,
and loads it with :class:`ctypes.CDLL`. The compiler is ``$CXX``, else ``c++``, else ``g++``; the flags are
``-O3 -march=native -fPIC -shared -std=c++17 -fopenmp``, dropping ``-march=native`` and then ``-fopenmp``
if the compiler refuses them. A build writes a temporary file in the cache directory and renames it into
place, so several processes (MPI ranks) may build the same kernel at once. Results are memoised per
process.

``LATFLOW_KERNELS=off`` in the environment disables every compiled kernel. A failed build warns once per
kernel (naming the compiler error's first line) and returns ``None``: callers fall back to torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["BASE_FLAGS", "available", "cache_dir", "kernel_names", "load", "status"]

SOURCE_DIR = Path(__file__).resolve().parent
BASE_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c++17", "-fopenmp")
# flags dropped in this order when the compiler refuses them
OPTIONAL_FLAGS: tuple[str, ...] = ("-march=native", "-fopenmp")

_memo: dict[str, ctypes.CDLL | None] = {}
_status: dict[str, str] = {}


def kernels_disabled() -> bool:
    """True when ``LATFLOW_KERNELS`` is ``off`` (also ``0``, ``false``, ``no``)."""
    return os.environ.get("LATFLOW_KERNELS", "").strip().lower() in {"off", "0", "false", "no"}


def cache_dir() -> Path:
    """The directory compiled kernels are cached in (not created here)."""
    root = os.environ.get("LATFLOW_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "latflow")
    return Path(root) / "kernels"


def kernel_names() -> list[str]:
    """Names of the kernel sources shipped with the package (``<name>.cpp``), sorted."""
    return sorted(p.stem for p in SOURCE_DIR.glob("*.cpp"))


def _compiler() -> str | None:
    """The compiler command: ``$CXX`` if set (even if missing), else ``c++`` or ``g++`` on the PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for cand in ("c++", "g++"):
        if shutil.which(cand):
            return cand
    return None


def _compiler_version(cxx: str) -> str:
    res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise OSError(_first_line(res.stderr) or f"{cxx} --version failed")
    return res.stdout


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    return _first_line(text)


def _compile(cxx: str, flags: list[str], src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=600)


def _machine_id() -> str:
    """Architecture plus CPU model and feature flags (``-march=native`` code is only valid on the same CPU)."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key in {"model name", "flags", "Features", "CPU part"}:
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first processor is enough
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _cache_key(source: bytes, version: str) -> str:
    key = hashlib.sha256()
    for part in (source, " ".join(BASE_FLAGS).encode(), version.encode(), _machine_id().encode()):
        key.update(part)
        key.update(b"\0")
    return key.hexdigest()[:20]


def _compile_with_fallback(cxx: str, src: Path, out: Path) -> list[str]:
    """Compile ``src`` to ``out`` with :data:`BASE_FLAGS`, dropping refused optional flags; return the flags."""
    flags = list(BASE_FLAGS)
    res = _compile(cxx, flags, src, out)
    for opt in OPTIONAL_FLAGS:
        if res.returncode == 0:
            break
        flags.remove(opt)
        res = _compile(cxx, flags, src, out)
    if res.returncode != 0:
        raise OSError(f"{cxx} failed on {src.name}: {_first_error_line(res.stderr + res.stdout)}")
    return flags


def _build(name: str) -> tuple[ctypes.CDLL, str]:
    """Compile (or find cached) and load kernel ``name``; raise ``OSError`` with a one-line reason."""
    src = SOURCE_DIR / f"{name}.cpp"
    if not src.is_file():
        raise OSError(f"no kernel source {src.name} in latflow/kernels (known: {', '.join(kernel_names())})")
    cxx = _compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set CXX, or install c++/g++)")
    try:
        version = _compiler_version(cxx)
    except (OSError, subprocess.SubprocessError) as exc:
        raise OSError(f"compiler {cxx!r} not usable: {exc}") from None
    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    target = cdir / f"{name}-{_cache_key(src.read_bytes(), version)}.so"
    if target.exists():
        return ctypes.CDLL(str(target)), f"cached ({target})"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=cdir)
    os.close(fd)
    try:
        flags = _compile_with_fallback(cxx, src, Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ctypes.CDLL(str(target)), f"built ({target}; {' '.join(flags)})"


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``latflow/kernels/<name>.cpp``, or ``None`` if unavailable.

    Parameters
    ----------
    name : str
        Kernel name, the stem of its source file.

    Returns
    -------
    ctypes.CDLL or None
        The loaded library; ``None`` when ``LATFLOW_KERNELS=off`` or the build failed (then one warning
        per process and kernel names the reason). Memoised per process.
    """
    if kernels_disabled():
        _status[name] = "unavailable (LATFLOW_KERNELS=off)"
        return None
    if name in _memo:
        return _memo[name]
    try:
        lib, how = _build(name)
    except (OSError, subprocess.SubprocessError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"latflow kernel {name!r} unavailable, using torch: {reason}", RuntimeWarning, stacklevel=2)
        _memo[name] = None
        _status[name] = f"unavailable ({reason})"
        return None
    _memo[name] = lib
    _status[name] = how
    return lib


def available(name: str) -> bool:
    """Whether kernel ``name`` can be loaded (builds it on first call)."""
    return load(name) is not None


def status(name: str) -> str:
    """One-word-plus-detail status of kernel ``name`` after :func:`load`: built / cached / unavailable (why)."""
    return _status.get(name, "not loaded")


def clear_memo() -> None:
    """Forget loaded kernels in this process (tests; the next :func:`load` rebuilds or reloads)."""
    _memo.clear()
    _status.clear()
