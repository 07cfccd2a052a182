"""Annealing samplers (latflow.samplers.annealing): unit checks of the shared core and seeded physics tests.

Unit (deterministic): systematic resampling (ancestor counts within floor/ceil of ``N W_i``), weights with
non-finite entries, ESS and conditional ESS against their direct formulas, fixed schedules, time-dependent step
sizes, independence of batched populations, adaptive schedules reaching ``t = 1``, argument checks.

Statistical (seeded through ``stat_seed``, z-scores at ``|z| < 3`` from the spread over ``P`` independent
populations): multinomial resampling counts (chi2), a Gaussian-to-Gaussian anneal (SMC with HMC and random-walk
kernels, AIS, an adaptive schedule), the free phi^4 field, 2D U(1) and 2D SU(3) annealed in beta from the Haar
measure, and the L = 4 Schwinger model annealed in kappa from the exactly sampled pure gauge theory.

Each population's ``exp(log Z_p)`` is an unbiased estimate of ``Z``, so ``log Z_p`` is biased low by
``Var(log Z) / 2``; the z-scores of ``log Z`` correct for it (:func:`z_score_log_z`). Over seed offsets 0..9 the
largest |z| of any check was 2.7; the whole file takes 15-30 s on one thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import stat_seed
from scipy import stats

from latflow.flows.sun_layers import SUNHaarPrior
from latflow.gauge import u1_plaquette_angles
from latflow.lattice import Lattice
from latflow.manifolds import SUN, U1Angles
from latflow.priors import NormalPrior
from latflow.samplers.annealing import (
    AIS,
    SMC,
    AdaptiveSchedule,
    AnnealResult,
    CouplingPath,
    GeometricPath,
    HMCKernel,
    RandomWalkMetropolis,
    StepSize,
    ancestor_index,
    conditional_ess_fraction,
    ess_fraction,
    fixed_schedule,
    multinomial,
    normalise_log_weights,
    reweight,
    systematic,
)
from latflow.theories import su3 as su3_theory
from latflow.theories.phi4 import Phi4Params, Phi4Theory, free_chi2, free_ising_energy, free_log_z, free_phi2
from latflow.theories.schwinger import SchwingerModel, SchwingerParams
from latflow.theories.u1 import U1GaugeAction, U1Params, exact_log_z, exact_plaquette, exact_q2, sample_exact_2d

F64 = torch.float64
Z_BOUND = 3.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weighted_means(result: AnnealResult, values: torch.Tensor) -> torch.Tensor:
    """Self-normalised estimate ``sum_i W_i f_i`` per population ``[P]`` of per-particle values ``[P * N]``."""
    return (torch.exp(result.log_w) * values.reshape(result.log_w.shape).to(F64)).sum(dim=1)


def z_score(estimates: torch.Tensor, exact: float) -> float:
    """``(mean - exact) / err`` of ``P`` independent estimates ``[P]``, ``err`` from their spread."""
    p = estimates.shape[0]
    err = float(estimates.std()) / math.sqrt(p)
    return (float(estimates.mean()) - exact) / err


def z_score_log_z(log_z: torch.Tensor, exact_log_z: float) -> float:
    """z-score of ``P`` independent estimates ``log_z`` ``[P]`` of ``log Z`` against the exact value.

    ``exp(log_z)`` is unbiased for ``Z``, so ``log_z`` is biased low by ``Var(log_z) / 2`` (to leading order in
    ``1/N``: the SMC central limit theorem makes ``log_z`` Gaussian). The estimate ``mean + var / 2`` removes that
    bias; its error adds the spread of the sample variance, ``var / sqrt(2 (P - 1))``, to ``std / sqrt(P)``.
    (The mean of the ratios ``exp(log_z - exact)`` is unbiased too, but its skewed spread makes its t-statistic
    fall below -3 far more often than a Gaussian's.)
    """
    p = log_z.shape[0]
    var = float(log_z.var())
    estimate = float(log_z.mean()) + 0.5 * var
    err = math.sqrt(var / p + 0.5 * var**2 / (p - 1))
    return (estimate - exact_log_z) / err


def check(record_z: Callable[..., None], name: str, z: float) -> None:
    record_z(name, z, Z_BOUND)
    assert abs(z) < Z_BOUND, f"{name}: z = {z:.2f}"


# --- unit: core functions ---------------------------------------------------------------------------------------


def test_systematic_counts_are_floor_or_ceil_of_n_w() -> None:
    n = 40
    g = gen(11)
    log_w = 2.0 * torch.randn(3, n, generator=g, dtype=F64)
    log_w[0, 5] = -math.inf
    log_w[2] = 0.0  # uniform: every particle exactly once
    w = torch.exp(normalise_log_weights(log_w))
    for seed in range(20):
        anc = systematic(log_w, gen(seed))
        assert anc.shape == (3, n) and anc.dtype == torch.long
        assert bool((anc[:, 1:] >= anc[:, :-1]).all()), "systematic ancestors come out sorted"
        for p in range(3):
            counts = torch.bincount(anc[p], minlength=n).to(F64)
            assert bool((counts >= torch.floor(n * w[p] - 1e-9)).all()), (seed, p)
            assert bool((counts <= torch.ceil(n * w[p] + 1e-9)).all()), (seed, p)
        assert int((anc[0] == 5).sum()) == 0, "a zero-weight particle must never be an ancestor"
        assert torch.equal(anc[2], torch.arange(n))


@pytest.mark.statistical
def test_multinomial_counts_chi2() -> None:
    """Ancestor counts of multinomial resampling, summed over populations, against ``Multinomial(P N, W)``."""
    n, p = 10, 4000
    w_a = torch.arange(1, n + 1, dtype=F64)
    w_b = torch.tensor([5.0, 0.5, 0.5, 3.0, 1.0, 0.2, 2.0, 0.0, 1.0, 4.0], dtype=F64)
    log_w = torch.stack([torch.log(w_a), torch.log(w_b)]).repeat(p // 2, 1)  # populations alternate a, b
    anc = multinomial(log_w, gen(stat_seed(101)))
    assert anc.shape == (p, n)
    for row, w in ((0, w_a), (1, w_b)):
        counts = torch.bincount(anc[row::2].reshape(-1), minlength=n).double().numpy()
        expected = (p // 2) * n * (w / w.sum()).numpy()
        assert counts[expected == 0].sum() == 0, "a zero-weight particle must never be an ancestor"
        keep = expected > 0
        chi2 = stats.chisquare(counts[keep], expected[keep])
        assert chi2.pvalue > 1e-3, (row, counts, expected, chi2)


def test_normalise_log_weights_with_nonfinite_entries() -> None:
    log_w = torch.tensor(
        [
            [0.0, -math.inf, math.nan, math.log(3.0)],
            [-math.inf, -math.inf, math.nan, -math.inf],
            [1000.0, 1000.0, 1000.0 + math.log(2.0), math.inf],
        ],
        dtype=F64,
    )
    w = torch.exp(normalise_log_weights(log_w))
    torch.testing.assert_close(w[0], torch.tensor([0.25, 0.0, 0.0, 0.75], dtype=F64))
    torch.testing.assert_close(w[1], torch.full((4,), 0.25, dtype=F64))  # no finite weight: uniform
    torch.testing.assert_close(w[2], torch.tensor([0.25, 0.25, 0.5, 0.0], dtype=F64))  # +inf is not finite either
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=F64))
    # a step whose increments are all -inf makes that population's log Z ratio -inf, not nan
    _, log_ratio = reweight(torch.zeros(2, 3, dtype=F64), torch.tensor([[0.0, 0.0, 0.0], [-math.inf] * 3], dtype=F64))
    assert log_ratio[1] == -math.inf and math.isfinite(float(log_ratio[0]))


def test_ess_and_conditional_ess_against_direct_formulas() -> None:
    g = gen(12)
    n = 50
    log_w = 1.5 * torch.randn(3, n, generator=g, dtype=F64) + 300.0  # far from 1: must be handled in log space
    inc = 0.7 * torch.randn(3, n, generator=g, dtype=F64) - 200.0
    w = torch.exp(log_w - log_w.max(dim=1, keepdim=True).values)
    big_w = w / w.sum(1, keepdim=True)
    v = torch.exp(inc + 200.0)
    ess = w.sum(1) ** 2 / (n * (w * w).sum(1))
    cess = (big_w * v).sum(1) ** 2 / (big_w * v * v).sum(1)
    torch.testing.assert_close(ess_fraction(log_w), ess)
    torch.testing.assert_close(conditional_ess_fraction(log_w, inc), cess)
    new, log_ratio = reweight(log_w, inc)
    torch.testing.assert_close(log_ratio, torch.log((big_w * v).sum(1)) - 200.0)
    torch.testing.assert_close(torch.exp(new), big_w * v / (big_w * v).sum(1, keepdim=True))
    # limits: uniform weights have ESS 1, one surviving particle 1/N, a constant increment CESS 1
    torch.testing.assert_close(ess_fraction(torch.zeros(1, n, dtype=F64)), torch.ones(1, dtype=F64))
    single = torch.full((1, n), -math.inf, dtype=F64)
    single[0, 3] = 0.0
    torch.testing.assert_close(ess_fraction(single), torch.full((1,), 1.0 / n, dtype=F64))
    torch.testing.assert_close(conditional_ess_fraction(log_w, torch.full_like(inc, 4.0)), torch.ones(3, dtype=F64))


def test_fixed_schedule() -> None:
    assert fixed_schedule(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ts = fixed_schedule(5, power=2.0)
    np.testing.assert_allclose(ts, [(k / 5) ** 2 for k in range(6)], rtol=0, atol=1e-15)
    assert ts[0] == 0.0 and ts[-1] == 1.0 and all(b > a for a, b in zip(ts, ts[1:]))
    assert fixed_schedule(1) == [0.0, 1.0]
    assert fixed_schedule(3, power=0.5)[-1] == 1.0


def test_step_size_interpolation() -> None:
    assert StepSize(0.3)(0.0) == StepSize(0.3)(0.7) == 0.3
    s = StepSize([0.4, 0.2, 0.1])  # knots 0, 0.5, 1
    assert s.knots == (0.0, 0.5, 1.0)
    for t, expected in ((0.0, 0.4), (0.25, 0.3), (0.5, 0.2), (0.75, 0.15), (1.0, 0.1)):
        assert s(t) == pytest.approx(expected, abs=1e-14), t
    s = StepSize([1.0, 0.5, 0.1], knots=[0.0, 0.2, 1.0])
    assert s(0.1) == pytest.approx(0.75, abs=1e-14)
    assert s(0.6) == pytest.approx(0.3, abs=1e-14)
    assert StepSize([0.5, 0.1], knots=[0.2, 0.8])(0.0) == 0.5  # constant beyond the outer knots


def test_populations_never_copy_rows_of_another() -> None:
    p, n = 4, 16
    which = torch.tensor([True, False, True, True])
    ancestors = torch.randint(0, n, (p, n), generator=gen(13))
    rows = ancestor_index(which, ancestors)
    assert rows.shape == (p * n,)
    block = rows.view(p, n) // n
    assert torch.equal(block, torch.arange(p)[:, None].expand(p, n))
    assert torch.equal(rows.view(p, n)[1], torch.arange(n) + n)  # not resampled: identity

    # end to end: particle values carry their population (100 p + i); uneven weights, resampling at every step
    x0 = (100.0 * torch.arange(p, dtype=F64)[:, None] + torch.arange(n, dtype=F64)).reshape(p * n, 1)

    def log_density(x: torch.Tensor, t: float) -> torch.Tensor:
        return 3.0 * t * torch.remainder(x[:, 0], 100.0) / n

    path = CouplingPath(lambda m, g: torch.zeros(m, 1, dtype=F64), 0.0, log_density)
    for resampling in ("systematic", "multinomial"):
        res = SMC(path, None, 6, resample_threshold=1.0, resampling=resampling).run(n, gen(14), n_populations=p, x0=x0)
        pop = torch.div(res.x[:, 0], 100.0, rounding_mode="floor").view(p, n)
        assert torch.equal(pop, torch.arange(p, dtype=F64)[:, None].expand(p, n)), resampling
        assert bool((res.n_resampled() == 6).all())
        assert all(len(torch.unique(res.x.view(p, n)[k])) < n for k in range(p)), "resampling did nothing"


def test_adaptive_schedule_reaches_one() -> None:
    d = 3
    path = GeometricPath(NormalPrior((d,)), lambda x: -0.5 * ((x - 2.0) / 0.3).pow(2).sum(1))
    res = SMC(path, None, AdaptiveSchedule(0.8)).run(64, gen(15), n_populations=2)
    ts = res.ts
    assert ts[0] == 0.0 and ts[-1] == 1.0
    assert all(b > a for a, b in zip(ts, ts[1:]))
    assert len(ts) > 3, "the target is far from the prior: an adaptive schedule needs several steps"
    assert len(res.ess) == len(res.resampled) == len(res.acceptance) == len(ts) - 1
    assert res.x.shape == (128, d) and res.log_w.shape == (2, 64) and res.log_z.shape == (2,)


def test_bad_arguments_raise() -> None:
    path = GeometricPath(NormalPrior((2,)), lambda x: -x.pow(2).sum(1))
    bad: list[Callable[[], object]] = [
        lambda: fixed_schedule(0),
        lambda: fixed_schedule(3, power=0.0),
        lambda: AdaptiveSchedule(1.0),
        lambda: AdaptiveSchedule(0.0),
        lambda: StepSize(-0.1),
        lambda: StepSize([]),
        lambda: StepSize([0.1, 0.2], knots=[0.0]),
        lambda: StepSize([0.1, 0.2], knots=[0.5, 0.5]),
        lambda: HMCKernel(0.1, 0),
        lambda: HMCKernel(0.1, 2, n_trajectories=0),
        lambda: RandomWalkMetropolis(0.1, n_sweeps=0),
        lambda: SMC(path, None, [0.0, 0.5]),
        lambda: SMC(path, None, [0.0, 0.6, 0.4, 1.0]),
        lambda: SMC(path, None, [0.1, 1.0]),
        lambda: SMC(path, None, [1.0]),
        lambda: SMC(path, None, 4, resample_threshold=1.5),
        lambda: SMC(path, None, 4, resample_threshold=-0.1),
        lambda: SMC(path, None, 4, resampling="stratified-by-hand"),
        lambda: SMC(path, None, 4).run(0, gen(1)),
        lambda: SMC(path, None, 4).run(8, gen(1), n_populations=0),
        lambda: SMC(path, None, AdaptiveSchedule(0.9)).run(8, gen(1), transport=lambda k, x, lw: (x, x[:, 0] * 0)),
    ]
    for i, make in enumerate(bad):
        with pytest.raises(ValueError):
            make()
            pytest.fail(f"case {i} did not raise")


# --- statistical: Gaussian to Gaussian ---------------------------------------------------------------------------

GAUSS_D, GAUSS_MU, GAUSS_SIGMA = 6, 1.5, 0.6


def gaussian_path() -> GeometricPath:
    """From ``N(0, 1)^D`` to the unnormalised ``exp(-|x - mu|^2 / (2 sigma^2))``."""
    return GeometricPath(NormalPrior((GAUSS_D,)), lambda x: -0.5 * ((x - GAUSS_MU) / GAUSS_SIGMA).pow(2).sum(dim=1))


GAUSS_SAMPLERS: dict[str, Callable[[], SMC]] = {
    "smc-hmc": lambda: SMC(gaussian_path(), HMCKernel(StepSize([0.5, 0.3]), 4), 12),
    "smc-rwm": lambda: SMC(gaussian_path(), RandomWalkMetropolis(StepSize([0.9, 0.5]), n_sweeps=6), 20),
    "ais-hmc": lambda: AIS(gaussian_path(), HMCKernel(StepSize([0.5, 0.3]), 4), fixed_schedule(40)),
    "smc-adaptive": lambda: SMC(gaussian_path(), HMCKernel(StepSize([0.5, 0.3]), 4), AdaptiveSchedule(0.9)),
}


@pytest.mark.statistical
@pytest.mark.parametrize("kind", list(GAUSS_SAMPLERS))
def test_gaussian_anneal(kind: str, record_z: Callable[..., None]) -> None:
    """``log Z = (D/2) log(2 pi sigma^2)``, ``<x> = mu``, ``<x^2> = mu^2 + sigma^2`` (averaged over components)."""
    p, n = 32, 128
    base = {"smc-hmc": 201, "smc-rwm": 202, "ais-hmc": 203, "smc-adaptive": 204}[kind]
    res = GAUSS_SAMPLERS[kind]().run(n, gen(stat_seed(base)), n_populations=p)
    exact = 0.5 * GAUSS_D * math.log(2 * math.pi * GAUSS_SIGMA**2)
    assert float(res.log_z.std()) < 0.4, "the anneal should estimate log Z to a few tenths per population"
    if kind == "ais-hmc":
        assert not any(bool(r.any()) for r in res.resampled)
    else:
        assert int(res.n_resampled().sum()) > 0, "the test should exercise resampling"
    check(record_z, "log Z", z_score_log_z(res.log_z, exact))
    check(record_z, "<x>", z_score(weighted_means(res, res.x.mean(1)), GAUSS_MU))
    check(record_z, "<x^2>", z_score(weighted_means(res, res.x.pow(2).mean(1)), GAUSS_MU**2 + GAUSS_SIGMA**2))


# --- statistical: free phi^4 --------------------------------------------------------------------------------------


@pytest.mark.statistical
def test_free_phi4_smc(record_z: Callable[..., None]) -> None:
    """SMC from ``N(0, 1)`` per site to the free field (L = 4, m2 = 1): log Z, chi2, phi2, Ising energy exact."""
    shape, m2 = (4, 4), 1.0
    theory = Phi4Theory(Phi4Params(m2, 0.0), Lattice(shape))
    path = GeometricPath(NormalPrior(shape), lambda phi: -theory.action(phi))
    # one leapfrog step per trajectory: a longer fixed trajectory leaves the free modes with omega tau = k pi
    # (nearly) unchanged, and the duplicates that resampling makes of them never decorrelate
    smc = SMC(path, HMCKernel(StepSize([0.5, 0.25]), 1, 3), fixed_schedule(20))
    p, n = 32, 64
    res = smc.run(n, gen(stat_seed(301)), n_populations=p)
    assert float(res.log_z.std()) < 0.6, "the anneal should estimate log Z to a few tenths per population"
    check(record_z, "log Z", z_score_log_z(res.log_z, free_log_z(shape, m2)))
    obs = theory.observables(res.x)
    for name, exact in (
        ("chi2", free_chi2(shape, m2)),
        ("phi2", free_phi2(shape, m2)),
        ("ising_energy", free_ising_energy(shape, m2)),
    ):
        check(record_z, name, z_score(weighted_means(res, obs[name]), exact))


# --- statistical: 2D U(1) and SU(3), annealed in beta from the Haar measure ---------------------------------------


@pytest.mark.statistical
def test_u1_2d_anneal_in_beta(record_z: Callable[..., None]) -> None:
    """beta(t) = beta t from uniform angles (L = 6, beta = 2): log Z, plaquette and <Q^2> of the exact torus."""
    shape, beta = (6, 6), 2.0
    theory = U1GaugeAction(U1Params(beta), Lattice(shape))
    n_links = 2 * shape[0] * shape[1]

    def sum_cos(theta: torch.Tensor) -> torch.Tensor:
        return torch.cos(u1_plaquette_angles(theta)).flatten(1).sum(dim=1)

    path = CouplingPath(
        lambda m, g: (2 * torch.rand((m, 2, *shape), generator=g, dtype=F64) - 1) * math.pi,
        n_links * math.log(2 * math.pi),  # uniform angles: Lebesgue volume (2 pi)^n_links
        lambda theta, t: beta * t * sum_cos(theta),
        linear=lambda theta: (torch.zeros(theta.shape[0], dtype=F64), beta * sum_cos(theta)),
    )
    smc = SMC(path, HMCKernel(StepSize([0.5, 0.25]), 4, 2, manifold=U1Angles()), fixed_schedule(20))
    p, n = 32, 64
    res = smc.run(n, gen(stat_seed(401)), n_populations=p)
    assert float(res.x.abs().max()) <= math.pi
    assert float(res.log_z.std()) < 0.8, "the anneal should estimate log Z to a few tenths per population"
    log_z_haar = res.log_z - theory.field_log_volume()
    check(record_z, "log Z", z_score_log_z(log_z_haar, exact_log_z(beta, shape)))
    obs = theory.observables(res.x)
    check(record_z, "plaquette", z_score(weighted_means(res, obs["plaquette"]), exact_plaquette(beta, shape)))
    check(record_z, "Q^2", z_score(weighted_means(res, obs["topological_charge_sq"]), exact_q2(beta, shape)))


@pytest.mark.statistical
def test_su3_2d_anneal_in_beta(record_z: Callable[..., None]) -> None:
    """beta(t) = beta t from Haar SU(3) links (L = 2, beta = 4): log Z and plaquette of the exact 2D torus."""
    shape, beta, n_colours = (2, 2), 4.0, 3
    lattice = Lattice(shape)
    theory = su3_theory.SUNGaugeAction(su3_theory.SUNParams(beta, n_colours), lattice)
    prior = SUNHaarPrior(lattice, n_colours)

    def re_tr_sum(u: torch.Tensor) -> torch.Tensor:
        """``(1/N) sum_p Re tr P_p`` ``[B]`` (``-S / beta``)."""
        return -theory.action(u) / beta

    path = CouplingPath(
        lambda m, g: prior.sample(m, g)[0],
        0.0,  # Haar probability measure
        lambda u, t: beta * t * re_tr_sum(u),
        linear=lambda u: (torch.zeros(u.shape[0], dtype=F64), beta * re_tr_sum(u)),
    )
    smc = SMC(path, HMCKernel(0.3, 3, manifold=SUN(n_colours)), fixed_schedule(10))
    p, n = 32, 24
    res = smc.run(n, gen(stat_seed(501)), n_populations=p)
    assert float(res.log_z.std()) < 0.45, "the anneal should estimate log Z to a few tenths per population"
    check(record_z, "log Z", z_score_log_z(res.log_z, su3_theory.exact_log_z(beta, n_colours, shape)))
    plaq = theory.observables(res.x)["plaquette"]
    check(record_z, "plaquette", z_score(weighted_means(res, plaq), su3_theory.exact_plaquette(beta, n_colours, shape)))


# --- statistical: the Schwinger model, annealed in kappa from the exact pure gauge theory -----------------------

SCHWINGER_SHAPE, SCHWINGER_BETA, SCHWINGER_KAPPA = (4, 4), 2.0, 0.2
# <plaquette> at beta = 2, kappa = 0.2, L = 4 from HMC on the exact effective action (SchwingerModel.action and
# .force): 64 chains started from exact pure-gauge draws (seed 20261201), tau = 1 (5 leapfrog steps of 0.2, 20%
# step jitter, acceptance 0.92), 30 trajectories discarded, 600 measured per chain; mean and error from the Gamma
# method over the chains (tau_int = 2.7). Reweighted exact pure-gauge draws agree (0.7075(20) from 8000 draws).
SCHWINGER_HMC_PLAQUETTE = (0.71020, 0.00119)


@pytest.mark.statistical
def test_schwinger_anneal_in_kappa(record_z: Callable[..., None]) -> None:
    """kappa(t) = 0.2 t from exact pure-gauge draws (beta = 2, L = 4).

    ``Z(kappa) / Z(0)`` against ``E_0[det(D^dag D)]`` over exact pure-gauge draws (both means of unbiased
    estimates, compared linearly), and the plaquette against the same draws reweighted by ``det(D^dag D)`` and
    against a long HMC run (above).
    """
    shape, beta, kappa = SCHWINGER_SHAPE, SCHWINGER_BETA, SCHWINGER_KAPPA
    lattice = Lattice(shape)
    models: dict[float, SchwingerModel] = {}

    def model(k: float) -> SchwingerModel:
        if k not in models:
            models[k] = SchwingerModel(SchwingerParams(beta, k), lattice)
        return models[k]

    def log_density(theta: torch.Tensor, t: float) -> torch.Tensor:
        if t == 0.0:
            return -model(0.0).gauge_action(theta)  # D = 1
        return -model(kappa * t).action(theta)

    n_links = 2 * shape[0] * shape[1]
    log_z0 = exact_log_z(beta, shape) + n_links * math.log(2 * math.pi)  # Lebesgue measure on the angles
    path = CouplingPath(lambda m, g: sample_exact_2d(beta, shape, m, g), log_z0, log_density)
    smc = SMC(path, HMCKernel(0.25, 3, manifold=U1Angles()), fixed_schedule(4))
    g = gen(stat_seed(601))
    p, n = 32, 16
    res = smc.run(n, g, n_populations=p)
    ratio_smc = torch.exp(res.log_z - log_z0)  # [P] unbiased estimates of Z(kappa) / Z(0)

    # direct: Z(kappa) / Z(0) = E_0[det(D^dag D)] over exact pure-gauge draws; plaquette by reweighting
    m_direct = 4000
    theta0 = sample_exact_2d(beta, shape, m_direct, g)
    det = torch.exp(model(kappa).fermion_logdet(theta0))
    plaq0 = model(kappa).observables(theta0)["plaquette"]
    ratio_direct, ratio_direct_err = float(det.mean()), float(det.std()) / math.sqrt(m_direct)
    # ratio estimator sum(det plaq) / sum(det): error from its linearisation
    plaq_rw = float((det * plaq0).sum() / det.sum())
    plaq_rw_err = float(((det * (plaq0 - plaq_rw)).std() / det.mean()) / math.sqrt(m_direct))

    err = math.sqrt(float(ratio_smc.var()) / p + ratio_direct_err**2)
    check(record_z, "Z(kappa)/Z(0)", (float(ratio_smc.mean()) - ratio_direct) / err)

    plaq = weighted_means(res, model(kappa).observables(res.x)["plaquette"])
    plaq_err = float(plaq.std()) / math.sqrt(p)
    check(record_z, "plaquette vs reweighting", (float(plaq.mean()) - plaq_rw) / math.hypot(plaq_err, plaq_rw_err))
    ref, ref_err = SCHWINGER_HMC_PLAQUETTE
    check(record_z, "plaquette vs HMC", (float(plaq.mean()) - ref) / math.hypot(plaq_err, ref_err))
