"""Compiled CPU kernels (C++ compiled at first use, loaded with ctypes); torch stays the fallback.

See :mod:`latflow.kernels.build`. ``LATFLOW_KERNELS=off`` disables them all.
"""

from latflow.kernels.build import available, cache_dir, kernel_names, load

__all__ = ["available", "cache_dir", "kernel_names", "load"]
