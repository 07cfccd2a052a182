"""Nested multi-time-scale integration and chronological force-solve guesses for PF-HMC.

- with one level the nested integrator is :meth:`HMC._integrate` bit for bit (leapfrog, Omelyan);
- nested leapfrog and Omelyan are reversible: forward, momentum flip, forward returns to the start to
  ~1e-12 with zero guesses, to ~the CG tolerance with chronological guesses;
- the energy violation falls as eps^2 (fitted slope in [1.7, 2.3]; Omelyan below leapfrog);
- PF-HMC on three time scales (gauge; Hasenbusch-mass factor; ratio factor) reproduces the
  exact-determinant plaquette on 4x4 (statistical, stat_seed);
- chronological guesses cut the CG iterations per trajectory;
- bad ``time_scales`` / ``chrono`` are refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stat_seed
from test_schwinger import (
    BETA,
    exact_observables,
    gen,
    haar,
    model,
    per_chain,
    z_of,
)

from latflow.analysis import gamma_method, gamma_method_derived
from latflow.samplers.integrators import integrate_nested, nested_schedule
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.theories.u1 import sample_exact_2d

HK = (0.15,)


def sampler(x0: torch.Tensor, **kw) -> PseudofermionHMC:
    opts = dict(step_size=0.25, n_steps=4, generator=gen(1), tol=1e-12, hasenbusch_kappas=HK, step_jitter=0.0)
    opts.update(kw)
    return PseudofermionHMC.for_theory(model(), x0, **opts)


def prepared(s: PseudofermionHMC, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudofermions and momenta for ``s.x`` (as at the start of a trajectory); returns ``(x, p)``."""
    g = gen(seed)
    p = s.manifold.random_momenta(s.x, g)
    s._phis, _ = s.pseudofermions.refresh(s._background(s.x), g)
    return s.x.clone(), p


def integrate(s: PseudofermionHMC, x, p, eps: float, n: int):
    s.pseudofermions.chrono_reset()
    if not s.time_scales:
        return s._integrate(x, p, eps, n)
    mf = s.manifold
    return integrate_nested(x, p, eps, n, s.level_forces(), s.time_scales, s.integrator, mf.kick, mf.drift)


def hamiltonian(s: PseudofermionHMC, x, p) -> torch.Tensor:
    return s.manifold.kinetic(p) + (s.gauge_action(x) + s.pseudofermions.action(s._background(x), s._phis)).double()


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_one_level_is_todays_integrator_bit_for_bit(integrator):
    s = sampler(haar(3, 11), integrator=integrator)
    x, p = prepared(s)
    xa, pa = s._integrate(x, p, 0.2, 5)
    mf = s.manifold
    xb, pb = integrate_nested(x, p, 0.2, 5, [s.total_force], [], integrator, mf.kick, mf.drift)
    assert torch.equal(xa, xb) and torch.equal(pa, pb)


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_schedule_covers_the_trajectory(integrator):
    """Every level's kicks sum to the trajectory length, and the drifts too."""
    sched = nested_schedule(3, [4, 2], integrator)
    drift = sum(item for item in sched if not isinstance(item, list))
    kicks = {}
    for item in sched:
        if isinstance(item, list):
            for level, c in item:
                kicks[level] = kicks.get(level, 0.0) + c
    assert drift == pytest.approx(3.0) and kicks == pytest.approx({0: 3.0, 1: 3.0, 2: 3.0})
    # forces per trajectory: level 2 once per outer kick block, level 0 at every drift end
    n_level = [sum(1 for it in sched if isinstance(it, list) and any(lv == k for lv, _ in it)) for k in range(3)]
    assert n_level[2] == (4 if integrator == "leapfrog" else 7)
    assert n_level[0] == n_level[0] and n_level[0] > n_level[1] > n_level[2]


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
@pytest.mark.parametrize("chrono", [0, 3])
def test_nested_is_reversible(integrator, chrono):
    s = sampler(haar(2, 12), integrator=integrator, time_scales=[2, 1], chrono=chrono, tol=1e-11)
    x0, p0 = prepared(s)
    x1, p1 = integrate(s, x0, p0, 0.3, 3)
    x2, p2 = integrate(s, x1, -p1, 0.3, 3)
    dx = (x2 - x0).abs().max().item()
    dp = (p2 + p0).abs().max().item()
    # zero guesses: roundoff of ~100 force evaluations; chrono: the CG tolerance 1e-11 enters the forces
    bound = 2e-11 if chrono == 0 else 1e-9
    print(f"{integrator} chrono={chrono}: |dx| {dx:.1e}, |dp| {dp:.1e}")
    assert dx < bound and dp < bound
    assert (x1 - x0).abs().max() > 0.1  # it moved


