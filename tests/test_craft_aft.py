"""AFT and CRAFT: transport flows between annealing temperatures, against exact values and HMC.

Statistical tests (seeded through ``stat_seed``, ``|z| < 3`` from the spread over independent populations; 32 of
them, so that the jackknife error over runs is itself accurate to ~13% and the z-scores are close to normal):
a Gaussian-to-Gaussian anneal (exact log Z) for AFT and for CRAFT before and after training; CRAFT with
gauge-equivariant transport flows on 2D U(1) (exact log Z and plaquette); CRAFT on interacting phi^4 against an
HMC chain run in the test. Deterministic: untrained (identity) flows reproduce SMC bit for bit, CRAFT's state
round trip continues training identically, and training raises the ESS.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from conftest import stat_seed
from test_annealing import check, gen, z_score_log_z

from latflow.analysis import gamma_method
from latflow.analysis.weighted import weighted_estimate
from latflow.gauge import UniformU1Prior, u1_plaquette_angles
from latflow.lattice import Lattice
from latflow.manifolds import U1Angles
from latflow.priors import NormalPrior
from latflow.samplers import HMC
from latflow.samplers.annealing import SMC, AnnealResult, GeometricPath, HMCKernel, StepSize
from latflow.samplers.annealing.aft import AFT
from latflow.samplers.annealing.craft import CRAFT
from latflow.samplers.annealing.transport import affine_transport, u1_equivariant_transport
from latflow.theories.phi4 import Phi4Params, Phi4Theory
from latflow.theories.u1 import U1GaugeAction, U1Params, exact_log_z, exact_plaquette

LAT = Lattice((4, 4))


def pooled(result: AnnealResult, values: torch.Tensor) -> tuple[float, float]:
    """The weighted ensemble's estimate of ``<values>`` ``[P * N]`` over all populations (runs combined by their
    ``Z``, consistent as runs are added at fixed ``N``; the per-population self-normalised means share an
    ``O(1/N)`` bias that averaging does not remove) and its delete-one-run jackknife error."""
    p, n = result.log_w.shape
    chain = torch.arange(p).repeat_interleave(n).numpy()
    mean, err, _ = weighted_estimate(
        values.double().numpy(), chain, result.log_w.reshape(-1).numpy(), result.log_z.numpy()
    )
    return mean, err


def z_pooled(result: AnnealResult, values: torch.Tensor, exact: float) -> float:
    mean, err = pooled(result, values)
    return (mean - exact) / err


MU, SIGMA = 1.0, 0.6


def gaussian_path() -> GeometricPath:
    """N(0, 1) on a 4x4 lattice to the unnormalised N(MU, SIGMA^2); exact log Z = (V/2) log(2 pi SIGMA^2)."""

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return -((x - MU) ** 2).flatten(1).sum(1) / (2 * SIGMA**2)

    def force(x: torch.Tensor) -> torch.Tensor:
        return (x - MU) / SIGMA**2

    return GeometricPath(NormalPrior(LAT.shape), log_p, force)


GAUSS_LOG_Z = 0.5 * LAT.volume * math.log(2 * math.pi * SIGMA**2)


def craft(path: GeometricPath, k: int = 4, lr: float = 3e-3) -> CRAFT:
    torch.manual_seed(0)
    flows = [affine_transport(LAT, 2, (8,)) for _ in range(k)]
    return CRAFT(path, HMCKernel(0.2, 4, step_jitter=0.2), k, flows, lr=lr)


def test_identity_transport_is_smc_bit_for_bit() -> None:
    """Untrained flows start as the identity: CRAFT's frozen run and AFT without optimisation steps reproduce
    SMC's particles, weights and log Z exactly."""
    path = gaussian_path()
    ref = SMC(path, HMCKernel(0.2, 4, step_jitter=0.2), 4, resample_threshold=0.3).run(32, gen(1), n_populations=3)
    c = craft(path).run(32, gen(1), n_populations=3)
    for a, b in ((ref.x, c.x), (ref.log_w, c.log_w), (ref.log_z, c.log_z)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # AFT anneals one training population beside the reported ones: SMC with 4 populations, the first 3 reported
    ref4 = SMC(path, HMCKernel(0.2, 4, step_jitter=0.2), 4, resample_threshold=0.3).run(32, gen(1), n_populations=4)
    aft = AFT(path, HMCKernel(0.2, 4, step_jitter=0.2), 4, lambda: affine_transport(LAT, 2, (8,)), n_opt_steps=0)
    a = aft.run(32, gen(1), n_populations=3)
    for u, v in ((ref4.x[:96], a.x), (ref4.log_w[:3], a.log_w), (ref4.log_z[:3], a.log_z)):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def test_craft_state_round_trip_continues_identically() -> None:
    path = gaussian_path()
    a, b = craft(path), craft(path)
    g = gen(2)
    a.train(3, 32, g)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # torch state dicts share tensors with their owner
    ga, gb = gen(3), gen(3)
    ra, rb = a.train_iteration(32, ga), b.train_iteration(32, gb)
    torch.testing.assert_close(ra.log_z, rb.log_z, rtol=0, atol=0)
    for pa, pb in zip(a.flows.parameters(), b.flows.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert a.iteration == 4


@pytest.mark.statistical
def test_craft_gaussian_log_z_during_and_after_training(record_z: Callable[..., None]) -> None:
    """Every CRAFT iteration's log Z is unbiased (particles move with the parameters from before each update), and
    so are the frozen flows' runs; training makes the final ESS larger than SMC's with the same kernel."""
    path = gaussian_path()
    c = craft(path)
    g = gen(stat_seed(811))
    during = torch.stack([c.train_iteration(64, g, n_populations=4).log_z for _ in range(40)]).reshape(-1)
    check(record_z, "log_z_training", z_score_log_z(during[-80:], GAUSS_LOG_Z))
    after = c.run(128, g, n_populations=32)
    check(record_z, "log_z_frozen", z_score_log_z(after.log_z, GAUSS_LOG_Z))
    x = after.x.flatten(1)
    check(record_z, "mean_x", z_pooled(after, x.mean(1), MU))
    check(record_z, "mean_x2", z_pooled(after, (x**2).mean(1), MU**2 + SIGMA**2))
    smc = SMC(path, HMCKernel(0.2, 4, step_jitter=0.2), 4, resample_threshold=0.3).run(128, g, n_populations=32)
    ess_craft = float(torch.stack(after.ess).mean())
    ess_smc = float(torch.stack(smc.ess).mean())
    assert ess_craft > ess_smc + 0.1, (ess_craft, ess_smc)
    assert float(after.log_z.std()) < float(smc.log_z.std()), (after.log_z.std(), smc.log_z.std())


@pytest.mark.statistical
def test_aft_gaussian_log_z(record_z: Callable[..., None]) -> None:
    path = gaussian_path()
    torch.manual_seed(0)
    aft = AFT(path, HMCKernel(0.2, 4, step_jitter=0.2), 4, lambda: affine_transport(LAT, 2, (8,)), n_opt_steps=15,
              lr=1e-2)  # fmt: skip
    r = aft.run(64, gen(stat_seed(812)), n_populations=32)
    check(record_z, "log_z", z_score_log_z(r.log_z, GAUSS_LOG_Z))
    check(record_z, "mean_x", z_pooled(r, r.x.flatten(1).mean(1), MU))
    assert len(r.extra["loss"]) == 4 and all(math.isfinite(v) for v in r.extra["loss"])


@pytest.mark.statistical
def test_craft_u1_with_equivariant_transport(record_z: Callable[..., None]) -> None:
    """CRAFT from the Haar measure to 2D U(1) at beta = 1.5 (geometric path, gauge-equivariant transport flows):
    log Z in the Lebesgue measure of the angles against the exact torus value, and the plaquette."""
    lat = Lattice((4, 4))
    theory = U1GaugeAction(U1Params(1.5), lat)
    path = GeometricPath(UniformU1Prior(lat), lambda x: -theory.action(x), theory.force)
    torch.manual_seed(0)
    k = 3
    flows = [u1_equivariant_transport(lat, 2, (4,), inner="spline", n_bins=4) for _ in range(k)]
    c = CRAFT(path, HMCKernel(0.3, 4, manifold=U1Angles(), step_jitter=0.2), k, flows, lr=5e-3)
    g = gen(stat_seed(813))
    c.train(10, 64, g, n_populations=2)
    r = c.run(64, g, n_populations=16)
    exact = exact_log_z(1.5, (4, 4)) + theory.field_log_volume()
    check(record_z, "log_z", z_score_log_z(r.log_z, exact))
    plaq = torch.cos(u1_plaquette_angles(r.x)).flatten(1).mean(1)
    check(record_z, "plaquette", z_pooled(r, plaq, exact_plaquette(1.5, (4, 4))))


@pytest.mark.statistical
def test_craft_interacting_phi4_agrees_with_hmc(record_z: Callable[..., None]) -> None:
    """CRAFT on interacting phi^4 (4x4, m2 = -2, lam = 3) against an HMC chain run here: <M^2 V> (chi_2),
    the Ising energy and <phi^2>, z-scores with both errors (Gamma method for HMC, spread over runs for CRAFT)."""
    theory = Phi4Theory(Phi4Params(-2.0, 3.0), LAT)
    seed = stat_seed(814)
    hmc = HMC(theory.action, 0.1 * torch.randn(64, 4, 4, generator=gen(seed), dtype=torch.float64),
              step_size=0.1, n_steps=10, generator=gen(seed + 1), integrator="omelyan", force=theory.force,
              step_jitter=0.2)  # fmt: skip
    hmc.run(100)
    block = hmc.run(300)
    obs_hmc = theory.observables(block.x)
    path = GeometricPath(NormalPrior(LAT.shape), lambda x: -theory.action(x), theory.force)
    torch.manual_seed(0)
    k = 5
    flows = [affine_transport(LAT, 2, (8,)) for _ in range(k)]
    kernel = HMCKernel(StepSize([0.3, 0.15, 0.1]), 5, 2, step_jitter=0.2)
    c = CRAFT(path, kernel, k, flows, lr=3e-3)
    g = gen(seed + 2)
    c.train(20, 64, g)
    r = c.run(128, g, n_populations=32)
    obs = theory.observables(r.x)
    for name in ("chi2", "ising_energy", "phi2"):
        series = obs_hmc[name].reshape(300, 64).T.numpy()
        ref = gamma_method([s for s in series])
        mean, err = pooled(r, obs[name])
        check(record_z, name, (mean - ref.mean) / math.hypot(err, ref.err))


@pytest.mark.statistical
def test_craft_su3_with_spectral_transport(record_z: Callable[..., None]) -> None:
    """CRAFT from Haar links to 2D SU(3) at beta = 2 (4x4) with gauge-equivariant spectral transport flows: the
    transported links stay in SU(3), log Z (Haar probability measure) and the plaquette match the exact values."""
    from latflow.flows.sun_layers import SUNHaarPrior
    from latflow.manifolds import SUN
    from latflow.samplers.annealing.transport import sun_spectral_transport
    from latflow.theories.su3 import SUNGaugeAction, SUNParams

    lat = Lattice((4, 4))
    theory = SUNGaugeAction(SUNParams(2.0, 3), lat)
    path = GeometricPath(SUNHaarPrior(lat, 3), lambda x: -theory.action(x))
    torch.manual_seed(0)
    flows = [sun_spectral_transport(lat, 3, 2, (4,), n_bins=4) for _ in range(3)]
    c = CRAFT(path, HMCKernel(0.3, 3, manifold=SUN(3), step_jitter=0.2), 3, flows, lr=5e-3)
    g = gen(stat_seed(815))
    c.train(5, 32, g)
    r = c.run(32, g, n_populations=32)
    eye = torch.eye(3, dtype=r.x.dtype)
    assert float((r.x @ r.x.conj().transpose(-1, -2) - eye).abs().max()) < 1e-12
    assert float((torch.linalg.det(r.x) - 1).abs().max()) < 1e-12
    check(record_z, "log_z", z_score_log_z(r.log_z, theory.exact_log_z()))
    plaq = theory.observables(r.x)["plaquette"]
    check(record_z, "plaquette", z_pooled(r, plaq, theory.exact_means()["plaquette"]))
