"""``python -m latflow.kernels``: build every kernel and print one line per kernel."""

from __future__ import annotations

import sys
import warnings

from latflow.kernels.build import kernel_names, load, status


def main() -> int:
    """Build (or load from the cache) every shipped kernel; print ``name: built|cached|unavailable (why)``."""
    names = kernel_names()
    if not names:
        print("no kernels shipped")
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load(name)
        print(f"{name}: {status(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