def energy_violation(integrator: str, n_steps: int, tau: float = 0.5) -> float:
    """Mean ``|dH|`` over 2 Haar configurations, trajectory length ``tau``, three levels ``[2, 1]``."""
    s = sampler(haar(2, 13), integrator=integrator, time_scales=[2, 1], tol=1e-10, chrono=1)
    x, p = prepared(s)
    h0 = hamiltonian(s, x, p)
    x1, p1 = integrate(s, x, p, tau / n_steps, n_steps)
    return (hamiltonian(s, x1, p1) - h0).abs().mean().item()


@pytest.mark.parametrize("integrator, steps", [("leapfrog", (2, 4, 8, 16)), ("omelyan", (2, 4, 8))])
def test_energy_violation_falls_as_eps_squared(integrator, steps):
    dh = [energy_violation(integrator, n) for n in steps]
    slope = np.polyfit(np.log([0.5 / n for n in steps]), np.log(dh), 1)[0]
    print(f"{integrator}: |dH| {[f'{v:.2e}' for v in dh]}, slope {slope:.2f}")
    assert 1.7 < slope < 2.3, (dh, slope)
    if integrator == "omelyan":
        # the same step sizes with leapfrog (measured: 6.7e-1, 1.7e-1, 4.2e-2): Omelyan's constant is far smaller
        assert all(o < 0.2 * energy_violation("leapfrog", n) for o, n in zip(dh[:1], steps)), dh


N_REF, N_CHAINS, N_THERM, N_MEAS = 4096, 32, 8, 30
OBS = ("plaquette", "chiral_condensate")  # the condensate sees the determinant most clearly


@pytest.fixture(scope="module")
def reference():
    """Exact-determinant plaquette and condensate (exact pure-gauge samples reweighted by ``det(D^dag D)``), and
    ``N_CHAINS`` starts drawn from a pure-gauge pool with probabilities ``det(D^dag D)``."""
    m = model()
    g = gen(stat_seed(505))
    theta = sample_exact_2d(BETA, (4, 4), N_REF, g)
    obs = exact_observables(m, theta, logdet=True)
    w = torch.exp(obs["fermion_logdet"] - obs["fermion_logdet"].max())
    ref = {k: gamma_method_derived(lambda a, b: a / b, [(obs[k] * w).numpy(), w.numpy()], S=0) for k in OBS}
    pool = theta[: 16 * N_CHAINS]
    pick = torch.multinomial(w[: 16 * N_CHAINS], N_CHAINS, replacement=False, generator=g)
    return ref, pool[pick].clone()


@pytest.mark.statistical
def test_pf_hmc_on_three_time_scales_matches_exact_determinant(reference, record_z):
    """Even/odd, one Hasenbusch factor, levels gauge / Hasenbusch-mass factor / ratio, chrono 2, Omelyan."""
    ref, start = reference
    m = model()
    s = PseudofermionHMC.for_theory(
        m,
        start,
        step_size=0.5,
        n_steps=2,
        generator=gen(stat_seed(404)),
        tol=1e-8,
        step_jitter=0.2,
        even_odd=True,
        hasenbusch_kappas=HK,
        time_scales=[1, 1],
        chrono=2,
    )
    s.run(N_THERM)
    rows = s.run(N_MEAS)
    acc = rows.accepted.double().mean().item()
    assert acc > 0.8
    obs = exact_observables(m, rows.x)
    report, z = [f"acceptance {acc:.3f}"], {}
    for name in OBS:
        r = gamma_method(per_chain(obs[name], N_MEAS))
        z[name] = z_of(r, ref[name])
        report.append(f"{name}: {r.mean:.4f} +- {r.err:.4f} vs {ref[name].mean:.4f}: z = {z[name]:+.2f}")
        record_z(name, z[name])
        assert r.window < N_MEAS // 2, report
    print("\n".join(report))
    assert all(abs(v) < 3 for v in z.values()), report


def test_chrono_reduces_cg_iterations():
    """CG iterations of the force solves of one trajectory (eps = 0.02): zero guesses against chronological ones.

    Measured: k = 1 saves 6%, k = 3 (minimal-residual extrapolation) 13%; the guesses' relative residuals are
    1e-2 and 1e-4, but what is left sits in the low modes, which set CG's iteration count.
    """
    its = {}
    for k in (0, 1, 3):
        s = sampler(sample_exact_2d(BETA, (4, 4), 2, gen(14)), time_scales=[2], chrono=k, tol=1e-10)
        x, p = prepared(s)
        s.pseudofermions.reset_stats()
        integrate(s, x, p, 0.02, 4)
        its[k] = s.pseudofermions.total_iterations.double().mean().item()
    print(f"CG iterations of the force solves per trajectory: {its}")
    assert its[1] / its[0] < 0.97 and its[3] / its[0] < 0.92, its


