"""HMC on the SU(3) group manifold reproduces the exact 2D torus plaquette (character expansion).

The theory supplies everything HMC needs (``manifold = SUN(3)``, ``initial_field``); the chains are batched and
the errors come from the Gamma method over the chains as replicas. Reversibility and ``dH ~ eps^2`` of the SU(N)
integrators are tested in tests/test_manifolds.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.analysis.gamma import gamma_method
from latflow.lattice import Lattice
from latflow.manifolds import SUN
from latflow.samplers import HMC
from latflow.theories.su3 import SUNGaugeAction, SUNParams, exact_plaquette

# (beta, lattice shape): weak to strong coupling on two volumes; the plaquette goes from ~0.16 to ~0.62
POINTS = [(2.0, (4, 4)), (4.0, (4, 4)), (8.0, (4, 4)), (2.0, (8, 8)), (4.0, (8, 8)), (8.0, (8, 8))]
N_TUNE, N_BURN = 30, 20
RUNS = {4: (16, 100), 8: (8, 60)}  # L -> (chains, measured trajectories): about the same cost on both volumes


def _hmc_plaquette(beta: float, shape: tuple[int, int], seed: int, start: str) -> tuple[np.ndarray, HMC]:
    """Plaquette series ``[chains, trajectories]`` of tuned, thermalised SU(3) HMC chains (Omelyan, length 1)."""
    theory = SUNGaugeAction(SUNParams(beta, 3), Lattice(shape))
    gen = torch.Generator().manual_seed(seed)
    n_chains, n_meas = RUNS[shape[0]]
    hmc = HMC(
        theory.action,
        theory.initial_field(n_chains, gen, start),
        step_size=0.25,
        n_steps=4,
        generator=gen,
        integrator="omelyan",
        step_jitter=0.2,
        manifold=theory.manifold,
    )
    hmc.tune(N_TUNE, 0.85)
    hmc.run(N_BURN)
    block = hmc.run(n_meas)
    plaq = theory.observables(block.x)["plaquette"].numpy()
    return plaq.reshape(n_meas, n_chains).T, hmc  # rows are trajectory-major


@pytest.mark.statistical
@pytest.mark.parametrize(("beta", "shape"), POINTS, ids=[f"beta{b:g}-{s[0]}x{s[1]}" for b, s in POINTS])
def test_su3_hmc_reproduces_the_exact_torus_plaquette(beta: float, shape: tuple[int, int], record_z) -> None:
    """<Re tr P / 3> of 8-16 batched chains against :func:`exact_plaquette` within |z| < 3 (Gamma-method error).

    Hot starts at strong coupling, cold starts at weak coupling: both thermalise within the tuning and
    burn-in trajectories (the plaquette decorrelates in ~1 trajectory in 2D).
    """
    torch.set_num_threads(1)
    seed = stat_seed(1000 + int(10 * beta) + shape[0])
    series, hmc = _hmc_plaquette(beta, shape, seed, "hot" if beta < 5 else "cold")
    exact = exact_plaquette(beta, 3, shape)
    res = gamma_method(series)
    z = (res.mean - exact) / res.err
    record_z("plaquette", z)
    assert abs(z) < 3, (res.mean, res.err, exact, z)
    assert res.err < 0.01  # a real test: the error is small against the spread of the values over beta
    # the chains moved and stayed on SU(3)
    acc = float(torch.as_tensor(hmc.run(5).accepted, dtype=torch.float64).mean())
    assert acc > 0.5, acc
    eye = torch.eye(3, dtype=hmc.x.dtype)
    assert (hmc.x @ hmc.x.mH - eye).abs().max() < 1e-12
    assert (torch.linalg.det(hmc.x) - 1).abs().max() < 1e-12


def test_theory_declares_manifold_start_and_exact_means() -> None:
    """The contract the runner relies on: ``manifold``, ``initial_field`` (cold/hot, precision) and the exact
    2D plaquette among ``exact_means``."""
    theory = SUNGaugeAction(SUNParams(4.0, 3), Lattice((4, 6)))
    assert isinstance(theory.manifold, SUN) and theory.manifold.n == 3
    gen = torch.Generator().manual_seed(0)
    cold = theory.initial_field(2, gen, "cold")
    assert cold.shape == (2, 2, 4, 6, 3, 3) and cold.dtype == torch.complex128
    assert torch.equal(cold, torch.eye(3, dtype=torch.complex128).expand_as(cold))
    assert torch.equal(theory.initial_field(2, gen, "default"), cold)
    state = gen.get_state()
    hot = theory.initial_field(3, gen, "hot", dtype=torch.float32)
    assert hot.dtype == torch.complex64 and hot.shape == (3, 2, 4, 6, 3, 3)
    assert not torch.equal(gen.get_state(), state)
    assert abs(theory.observables(hot.to(torch.complex128))["plaquette"]).max() < 0.5
    with pytest.raises(ValueError, match="start"):
        theory.initial_field(1, gen, "warm")
    means = theory.exact_means()
    assert means["plaquette"] == pytest.approx(exact_plaquette(4.0, 3, (4, 6)), rel=1e-14)
    assert means["polyakov_loop"] == 0.0
    four = SUNGaugeAction(SUNParams(6.0, 3), Lattice((2, 2, 2, 2))).exact_means()
    assert "plaquette" not in four and four["topological_charge"] == 0.0
    assert math.isfinite(means["wilson_loop_1x1"])
