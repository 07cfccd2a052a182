"""Flow-MCMC with gauge-equivariant flows reproduces the exact 2D U(1) torus values.

Three couplings (beta = 1, 2, 3) on two volumes (4x4 and a rectangular 8x4 torus). The flows
(16 spline couplings) were trained by ``tests/data/train_u1_test_flows.py`` and are stored
beside it: flow-MCMC is exact for any flow, and training them here would cost minutes.

An independence Metropolis chain with a low acceptance (0.1 at beta = 3 on 8x4) has long
autocorrelations and heavy-tailed importance weights, and a single chain started from a flow
proposal is neither in equilibrium nor analysable with a trustworthy Gamma window. So each test
runs ``N_CHAINS`` chains, each started from an exact independent sample of the torus
(:func:`latflow.theories.u1.sample_exact_2d`), so that every chain is in equilibrium from its first
step; each chain mean is then an independent unbiased estimate and the errors come from the spread
of the chain means. Every z-score must lie within 3 sigma of the exact plaquette, ``<Q^2>`` and
``<Q> = 0`` of :mod:`latflow.theories.u1`. (HMC is checked at beta = 1, 3, 6 in ``test_u1.py``;
flows trained for minutes on a CPU reach too low an acceptance at beta = 6 for a test of seconds,
see BENCHMARKS.md.)
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stat_seed
from test_plaquette_prior import flow_chains_from_exact_starts

from latflow.theories.u1 import exact_plaquette, exact_q2

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("train_u1_test_flows", DATA / "train_u1_test_flows.py")
flows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flows)

N_CHAINS, N_STEPS = 32, 625  # 20000 proposals per test


@functools.lru_cache(maxsize=1)
def run_chains(shape: tuple[int, int], beta: float, seed: int) -> tuple[dict[str, np.ndarray], float]:
    """``N_CHAINS`` flow-MCMC chains of ``N_STEPS`` steps from exact starts.

    Returns the observables ``[N_CHAINS, N_STEPS]`` and the acceptance.
    """
    model = flows.build(shape)  # float64
    model.load_state_dict(torch.load(flows.flow_path(shape, beta), weights_only=True))
    return flow_chains_from_exact_starts(model, beta, shape, seed, N_CHAINS, N_STEPS, batch_size=N_STEPS)


def chain_mean_z(values: np.ndarray, exact: float) -> tuple[float, float]:
    """z-score of the mean of independent chain means ``values`` ``[chains, steps]``, and its error."""
    means = values.mean(axis=1)
    err = means.std(ddof=1) / math.sqrt(means.size)
    return (means.mean() - exact) / err, err


@pytest.mark.statistical
@pytest.mark.parametrize("shape", flows.SHAPES)
@pytest.mark.parametrize("beta", flows.BETAS)
def test_flow_mcmc_reproduces_exact_plaquette_and_q2(shape: tuple[int, int], beta: float, record_z) -> None:
    obs, acceptance = run_chains(shape, beta, stat_seed(int(10 * beta) + shape[0]))
    assert acceptance > 0.05, acceptance  # a flow this poor would make the check toothless
    z = {}
    for name, exact in (
        ("plaquette", exact_plaquette(beta, shape)),
        ("topological_charge_sq", exact_q2(beta, shape)),
        ("topological_charge", 0.0),
    ):
        z[name], _ = chain_mean_z(obs[name], exact)
        record_z(name, z[name])
    assert all(abs(v) < 3 for v in z.values()), (z, acceptance)


def test_flow_mcmc_check_has_power() -> None:
    """The chains of beta = 3, 8x4 resolve the plaquette to better than 2/3 %: 3 sigma excludes 2%."""
    beta, shape = 3.0, (8, 4)
    obs, _ = run_chains(shape, beta, stat_seed(38))  # the chains of the parametrised test (cached)
    exact = exact_plaquette(beta, shape)
    _, err = chain_mean_z(obs["plaquette"], exact)
    assert 3 * err < 0.02 * exact, (err, exact)
