"""Samplers: flow-MCMC (independence Metropolis) and HMC.

- flow-MCMC rows: the chain starts from an importance-resampled proposal (its initial state is a
  draw from the target up to O(1/batch_size), checked against the proposal's own moments), rejected
  rows repeat the previous configuration with its log_p and log_q, accepted rows carry their own,
  steps are consecutive across blocks, the chain id is recorded; q = p accepts everything; the
  chain samples a known target exactly;
- resume: ``run(n1)``, ``state_dict`` (through bytes), a new sampler, ``load_state_dict``,
  ``run(n2)`` reproduces one uninterrupted ``run(n1 + n2)`` bit for bit. For flow-MCMC this holds
  when ``n1`` is a multiple of the proposal ``batch_size`` (each proposal batch draws its
  configurations and then its accept/reject uniforms; a partial batch would shift the stream);
  for HMC for any ``n1``;
- HMC: Gaussian target of known variances; analytic phi^4 force (written here) against the
  autograd force; reversibility of both integrators; energy violation ~ step_size^2; ``tune``
  reaches roughly the target acceptance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.analysis import gamma_method
from latflow.flows import FlowModel, make_affine_flow
from latflow.lattice import Lattice
from latflow.priors import NormalPrior
from latflow.rng import make_generator
from latflow.samplers import HMC, FlowMCMC, SampleBlock, action_force, state_from_bytes, state_to_bytes
from latflow.theories.phi4 import Phi4Params, Phi4Theory

F64 = torch.float64


def phi4(shape=(4, 4), m2=-1.0, lam=0.8) -> Phi4Theory:
    return Phi4Theory(Phi4Params(m2, lam), Lattice(shape))


def blocks_equal(a: SampleBlock, b: SampleBlock) -> None:
    for name in SampleBlock.__dataclass_fields__:
        ta, tb = getattr(a, name), getattr(b, name)
        if ta is None or tb is None:
            assert ta is None and tb is None, name
        else:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


# --- flow-MCMC ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_setup():
    """An untrained flow and a target close enough to it for both accepts and rejects:
    ``log p = log q + 1.5 tanh(sum_x phi_x)`` (independent of the flow's accuracy)."""
    torch.manual_seed(0)  # default initialisation of the (untrained) nets
    model = make_affine_flow(Lattice((4, 4)), 2, (4,), prior_sigma=0.5)

    def log_p(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.log_prob(x) + 1.5 * torch.tanh(x.flatten(1).sum(1))

    return model, log_p


def test_flow_mcmc_rows(flow_setup):
    model, log_p = flow_setup
    sampler = FlowMCMC(model, log_p, batch_size=7, generator=make_generator(21), chain_id=3)
    a, b = sampler.run(30), sampler.run(25)
    rows = SampleBlock.concat([a, b])
    n = len(rows)
    assert len(a) == 30 and len(b) == 25 and rows.x.shape == (n, 4, 4)
    assert torch.equal(rows.step, torch.arange(n))
    assert torch.equal(rows.chain, torch.full((n,), 3))
    assert torch.equal(rows.log_w, torch.zeros(n, dtype=F64))
    acc = rows.accepted
    assert 0.1 < acc.double().mean() < 0.9, "need both accepted and rejected rows"
    for i in range(1, n):
        same = torch.equal(rows.x[i], rows.x[i - 1])
        if acc[i]:
            assert not same
        else:
            assert same and rows.log_p[i] == rows.log_p[i - 1] and rows.log_q[i] == rows.log_q[i - 1]
    # every row carries the target and proposal densities of its own configuration
    torch.testing.assert_close(rows.log_p, log_p(rows.x), rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(rows.log_q, model.log_prob(rows.x), rtol=0, atol=1e-10)
    # the state continues the chain
    state = sampler.state_dict()
    assert state["step"] == n and torch.equal(state["x"], rows.x[-1])
    assert state["log_p"] == rows.log_p[-1] and state["log_q"] == rows.log_q[-1]


def test_flow_mcmc_accepts_everything_when_q_is_the_target(flow_setup):
    model, _ = flow_setup
    sampler = FlowMCMC(model, model.log_prob, batch_size=50, generator=make_generator(22))
    assert bool(sampler.run(200).accepted.all())


@pytest.mark.statistical
def test_flow_mcmc_samples_a_known_target(record_z):
    """Proposal N(0, 1.5^2) with no layers, target N(0, 1): <x^2> = 1, <x^4> = 3 and <x> = 0 within 3 sigma."""
    model = FlowModel(NormalPrior((1,), 1.5), [])
    seed = stat_seed(23)
    blocks = [
        FlowMCMC(model, lambda x: -0.5 * x[:, 0] ** 2, batch_size=1000, generator=make_generator(seed, c)).run(4000)
        for c in range(4)
    ]
    x = [blk.x[:, 0].numpy() for blk in blocks]
    for name, data, exact in (("x^2", [v**2 for v in x], 1.0), ("x^4", [v**4 for v in x], 3.0), ("x", x, 0.0)):
        r = gamma_method(data)
        z = (r.mean - exact) / r.err
        record_z(name, z)
        assert abs(z) < 3, (r, exact)
    acc = np.mean([blk.accepted.double().mean().item() for blk in blocks])
    assert 0.7 < acc < 0.95


@pytest.mark.statistical
def test_flow_mcmc_starts_from_an_importance_resampled_proposal(record_z):
    """Initial states of 400 chains (proposal N(0, 1.5^2), target N(0, 1), batches of 50): their
    <x^2> is the target's 1 (resampling bias O(1/50), far below the error 0.07), not the
    proposal's 2.25 that accepting the first proposal gives."""
    model = FlowModel(NormalPrior((1,), 1.5), [])
    seed = stat_seed(25)
    x0 = []
    for c in range(400):
        s = FlowMCMC(model, lambda x: -0.5 * x[:, 0] ** 2, batch_size=50, generator=make_generator(seed, c))
        s._start()
        x0.append(float(s.x[0]))
    x2 = np.square(x0)
    z = (x2.mean() - 1.0) / (x2.std(ddof=1) / math.sqrt(len(x2)))
    record_z("x0^2", z)
    assert abs(z) < 3, (x2.mean(), z)
    # the first block leans on the start: its rows before the first acceptance repeat it
    s = FlowMCMC(model, lambda x: -0.5 * x[:, 0] ** 2, batch_size=50, generator=make_generator(seed, 0))
    rows = s.run(50)
    first = int(torch.nonzero(rows.accepted)[0]) if bool(rows.accepted.any()) else 50
    assert all(float(rows.x[i, 0]) == x0[0] for i in range(first))


def test_flow_mcmc_resume_is_bit_identical(flow_setup):
    model, log_p = flow_setup
    batch, n1, n2 = 8, 16, 21  # n1 % batch == 0
    whole = FlowMCMC(model, log_p, batch_size=batch, generator=make_generator(24), chain_id=5).run(n1 + n2)

    first = FlowMCMC(model, log_p, batch_size=batch, generator=make_generator(24), chain_id=5)
    part1 = first.run(n1)
    state = state_from_bytes(state_to_bytes(first.state_dict()))
    second = FlowMCMC(model, log_p, batch_size=batch, generator=make_generator(999), chain_id=0)
    second.load_state_dict(state)
    part2 = second.run(n2)
    assert not bool(part2.accepted.all())  # the continuation must lean on the restored state
    blocks_equal(SampleBlock.concat([part1, part2]), whole)
    # a second split point inside the chain (a multiple of the batch again)
    third = FlowMCMC(model, log_p, batch_size=batch, generator=make_generator(24), chain_id=5)
    blocks_equal(SampleBlock.concat([third.run(24), third.run(13)]), whole)


def test_flow_mcmc_rejects_a_foreign_state(flow_setup):
    model, log_p = flow_setup
    hmc = HMC(phi4().action, torch.zeros(2, 4, 4, dtype=F64), step_size=0.1, n_steps=2, generator=make_generator(1))
    sampler = FlowMCMC(model, log_p, batch_size=4, generator=make_generator(2))
    with pytest.raises(ValueError):
        sampler.load_state_dict(hmc.state_dict())
    with pytest.raises(ValueError):
        hmc.load_state_dict(sampler.state_dict())


# --- HMC ---------------------------------------------------------------------------------------


def make_hmc(theory, seed, b=8, **kw) -> HMC:
    x0 = 0.5 * torch.randn((b, *theory.lattice.shape), generator=make_generator(seed, 1), dtype=F64)
    opts = dict(step_size=0.1, n_steps=5, integrator="omelyan", step_jitter=0.3) | kw
    return HMC(theory.action, x0, generator=make_generator(seed), **opts)


def test_hmc_rows_and_resume_is_bit_identical():
    theory = phi4()
    whole = make_hmc(theory, 31, chain_offset=4, step_size=0.4, n_steps=3)
    whole.tune(10, 0.6)  # the tuned step size and step count travel in the state
    ref = whole.run(9)
    b = whole.n_chains
    assert len(ref) == 9 * b
    assert torch.equal(ref.chain, (torch.arange(b) + 4).repeat(9))
    assert torch.equal(ref.step, torch.arange(9).repeat_interleave(b))
    torch.testing.assert_close(ref.log_p, -theory.action(ref.x), rtol=0, atol=1e-12)
    assert 0 < ref.accepted.double().mean() < 1

    first = make_hmc(theory, 31, chain_offset=4, step_size=0.4, n_steps=3)
    first.tune(10, 0.6)
    part1 = first.run(4)
    state = state_from_bytes(state_to_bytes(first.state_dict()))
    second = make_hmc(theory, 77, step_size=0.3, n_steps=2)  # other start, stream and steps
    second.load_state_dict(state)
    assert (second.step_size, second.n_steps) == (first.step_size, first.n_steps)
    blocks_equal(SampleBlock.concat([part1, second.run(5)]), ref)


@pytest.mark.statistical
def test_hmc_gaussian_target(record_z):
    """S = sum_i x_i^2 / (2 sigma_i^2): <x_i^2> = sigma_i^2 and <x_i> = 0 for every component.

    Eight z-scores at |z| < 3 (largest |z| over 20 seed offsets: 2.78)."""
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
    b = 128
    x0 = torch.zeros(b, 4, dtype=F64)
    hmc = HMC(
        lambda x: 0.5 * ((x / sigma) ** 2).sum(1),
        x0,
        step_size=0.25,
        n_steps=8,
        generator=make_generator(stat_seed(32)),
        integrator="leapfrog",
        step_jitter=0.2,
    )
    hmc.run(20)
    rows = hmc.run(150)
    x = rows.x.reshape(150, b, 4)
    for i in range(4):
        r = gamma_method(list((x[:, :, i] ** 2).T.numpy()))
        z = (r.mean - sigma[i].item() ** 2) / r.err
        record_z(f"x{i}^2", z)
        assert abs(z) < 3, (i, r)
        assert r.err / r.mean < 0.03
        m = gamma_method(list(x[:, :, i].T.numpy()), known_mean=0.0)
        record_z(f"x{i}", m.mean / m.err)
        assert abs(m.mean) < 3 * m.err, (i, m)


def phi4_force_numpy(phi: np.ndarray, m2: float, lam: float) -> np.ndarray:
    """dS/dphi_x = 2 sum_mu (2 phi_x - phi_{x+mu} - phi_{x-mu}) + 2 m2 phi_x + 4 lam phi_x^3."""
    f = 2 * m2 * phi + 4 * lam * phi**3
    for mu in range(1, phi.ndim):
        f += 2 * (2 * phi - np.roll(phi, -1, axis=mu) - np.roll(phi, 1, axis=mu))
    return f


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_phi4_analytic_force_equals_autograd(shape):
    m2, lam = -1.3, 0.7
    theory = phi4(shape, m2, lam)
    phi = torch.randn((3, *shape), generator=make_generator(33), dtype=F64)
    expected = torch.from_numpy(phi4_force_numpy(phi.numpy(), m2, lam))
    torch.testing.assert_close(action_force(theory.action, phi), expected, rtol=1e-12, atol=1e-12)

    def force(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(phi4_force_numpy(x.numpy(), m2, lam))

    auto = make_hmc(theory, 34, b=3)
    analytic = make_hmc(theory, 34, b=3, force=force)
    a, b = auto.run(5), analytic.run(5)
    assert torch.equal(a.accepted, b.accepted)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_integrators_are_reversible(integrator):
    theory = phi4((4, 4), m2=-1.0, lam=0.8)
    hmc = make_hmc(theory, 35, b=4, integrator=integrator)
    x0 = hmc.x
    p0 = torch.randn(x0.shape, generator=make_generator(36), dtype=F64)
    x1, p1 = hmc._integrate(x0, p0, 0.05, 40)
    assert (x1 - x0).abs().max() > 0.1  # it went somewhere
    x2, p2 = hmc._integrate(x1, -p1, 0.05, 40)
    torch.testing.assert_close(x2, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(-p2, p0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_energy_violation_scales_as_step_size_squared(integrator):
    theory = phi4((4, 4), m2=-1.0, lam=0.8)
    hmc = make_hmc(theory, 37, b=16, integrator=integrator)
    x0 = hmc.x
    p0 = torch.randn(x0.shape, generator=make_generator(38), dtype=F64)

    def hamiltonian(x, p):
        return 0.5 * p.flatten(1).pow(2).sum(1) + theory.action(x)

    h0 = hamiltonian(x0, p0)
    viol = []
    for n in (10, 20, 40):  # trajectory length 1
        x1, p1 = hmc._integrate(x0, p0, 1.0 / n, n)
        viol.append((hamiltonian(x1, p1) - h0).abs().mean().item())
    slopes = np.log2(np.array(viol[:-1]) / np.array(viol[1:]))
    assert np.all(np.abs(slopes - 2) < 0.25), (viol, slopes)


def test_omelyan_beats_leapfrog_at_equal_step():
    """The minimum-norm coefficient makes Omelyan's energy violation ~20x smaller at equal step size
    (it costs two forces per step); a wrong coefficient would leave it at the leapfrog level."""
    theory = phi4((4, 4), m2=-1.0, lam=0.8)
    viol = {}
    for integrator in ("leapfrog", "omelyan"):
        hmc = make_hmc(theory, 37, b=16, integrator=integrator)
        p0 = torch.randn(hmc.x.shape, generator=make_generator(38), dtype=F64)
        x1, p1 = hmc._integrate(hmc.x, p0, 0.1, 10)
        h0 = 0.5 * p0.flatten(1).pow(2).sum(1) + theory.action(hmc.x)
        h1 = 0.5 * p1.flatten(1).pow(2).sum(1) + theory.action(x1)
        viol[integrator] = (h1 - h0).abs().mean().item()
    assert viol["omelyan"] < 0.1 * viol["leapfrog"], viol


@pytest.mark.parametrize("start, target", [(0.05, 0.8), (0.5, 0.65)])
def test_tune_reaches_the_target_acceptance(start, target):
    """From a step size 4x too small or 2x too large (60 tuning trajectories; from 10x off the
    Robbins-Monro gain needs ~200). ``n_steps`` is an integer, so the acceptance is quantised."""
    theory = phi4((6, 6), m2=-1.0, lam=0.8)
    hmc = make_hmc(
        theory, 39, b=32, step_size=start, n_steps=max(1, round(1.0 / start)), integrator="leapfrog", step_jitter=0.1
    )
    hmc.run(10)
    eps = hmc.tune(60, target)
    assert eps == hmc.step_size and hmc.n_steps * eps == pytest.approx(start * max(1, round(1.0 / start)))
    acc = hmc.run(40).accepted.double().mean().item()
    assert abs(acc - target) < 0.12, (start, eps, acc)
