"""Cost of the Schwinger model's per-configuration observables: exact dense against stochastic (CG).

For L x L lattices at beta = 2, kappa = 0.24 (configurations from short pure-gauge HMC chains), in one
process on one torch thread:

- dense: ``SchwingerModel.observables`` with exact dense linear algebra (LU of the ``2V x 2V`` Wilson
  matrix for ``log det`` and the inverse's trace), time per configuration;
- stochastic: the same with the Z2-noise condensate (``n_noise`` vectors, CG on ``D^dag D`` to a relative
  residual of 1e-8), time per configuration;
- the standard deviation of the stochastic condensate around the exact one per configuration (the
  noise it adds), next to the spread of the exact condensate over the configurations (the signal).

The default ``dense_max_volume`` (100) is where the two costs cross.

Usage::

    python benchmarks/schwinger_observables.py            # L = 4 ... 16, ~1 minute
    python benchmarks/schwinger_observables.py --quick    # L = 4, 6; seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from latflow.lattice import Lattice
from latflow.samplers import HMC
from latflow.theories.schwinger import SchwingerModel, SchwingerParams


def configurations(shape: tuple[int, int], n: int, seed: int) -> torch.Tensor:
    """``n`` configurations ``[n, 2, *shape]`` from 20 pure-gauge HMC trajectories at beta = 2."""
    pure = SchwingerModel(SchwingerParams(2.0, 0.0), Lattice(shape))
    g = torch.Generator().manual_seed(seed)
    x0 = 0.1 * torch.randn((n, 2, *shape), generator=g, dtype=torch.float64)
    hmc = HMC(pure.gauge_action, x0, step_size=0.2, n_steps=5, generator=g, force=pure.gauge_force)
    hmc.run(20)
    return hmc.x


def per_config_ms(fn, x: torch.Tensor) -> float:
    t = time.perf_counter()
    fn(x)
    return 1e3 * (time.perf_counter() - t) / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-noise", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = (4, 6) if args.quick else (4, 6, 8, 10, 12, 16)
    print(f"| L | V | dense ms/config | stochastic ({args.n_noise} Z2) ms/config | noise sd | signal sd |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        lat = Lattice((n, n))
        params = SchwingerParams(2.0, 0.24)
        dense = SchwingerModel(params, lat, dense_max_volume=n * n)
        noisy = SchwingerModel(params, lat, dense_max_volume=0, n_noise=args.n_noise)
        x = configurations((n, n), 16, seed=n)
        t_dense = per_config_ms(dense.observables, x)
        t_noisy = per_config_ms(noisy.observables, x)
        exact = dense.chiral_condensate(x)
        noise = (noisy.observables(x)["chiral_condensate"] - exact).std()
        print(f"| {n} | {n * n} | {t_dense:.2f} | {t_noisy:.2f} | {float(noise):.4f} | {float(exact.std()):.4f} |")


if __name__ == "__main__":
    main()