def test_bad_time_scales_and_chrono_are_refused():
    x = haar(1, 15)
    with pytest.raises(ValueError, match="time_scales must be integers"):
        sampler(x, time_scales=[0])
    with pytest.raises(ValueError, match="at most 2 multiplier"):
        sampler(x, time_scales=[2, 2, 2])
    with pytest.raises(ValueError, match="chrono must be an integer"):
        sampler(x, chrono=-1)
    s = sampler(x, time_scales=[2], chrono=1)
    assert s.config()["time_scales"] == [2] and s.config()["chrono"] == 1
    assert "time_scales" not in sampler(x).config() and "chrono" not in sampler(x).config()
    assert math.isfinite(float(s.trajectory()[1][0]))


def test_job_keys_are_validated_in_one_line():
    from latflow.jobs.config import JobError, load_job
    from latflow.jobs.runner import _check_pseudofermion_options

    path = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "schwinger_pf_hmc.toml"
    job = load_job(path, ["sampler.time_scales=[4, 2]", "sampler.chrono=2"])
    assert job.sampler.time_scales == (4, 2) and job.sampler.chrono == 2
    _check_pseudofermion_options(job)
    bad = {
        "sampler.time_scales=[0]": r"'sampler.time_scales' = \[0\]: must be a list of integers >= 1",
        "sampler.time_scales=2": r"'sampler.time_scales' = 2: expected a list of integers",
        "sampler.chrono=-1": r"'sampler.chrono' = -1: must be an integer >= 0",
        'sampler.cg_solver="gmres"': r"'sampler.cg_solver' = 'gmres': expected one of 'cg', 'cg_mixed'",
        "sampler.cg_check_every=-1": r"'sampler.cg_check_every' = -1: must be a number >= 0",
    }
    for change, message in bad.items():
        with pytest.raises(JobError, match=message):
            load_job(path, [change])
    job = load_job(path, ['sampler.cg_solver="cg_mixed"', "sampler.cg_check_every=4"])
    assert (job.sampler.cg_solver, job.sampler.cg_check_every) == ("cg_mixed", 4)
    job = load_job(path, ["sampler.time_scales=[2, 2, 2]"])
    with pytest.raises(JobError, match=r"'sampler.time_scales' = \[2, 2, 2\]: 2 pseudofermion factor\(s\)"):
        _check_pseudofermion_options(job)


def test_resume_with_time_scales_and_chrono_is_bit_identical():
    """The chronological history starts empty every trajectory, so a saved state continues bit for bit."""
    x = haar(2, 16)
    a = sampler(x, time_scales=[2, 1], chrono=2, generator=gen(7))
    a.run(1)
    state = a.state_dict()
    rest = a.run(2)
    b = sampler(haar(2, 17), time_scales=[2, 1], chrono=2, generator=gen(99))
    b.load_state_dict(state)
    assert torch.equal(b.run(2).x, rest.x)
    c = sampler(haar(2, 17), time_scales=[2, 1], chrono=0, generator=gen(99))
    with pytest.raises(ValueError, match="sampler state was made with"):
        c.load_state_dict(state)


def test_mixed_precision_and_check_every_give_the_same_trajectory():
    """``solver = "cg_mixed"`` (complex64 inner CG, complex128 defect correction) and ``check_every = 5`` solve to
    the same tolerance: one nested trajectory with even/odd and a Hasenbusch factor ends at the plain-CG end point
    to ~the tolerance, with the same acceptance decision; the solver is part of the sampler's config."""
    x = haar(2, 18)
    runs = {}
    for solver, every in (("cg", None), ("cg_mixed", None), ("cg", 5)):
        s = sampler(x, even_odd=True, time_scales=[2, 1], tol=1e-11, generator=gen(8), solver=solver, check_every=every)
        accepted, dh = s.trajectory()
        runs[(solver, every)] = (s.x.clone(), dh, accepted, s.config())
    base = runs[("cg", None)]
    for key, (x1, dh1, acc1, _) in runs.items():
        print(key, f"|dx| {float((x1 - base[0]).abs().max()):.1e}, |d dH| {float((dh1 - base[1]).abs().max()):.1e}")
        assert torch.allclose(x1, base[0], rtol=0, atol=1e-8), key
        assert torch.allclose(dh1, base[1], rtol=0, atol=1e-7), key
        assert torch.equal(acc1, base[2]), key
    assert runs[("cg_mixed", None)][3]["solver"] == "cg_mixed" and "solver" not in base[3]
    with pytest.raises(ValueError, match="solver must be one of 'cg', 'cg_mixed'"):
        sampler(x, solver="gmres")
    with pytest.raises(ValueError, match="check_every must be a positive integer"):
        sampler(x, check_every=0)
