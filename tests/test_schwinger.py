"""The Schwinger model (latflow.theories.schwinger) and pseudofermion HMC (latflow.samplers.pf_hmc).

- parameters and geometry are validated; the registry builds the theory;
- kappa -> 0: the effective action is the pure U(1) action (exactly at kappa = 0, and
  ``log det(D^dag D) = O(kappa^4)``); PF-HMC at tiny kappa reproduces the exact torus plaquette
  and ``<Q^2>`` within 3 sigma;
- the analytic effective-action force equals autograd of the (dense) effective action, and HMC
  runs on it with autograd forces; the PF-HMC force is the analytic gauge force plus the
  pseudofermion force and nothing else;
- fermionic observables: the stochastic condensate averages to the exact trace (Z2 and Gaussian
  noise, within 4 sigma); the pion correlator equals the dense-inverse correlator, is positive, maps
  to ``C(L0 - t)`` under time reflection and is invariant under charge conjugation (exact per
  configuration), and is symmetric on average (3 sigma);
- PF-HMC (plain, even/odd, Hasenbusch) reproduces the exact-determinant plaquette, ``<Q^2>`` and
  chiral condensate at beta = 2, kappa = 0.24 on 4x4 within 3 sigma of exact reweighting of
  independent exact pure-gauge samples by ``det(D^dag D)`` (Gamma-method errors for PF-HMC, with a
  window that closes below its cap; the fermions shift these observables by about 10 errors);
- PF-HMC resumes bit for bit from its state and rejects foreign states and bad parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.analysis import gamma_method, gamma_method_derived
from latflow.fermions.dense import logdet_normal
from latflow.fermions.evenodd import EvenOddWilson
from latflow.fermions.wilson import u1_links
from latflow.gauge import UniformU1Prior, u1_gauge_transform, wrap_angle
from latflow.lattice import Lattice
from latflow.samplers import HMC, SampleBlock, state_from_bytes, state_to_bytes
from latflow.samplers.hmc import action_force
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.theories import REGISTRY, get_spec
from latflow.theories.schwinger import SchwingerModel, SchwingerParams
from latflow.theories.u1 import U1GaugeAction, U1Params, exact_plaquette, exact_q2, sample_exact_2d

F64 = torch.float64
LAT = Lattice((4, 4))
BETA, KAPPA = 2.0, 0.24


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model(beta: float = BETA, kappa: float = KAPPA, shape: tuple[int, int] = (4, 4)) -> SchwingerModel:
    return SchwingerModel(SchwingerParams(beta, kappa), Lattice(shape))


def haar(batch: int, seed: int, shape: tuple[int, int] = (4, 4)) -> torch.Tensor:
    return UniformU1Prior(Lattice(shape), dtype=F64).sample(batch, gen(seed))[0]


def per_chain(values: torch.Tensor, n_traj: int) -> list[np.ndarray]:
    """Rows ordered trajectory-major ``[n_traj * B]`` -> one series per chain (Gamma-method replicas)."""
    return list(values.reshape(n_traj, -1).T.numpy())


def z_of(a, b) -> float:
    return (a.mean - b.mean) / math.hypot(a.err, b.err)


# --- parameters, registry -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "beta, kappa",
    [
        (-1.0, 0.2),
        (float("nan"), 0.2),
        (float("inf"), 0.2),
        (2.0, -0.01),
        (2.0, 0.5),
        (2.0, float("nan")),
        (2.0, "0.2"),
    ],
)
def test_bad_couplings_raise(beta, kappa):
    with pytest.raises(ValueError):
        SchwingerParams(beta, kappa)


def test_geometry_and_registry():
    with pytest.raises(ValueError):
        SchwingerModel(SchwingerParams(1.0, 0.1), Lattice((4, 4, 4)))
    with pytest.raises(ValueError):
        SchwingerModel(SchwingerParams(1.0, 0.1), Lattice((1, 4)))
    spec = get_spec("schwinger")
    assert REGISTRY["schwinger"] is spec and spec.field_name == "links" and spec.params is SchwingerParams
    theory = spec.build(SchwingerParams(1.5, 0.2), Lattice((4, 6)))
    assert (theory.name, theory.field_name, theory.field_shape) == ("schwinger", "links", (2, 4, 6))
    assert theory.couplings() == {"beta": 1.5, "kappa": 0.2}
    obs = theory.observables(haar(3, 1, (4, 6)))
    assert {"plaquette", "topological_charge", "topological_charge_sq", "action", "chiral_condensate"} <= set(obs)
    assert all(v.shape == (3,) for v in obs.values())
    derived = theory.derived_observables()["topological_susceptibility"]
    assert derived.inputs == ("topological_charge_sq",) and derived.func(2.4) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        theory.action(haar(2, 1, (4, 4)))  # wrong lattice


# --- actions and forces -----------------------------------------------------------------------


def test_kappa_to_zero_gives_pure_u1():
    theta = haar(4, 2)
    gauge = U1GaugeAction(U1Params(BETA), LAT)
    assert torch.equal(model(kappa=0.0).fermion_logdet(theta), torch.zeros(4, dtype=F64))
    torch.testing.assert_close(model(kappa=0.0).action(theta), gauge.action(theta), rtol=0, atol=1e-12)
    # closed fermion loops need >= 4 hops (the Wilson projectors kill back-tracking): log det = O(kappa^4)
    small = [model(kappa=k).fermion_logdet(theta) for k in (0.01, 0.02)]
    ratio = small[1] / small[0]
    assert small[0].abs().max() < 1e-5
    torch.testing.assert_close(ratio, torch.full_like(ratio, 16.0), rtol=0.02, atol=0)


def test_effective_action_consistency_and_gauge_invariance():
    m = model()
    theta = haar(3, 3)
    ld = m.fermion_logdet(theta)
    torch.testing.assert_close(ld, logdet_normal(EvenOddWilson(m.dirac), u1_links(theta)), rtol=0, atol=1e-9)
    obs = m.observables(theta)
    torch.testing.assert_close(obs["action"], m.gauge_action(theta) - ld, rtol=0, atol=1e-9)
    torch.testing.assert_close(obs["fermion_logdet"], ld, rtol=0, atol=1e-9)
    torch.testing.assert_close(obs["chiral_condensate"], m.chiral_condensate(theta), rtol=0, atol=1e-12)
    alpha = 3.0 * torch.randn((3, 4, 4), generator=gen(4), dtype=F64)
    theta_g = u1_gauge_transform(theta, alpha)
    torch.testing.assert_close(m.action(theta_g), m.action(theta), rtol=0, atol=1e-9)
    torch.testing.assert_close(m.chiral_condensate(theta_g), m.chiral_condensate(theta), rtol=0, atol=1e-12)


def test_effective_action_force_is_autograd_and_drives_hmc():
    m = model(kappa=0.26)
    theta = haar(3, 5)
    torch.testing.assert_close(m.force(theta), action_force(m.action, theta), rtol=0, atol=1e-10)
    # HMC on the exact effective action with autograd forces (the small-lattice baseline)
    h = HMC(m.action, haar(8, 6), step_size=0.2, n_steps=5, generator=gen(7), integrator="omelyan", project=m.project)
    acc = torch.cat([h.trajectory()[0] for _ in range(4)])
    assert acc.double().mean() > 0.5


def test_pf_hmc_force_is_gauge_force_plus_pseudofermion_force():
    m = model()
    theta = haar(2, 8)
    s = PseudofermionHMC.for_theory(m, theta, step_size=0.1, n_steps=1, generator=gen(9), hasenbusch_kappas=(0.12,))
    phis = s.pseudofermions.heatbath(u1_links(theta), gen(10))
    s._phis = phis
    total = s.total_force(theta)
    s._phis = None
    gauge_part = total - s.pseudofermions.force(theta, phis)
    torch.testing.assert_close(gauge_part, action_force(m.gauge_action, theta), rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError):
        s.total_force(theta)  # outside a trajectory there are no pseudofermions


# --- fermionic observables ----------------------------------------------------------------------


@pytest.mark.statistical
@pytest.mark.parametrize("noise", ["z2", "gaussian"])
def test_stochastic_condensate_is_unbiased(noise, record_z):
    m = model()
    theta = haar(1, 11) * 0.5
    exact = float(m.chiral_condensate(theta)[0])
    est = m.chiral_condensate_stochastic(theta.expand(300, -1, -1, -1), gen(stat_seed(12)), 1, noise=noise)
    r = gamma_method(est.numpy(), S=0)
    z = (r.mean - exact) / r.err
    print(f"stochastic condensate ({noise}): exact {exact:.5f}, estimate {r.mean:.5f} +- {r.err:.5f}, z = {z:+.2f}")
    # a mean of 50 noise vectors per call: its error is that of one vector / sqrt(50)
    avg = m.chiral_condensate_stochastic(theta, gen(stat_seed(13)), 50, noise=noise)
    z_avg = (float(avg[0]) - exact) / (r.err * math.sqrt(300 / 50))
    record_z("condensate (1 noise vector, 300 draws)", z, 4.0)
    record_z("condensate (mean of 50 noise vectors)", z_avg, 5.0)
    assert abs(z) < 4
    assert avg.shape == (1,) and abs(z_avg) < 5
    with pytest.raises(ValueError):
        m.chiral_condensate_stochastic(theta, gen(13), 0)
    with pytest.raises(ValueError):
        m.chiral_condensate_stochastic(theta, gen(13), 1, noise="u1")


def reflect_time(theta: torch.Tensor) -> torch.Tensor:
    """Links of the time-reflected configuration ``t -> -t``: ``U'_0(t) = U_0(-t-1)^*``, ``U'_1(t) = U_1(-t)``."""
    t0 = -torch.flip(theta[:, 0], dims=[1])
    t1 = torch.roll(torch.flip(theta[:, 1], dims=[1]), 1, dims=1)
    return torch.stack([t0, t1], dim=1)


def test_pion_correlator_exact_properties():
    m = model(shape=(6, 4))
    theta = haar(3, 14, (6, 4))
    c = m.pion_correlator(theta)
    assert c.shape == (3, 6) and bool((c > 0).all())
    # the dense inverse: C(t) = sum_{x1, a, b} |S_ab(t, x1; 0, 0)|^2
    s = m.propagator(theta).reshape(3, 6, 4, 2, 6, 4, 2)
    dense = s[:, :, :, :, 0, 0, :].abs().pow(2).sum(dim=(2, 3, 4))
    torch.testing.assert_close(c, dense, rtol=1e-9, atol=0)
    # time reflection maps C(t) to C(-t mod L0); charge conjugation (U -> U^*) leaves it unchanged
    reflected = m.pion_correlator(reflect_time(theta))
    torch.testing.assert_close(reflected, torch.roll(torch.flip(c, dims=[1]), 1, dims=1), rtol=1e-9, atol=0)
    torch.testing.assert_close(m.pion_correlator(-theta), c, rtol=1e-9, atol=0)
    assert not torch.allclose(c[:, 1], c[:, 5], rtol=1e-3)  # per configuration C is not symmetric


@pytest.mark.statistical
def test_pion_correlator_is_symmetric_on_average(record_z):
    m = model(beta=1.0, shape=(6, 4))
    c = m.pion_correlator(haar(400, stat_seed(15), (6, 4)))
    z = {}
    for t in (1, 2):
        r = gamma_method((c[:, t] - c[:, 6 - t]).numpy(), S=0, known_mean=0.0)
        print(f"pion C({t}) - C({6 - t}): {r.mean:.2e} +- {r.err:.2e}")
        z[f"C({t}) - C({6 - t})"] = r.mean / r.err
        record_z(f"C({t}) - C({6 - t})", z[f"C({t}) - C({6 - t})"])
    assert all(abs(v) < 3 for v in z.values()), z


# --- PF-HMC against exact determinants ------------------------------------------------------------
#
# The reference: independent exact samples of the pure-gauge theory (theories.u1.sample_exact_2d)
# reweighted by det(D^dag D) from dense determinants, <O> = <O w>_g / <w>_g, with errors of the ratio
# of means of independent draws (no autocorrelation). PF-HMC: N_CHAINS_PF chains from starts
# resampled from a pool of exact pure-gauge samples with weights det(D^dag D) (close to the
# dynamical distribution), N_THERM trajectories of thermalisation (from pure-gauge starts the
# condensate relaxes within ~20 trajectories; from these starts the remaining offset is far below
# the errors), then N_MEAS measured trajectories per chain, analysed by
# the Gamma method over the chains as replicas (tau_int ~ 1-3 trajectories, the window closes far
# below its cap N_MEAS / 2).

N_REF = 8192  # independent pure-gauge samples of the reference
N_CHAINS_PF, N_THERM, N_MEAS = 48, 10, 60
OBSERVABLES = ("plaquette", "topological_charge_sq", "chiral_condensate")


def exact_observables(m: SchwingerModel, theta: torch.Tensor, logdet: bool = False) -> dict[str, torch.Tensor]:
    """Gauge observables, the exact (dense) condensate and optionally ``log det(D^dag D)``, each ``[B]``."""
    obs = m.gauge.observables(theta)
    out = {name: obs[name] for name in ("plaquette", "topological_charge_sq")}
    out["chiral_condensate"] = m.chiral_condensate(theta)
    if logdet:
        out["fermion_logdet"] = m.fermion_logdet(theta)
    return out


@pytest.fixture(scope="module")
def exact_reference():
    """Exact-determinant expectation values at (BETA, KAPPA) and the quenched (pure-gauge) ones."""
    m = model()
    theta = sample_exact_2d(BETA, (4, 4), N_REF, gen(stat_seed(101)))
    obs = exact_observables(m, theta, logdet=True)
    w = torch.exp(obs["fermion_logdet"] - obs["fermion_logdet"].max())
    ref, quenched = {}, {}
    for name in OBSERVABLES:
        ref[name] = gamma_method_derived(lambda a, b: a / b, [(obs[name] * w).numpy(), w.numpy()], S=0)
        quenched[name] = gamma_method(obs[name].numpy(), S=0)
    return ref, quenched


@pytest.fixture(scope="module")
def dynamical_start():
    """``N_CHAINS_PF`` distinct starts drawn from 16 times as many exact pure-gauge samples with
    probabilities proportional to ``det(D^dag D)`` (without replacement)."""
    m = model()
    g = gen(stat_seed(202))
    pool = sample_exact_2d(BETA, (4, 4), 16 * N_CHAINS_PF, g)
    logdet = m.fermion_logdet(pool)
    pick = torch.multinomial(torch.exp(logdet - logdet.max()), N_CHAINS_PF, replacement=False, generator=g)
    return pool[pick].clone()


@pytest.mark.statistical
@pytest.mark.parametrize(
    "opts",
    [dict(n_steps=3), dict(n_steps=3, even_odd=True), dict(n_steps=2, hasenbusch_kappas=(0.15,))],
    ids=["plain", "even-odd", "hasenbusch"],
)
def test_pf_hmc_matches_exact_determinant(opts, exact_reference, dynamical_start, record_z):
    ref, quenched = exact_reference
    m = model()
    opts = dict(opts)
    n_steps = opts.pop("n_steps")
    s = PseudofermionHMC.for_theory(
        m,
        dynamical_start,
        step_size=1.0 / n_steps,
        n_steps=n_steps,
        generator=gen(stat_seed(303)),
        tol=1e-8,
        step_jitter=0.2,
        **opts,
    )
    s.run(N_THERM)
    rows = s.run(N_MEAS)
    acc = rows.accepted.double().mean().item()
    assert acc > 0.7
    obs = exact_observables(m, rows.x)
    report = [f"acceptance {acc:.3f}, CG iterations/trajectory {s.last_run_cg_iterations.double().mean():.0f}"]
    z = {}
    for name in OBSERVABLES:
        r = gamma_method(per_chain(obs[name], N_MEAS))
        z[name], z_quenched = z_of(r, ref[name]), z_of(quenched[name], ref[name])
        report.append(
            f"{name}: {r.mean:.4f} +- {r.err:.4f} (tau_int {r.tau_int:.1f}, window {r.window}) vs "
            f"exact {ref[name].mean:.4f} +- {ref[name].err:.4f}: z = {z[name]:+.2f} "
            f"(quenched z = {z_quenched:+.1f})"
        )
        record_z(name, z[name])
        assert r.window < N_MEAS // 2, report  # an honest window, not the cap
        # the comparison can see the determinant: the quenched values are far off
        if name != "topological_charge_sq":
            assert abs(z_quenched) > 5, report
    print("\n".join(report))
    assert all(abs(v) < 3 for v in z.values()), report


@pytest.mark.statistical
def test_pf_hmc_at_tiny_kappa_is_pure_u1(record_z):
    """At kappa = 0.005 the determinant is ~1: PF-HMC from exact pure-gauge starts stays exact."""
    m = model(kappa=0.005)
    g = gen(stat_seed(404))
    start = sample_exact_2d(BETA, (4, 4), N_CHAINS_PF, g)
    s = PseudofermionHMC.for_theory(
        m, start, step_size=1 / 3, n_steps=3, generator=g, even_odd=True, tol=1e-10, step_jitter=0.2
    )
    s.run(5)
    n_meas = 30
    rows = s.run(n_meas)
    obs = m.gauge.observables(rows.x)
    exact_values = {"plaquette": exact_plaquette(BETA, (4, 4)), "topological_charge_sq": exact_q2(BETA, (4, 4))}
    z = {}
    for name, exact in exact_values.items():
        r = gamma_method(per_chain(obs[name], n_meas))
        z[name] = (r.mean - exact) / r.err
        print(
            f"kappa = 0.005 PF-HMC {name}: {r.mean:.4f} +- {r.err:.4f} (tau_int {r.tau_int:.1f}), "
            f"exact pure U(1) {exact:.4f}, z = {z[name]:+.2f}"
        )
        record_z(name, z[name])
        assert r.window < n_meas // 2
    assert all(abs(v) < 3 for v in z.values()), z


# --- PF-HMC records, resume, validation -------------------------------------------------------------


def make_pf_hmc(seed: int, theta0: torch.Tensor, **kw) -> PseudofermionHMC:
    opts = dict(step_size=0.25, n_steps=3, even_odd=True, hasenbusch_kappas=(0.12,), step_jitter=0.3, tol=1e-9) | kw
    return PseudofermionHMC.for_theory(model(kappa=0.18), theta0, generator=gen(seed), **opts)


def blocks_equal(a: SampleBlock, b: SampleBlock) -> None:
    for name in SampleBlock.__dataclass_fields__:
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert torch.equal(ta, tb), name


def test_pf_hmc_rows_and_resume_is_bit_identical():
    theta0 = haar(4, 16) * 0.5
    whole = make_pf_hmc(17, theta0, chain_offset=3)
    ref = whole.run(4)
    b = whole.n_chains
    assert len(ref) == 4 * b and torch.equal(ref.chain, (torch.arange(b) + 3).repeat(4))
    assert torch.equal(ref.step, torch.arange(4).repeat_interleave(b))
    prev = wrap_angle(theta0)
    for t in range(4):  # a rejected trajectory repeats the chain's configuration
        x_t, acc_t = ref.x[t * b : (t + 1) * b], ref.accepted[t * b : (t + 1) * b]
        assert torch.equal(x_t[~acc_t], prev[~acc_t]) and not bool((x_t[acc_t] == prev[acc_t]).all(dim=(1, 2, 3)).any())
        prev = x_t
    assert bool((ref.x.abs() <= math.pi).all())  # wrapped angles
    s_pf = -ref.log_p - model(kappa=0.18).gauge_action(ref.x)  # log_p = -(S_g + S_pf)
    assert bool((s_pf > 0).all())
    assert whole.last_run_cg_iterations.shape == (4, b) and bool((whole.last_run_cg_iterations > 0).all())

    first = make_pf_hmc(17, theta0, chain_offset=3)
    part1 = first.run(2)
    state = state_from_bytes(state_to_bytes(first.state_dict()))
    second = make_pf_hmc(99, haar(4, 18))  # other start and stream
    second.load_state_dict(state)
    blocks_equal(SampleBlock.concat([part1, second.run(2)]), ref)


def test_pf_hmc_rejects_foreign_states_and_bad_parameters():
    theta0 = haar(2, 19)
    s = make_pf_hmc(20, theta0)
    hmc = HMC(model(kappa=0.18).gauge_action, theta0, step_size=0.1, n_steps=2, generator=gen(21))
    with pytest.raises(ValueError):
        s.load_state_dict(hmc.state_dict())
    with pytest.raises(ValueError):
        hmc.load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        make_pf_hmc(22, theta0, hasenbusch_kappas=(0.1,)).load_state_dict(s.state_dict())  # another algorithm
    bad_options = (
        dict(step_size=0.0),
        dict(n_steps=0),
        dict(hasenbusch_kappas=(0.2,)),
        dict(tol=-1.0),
        dict(step_jitter=1.0),
    )
    for kw in bad_options:
        with pytest.raises(ValueError):
            make_pf_hmc(23, theta0, **kw)
    for bad in (theta0[:, :1], theta0.to(torch.complex128), theta0[..., :3]):
        with pytest.raises(ValueError):
            make_pf_hmc(24, bad)
