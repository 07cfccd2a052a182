"""4D SU(3): flow-MCMC with spectral couplings agrees with HMC on a 4^4 lattice (slow: about two minutes).

The flow (Haar prior and four spectral couplings, briefly trained by reverse KL) is far from the target, but
independence Metropolis is exact for any flow, so its plaquette must agree with HMC's within errors. At
beta = 0.25 the Haar prior still overlaps the target (acceptance 10-20%), so a few thousand proposals suffice;
this exercises the 4D masks, the spectral map's log Jacobian and the sampler end to end. Errors: Gamma method
(HMC: the chains as replicas).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import stat_seed

from latflow.analysis.gamma import gamma_method
from latflow.flows.sun_layers import make_sun_spectral_flow
from latflow.lattice import Lattice
from latflow.samplers import HMC, FlowMCMC
from latflow.sun import plaquette_mean
from latflow.theories.su3 import SUNGaugeAction, SUNParams
from latflow.training import ReverseKLTrainer

BETA = 0.25


@pytest.mark.slow
@pytest.mark.statistical
def test_4d_su3_flow_mcmc_agrees_with_hmc():
    theory = SUNGaugeAction(SUNParams(BETA, 3), Lattice((4, 4, 4, 4)))
    seed = stat_seed(7400)
    torch.manual_seed(seed)

    def log_p(u: torch.Tensor) -> torch.Tensor:
        return -theory.action(u)

    model = make_sun_spectral_flow(theory.lattice, 3, 4, hidden=(4,), kernel_size=3, n_bins=4, zero_init=True)
    g = torch.Generator().manual_seed(seed + 1)
    # Adam's first steps move every weight by about lr: with 4D kernels (fan-in 81 c_in) lr >~ 1e-3 overshoots
    # and raises the KL; 2e-4 lowers it (measured 0.17 -> -0.13 nats in 20 steps)
    trainer = ReverseKLTrainer(model, log_p, batch_size=16, lr=2e-4, generator=g)
    for _ in range(20):
        trainer.train_step()
    chain = FlowMCMC(model, log_p, batch_size=256, generator=g)
    chain.run(256)
    block = chain.run(2048)
    acceptance = float(block.accepted.double().mean())
    assert acceptance > 0.03, acceptance  # a performance floor (10-20% measured), not a statistical bound
    flow = gamma_method(plaquette_mean(block.x).numpy())

    gh = torch.Generator().manual_seed(seed + 2)
    hmc = HMC(
        theory.action,
        theory.initial_field(8, gh, "hot"),
        step_size=0.5,
        n_steps=2,
        generator=gh,
        integrator="omelyan",
        step_jitter=0.1,
        manifold=theory.manifold,
    )
    hmc.run(20)
    x = hmc.run(60).x
    plaq = plaquette_mean(x).view(60, 8).T.numpy()  # [chains, trajectories]
    ref = gamma_method(list(plaq))
    z = (flow.mean - ref.mean) / math.hypot(flow.err, ref.err)
    assert abs(z) < 3, (flow.mean, flow.err, ref.mean, ref.err, acceptance)
