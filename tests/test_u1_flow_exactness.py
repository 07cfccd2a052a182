"""Flow-MCMC with gauge-equivariant flows reproduces the exact 2D U(1) torus values.

Three couplings (beta = 1, 2, 3) on two volumes (4x4 and a rectangular 8x4 torus). The flows
(16 spline couplings) were trained by ``tests/data/train_u1_test_flows.py`` and are stored
beside it: flow-MCMC is exact for any flow, and training them here would cost minutes. Each
chain's errors come from the Gamma method (tau_int included); every z-score must lie within
3 sigma of the exact plaquette and <Q^2> of :mod:`latflow.theories.u1`. (HMC is checked at
beta = 1, 3, 6 in ``test_u1.py``; flows trained for minutes on a CPU reach too low an acceptance
at beta = 6 for a test of seconds, see BENCHMARKS.md.)
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from latflow.analysis import gamma_method
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import FlowMCMC
from latflow.theories.u1 import U1GaugeAction, U1Params, exact_plaquette, exact_q2

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("train_u1_test_flows", DATA / "train_u1_test_flows.py")
flows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flows)

N_STEPS = 20_000


@functools.lru_cache(maxsize=1)
def run_chain(shape: tuple[int, int], beta: float, seed: int) -> tuple[dict[str, np.ndarray], float]:
    model = flows.build(shape)  # float64
    model.load_state_dict(torch.load(flows.flow_path(shape, beta), weights_only=True))
    theory = U1GaugeAction(U1Params(beta), Lattice(shape))
    sampler = FlowMCMC(model, lambda x: -theory.action(x), batch_size=1000, generator=make_generator(seed))
    sampler.run(1000)  # the first proposal is always accepted: discard a block
    block = sampler.run(N_STEPS)
    obs = theory.observables(block.x)
    return {k: v.numpy() for k, v in obs.items()}, float(block.accepted.double().mean())


@pytest.mark.parametrize("shape", flows.SHAPES)
@pytest.mark.parametrize("beta", flows.BETAS)
def test_flow_mcmc_reproduces_exact_plaquette_and_q2(shape: tuple[int, int], beta: float) -> None:
    obs, acceptance = run_chain(shape, beta, seed=int(10 * beta) + shape[0])
    assert acceptance > 0.05, acceptance  # a flow this poor would make the check toothless
    z = {}
    for name, exact in (("plaquette", exact_plaquette(beta, shape)), ("topological_charge_sq", exact_q2(beta, shape))):
        res = gamma_method(obs[name])
        z[name] = (res.mean - exact) / res.err
    q = gamma_method(obs["topological_charge"], known_mean=0.0)
    z["topological_charge"] = q.mean / q.err
    assert all(abs(v) < 3 for v in z.values()), (z, acceptance)


def test_flow_mcmc_check_has_power() -> None:
    """The same chain excludes a plaquette 2% away from the exact one (beta = 3, 8x4)."""
    obs, _ = run_chain((8, 4), 3.0, seed=38)  # the chain of the parametrised test (cached)
    res = gamma_method(obs["plaquette"])
    exact = exact_plaquette(3.0, (8, 4))
    assert abs(res.mean - exact) < 3 * res.err
    assert abs(res.mean - 1.02 * exact) > 3 * res.err, (res.mean, res.err)
