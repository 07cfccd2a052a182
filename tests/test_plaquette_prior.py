"""The plaquette prior for 2D U(1) (latflow.plaquette_prior) and flow-MCMC on top of it.

- its log density against a direct site-by-site calculation, its gauge and translation invariance, and
  that ``log_prob`` of a draw is the density the draw was made with;
- an independent check that the draws follow the density: expectations under the prior computed from
  its draws and, by importance sampling, from uniform (Haar) links weighted by the density; the mean
  weight is the normalisation (1);
- the importance weights of the Wilson action: their mean is the exact partition function;
- flow-MCMC with the prior alone, and with gauge-equivariant couplings on top, reproduces the exact
  plaquette, ``<Q^2>`` and ``<Q> = 0`` at beta = 6 and 8 on 8x8 and 16x16 tori (chains that HMC freezes in).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import stat_seed
from scipy import stats
from scipy.special import ive

from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.flows.model import FlowModel
from latflow.gauge import random_u1_gauge_transform, u1_gauge_transform, u1_plaquette_angles
from latflow.lattice import Lattice
from latflow.plaquette_prior import U1PlaquettePrior, VonMisesPlaquette, u1_links_with_plaquettes
from latflow.rng import make_generator
from latflow.samplers import FlowMCMC
from latflow.theories.u1 import U1GaugeAction, U1Params, exact_plaquette, exact_q2, sample_exact_2d

F64 = torch.float64
TWO_PI = 2 * math.pi


def _log_i0(beta: float) -> float:
    return math.log(ive(0, beta)) + beta


def _direct_log_density(theta: np.ndarray, beta: float, symmetric: bool) -> float:
    """The prior's log density for one configuration ``[2, L0, L1]``, site by site in plain Python."""
    _, l0, l1 = theta.shape
    cos = []
    for t in range(l0):
        for x in range(l1):
            p = theta[0, t, x] + theta[1, (t + 1) % l0, x] - theta[0, t, (x + 1) % l1] - theta[1, t, x]
            cos.append(math.cos(p))
    v = l0 * l1
    if symmetric:
        density = sum(math.exp(beta * (sum(cos) - c)) for c in cos) / v
    else:
        density = math.exp(beta * (sum(cos) - cos[-1]))
    return math.log(density) - (v - 1) * _log_i0(beta) - 2 * v * math.log(TWO_PI)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(3, 2), (4, 4), (2, 5)])
def test_log_density_against_direct_calculation(shape: tuple[int, int], symmetric: bool) -> None:
    prior = U1PlaquettePrior(Lattice(shape), 2.5, symmetric=symmetric)
    g = make_generator(7)
    theta, log_r = prior.sample(6, g)
    rough = TWO_PI * torch.rand(6, 2, *shape, generator=g, dtype=F64)  # not a draw of the prior
    for links in (theta, rough):
        got = prior.log_prob(links)
        want = [_direct_log_density(c.numpy(), 2.5, symmetric) for c in links]
        torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(prior.log_prob(theta), log_r, rtol=0, atol=1e-9)
    assert torch.all(theta > -math.pi) and torch.all(theta <= math.pi)


@pytest.mark.statistical
@pytest.mark.parametrize("beta", [0.0, 1e-7, 0.5, 3.0, 8.0, 100.0])
def test_von_mises_draws(beta: float) -> None:
    """The torch rejection sampler against scipy's von Mises CDF (Kolmogorov-Smirnov, p > 1e-3)."""
    x = VonMisesPlaquette(beta).sample((40_000,), make_generator(stat_seed(50))).numpy()
    assert x.shape == (40_000,) and np.all(x > -math.pi) and np.all(x <= math.pi)
    cdf = stats.vonmises(beta).cdf if beta > 0 else stats.uniform(-math.pi, TWO_PI).cdf
    assert stats.kstest(x, cdf).pvalue > 1e-3
    # and the log density is normalised: E_uniform[exp(log_prob)] = 1 by quadrature
    t = torch.linspace(-math.pi, math.pi, 20_001, dtype=F64)[:-1]
    mean = torch.exp(VonMisesPlaquette(beta).log_prob(t)).mean().item()
    assert abs(mean - 1) < 1e-10


def test_gauge_and_translation_invariance() -> None:
    shape = (6, 4)
    g = make_generator(3)
    for symmetric in (True, False):
        prior = U1PlaquettePrior(Lattice(shape), 4.0, symmetric=symmetric)
        theta, log_r = prior.sample(8, g)
        alpha = random_u1_gauge_transform((8, *shape), g)
        torch.testing.assert_close(prior.log_prob(u1_gauge_transform(theta, alpha)), log_r, rtol=0, atol=1e-9)
        shifted = prior.log_prob(theta.roll((1, 2), dims=(2, 3)))
        if symmetric:
            torch.testing.assert_close(shifted, log_r, rtol=0, atol=1e-9)
        else:  # the closing plaquette sits at a fixed site: a shift changes the density
            assert (shifted - log_r).abs().max() > 1e-3


def test_reproducible_devices_dtypes_and_errors() -> None:
    lat = Lattice((4, 4))
    a, la = U1PlaquettePrior(lat, 3.0).sample(5, make_generator(1))
    b, lb = U1PlaquettePrior(lat, 3.0).sample(5, make_generator(1))
    assert torch.equal(a, b) and torch.equal(la, lb)
    c, lc = U1PlaquettePrior(lat, 3.0, dtype=torch.float32).sample(5, make_generator(1))
    assert c.dtype == torch.float32 and lc.dtype == F64
    # the closing plaquette keeps the global constraint: the plaquettes sum to 2 pi Q, Q an integer
    q = u1_plaquette_angles(a)[:, 0].sum(dim=(1, 2)) / TWO_PI
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-9)
    model = FlowModel(U1PlaquettePrior(lat, 3.0), []).to(dtype=torch.float32)
    assert model.sample(2, make_generator(2))[0].dtype == torch.float32
    with pytest.raises(ValueError, match="2D"):
        U1PlaquettePrior(Lattice((4, 4, 4)), 1.0)
    with pytest.raises(ValueError, match="beta"):
        VonMisesPlaquette(-1.0)
    with pytest.raises(ValueError, match="beta"):
        VonMisesPlaquette(math.inf)
    with pytest.raises(ValueError):
        u1_links_with_plaquettes(torch.zeros(4, 4), make_generator(0))


def _test_functions(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gauge-invariant functions of 2x2 links: plaquette moments, a plaquette pair, Polyakov and Wilson lines."""
    p = u1_plaquette_angles(theta)[:, 0]
    poly_t = theta[:, 0].sum(dim=1)  # [B, L1]: Polyakov loops along axis 0
    poly_x = theta[:, 1].sum(dim=2)  # [B, L0]: along axis 1
    return {
        "cos_p00": torch.cos(p[:, 0, 0]),
        "cos_p11": torch.cos(p[:, 1, 1]),
        "cos2_sum": torch.cos(p).pow(2).sum(dim=(1, 2)),
        "cos_p00_cos_p01": torch.cos(p[:, 0, 0]) * torch.cos(p[:, 0, 1]),
        "sin_p00_sin_p10": torch.sin(p[:, 0, 0]) * torch.sin(p[:, 1, 0]),
        "poly_t_cos": torch.cos(poly_t).mean(dim=1),
        "poly_t_pair": torch.cos(poly_t[:, 0] - poly_t[:, 1]),  # = cos of the 2 x 2 loop: depends on plaquettes
        "poly_x_cos": torch.cos(poly_x).mean(dim=1),
    }


@pytest.mark.statistical
@pytest.mark.parametrize("symmetric", [True, False])
def test_draws_follow_the_density(symmetric: bool, record_z) -> None:
    """E_r[f] from the prior's draws against E_Haar[f r] / E_Haar[r] from uniform links (2x2, beta 1.5).

    Both estimates and the normalisation ``E_Haar[r (2 pi)^{2V}] = 1`` carry their own standard errors
    (independent draws); 9 z-scores, each within 3.5 sigma (family-wise false alarm ~4e-3).
    """
    shape, beta, n = (2, 2), 1.5, 200_000
    prior = U1PlaquettePrior(Lattice(shape), beta, symmetric=symmetric)
    g = make_generator(stat_seed(60 + int(symmetric)))
    theta, _ = prior.sample(n, g)
    uniform = math.pi - TWO_PI * torch.rand(n, 2, *shape, generator=g, dtype=F64)
    w = torch.exp(prior.log_prob(uniform) + 8 * math.log(TWO_PI))  # density w.r.t. the Haar probability
    z = {"normalisation": (w.mean().item() - 1) / (w.std().item() / math.sqrt(n))}
    f_prior, f_uniform = _test_functions(theta), _test_functions(uniform)
    for name, f in f_prior.items():
        a, a_err = f.mean().item(), f.std().item() / math.sqrt(n)
        fw = f_uniform[name] * w
        # ratio estimator E[f w] / E[w] and its delta-method error
        b = fw.mean().item() / w.mean().item()
        b_err = (fw - b * w).std().item() / math.sqrt(n) / w.mean().item()
        z[name] = (a - b) / math.hypot(a_err, b_err)
    for k, v in z.items():
        record_z(k, v, 3.5)
    assert all(abs(v) < 3.5 for v in z.values()), z
    # the checks have teeth: the plaquette moment differs from its Haar value 0 by many errors
    assert f_prior["cos_p00"].mean() > 0.4


@pytest.mark.statistical
@pytest.mark.parametrize(("beta", "shape"), [(2.0, (4, 4)), (6.0, (8, 8))])
def test_importance_weights_estimate_the_partition_function(beta: float, shape: tuple[int, int], record_z) -> None:
    """``E_r[exp(-S) / r] = Z``: the mean weight over independent draws against the exact Z."""
    n = 40_000
    prior = U1PlaquettePrior(Lattice(shape), beta)
    theory = U1GaugeAction(U1Params(beta), Lattice(shape))
    theta, log_r = prior.sample(n, make_generator(stat_seed(70 + int(beta))))
    # log Z with the Lebesgue measure of log r: the Haar-normalised exact value plus log (2 pi)^{2V}
    log_w = -theory.action(theta) - log_r - (theory.exact_log_z() + theory.field_log_volume())
    w = torch.exp(log_w)
    z = (w.mean().item() - 1.0) / (w.std().item() / math.sqrt(n))
    record_z("mean_weight", z)
    assert abs(z) < 3, (z, w.mean().item())
    ess = (w.sum() ** 2 / (w.pow(2).sum() * n)).item()
    assert ess > 0.3, ess  # beats the fixed-site closing plaquette's I_0(b)^2 / I_0(2b) (0.24 at beta 6)


N_CHAINS, N_STEPS = 16, 1000


def flow_chains_from_exact_starts(
    model: FlowModel,
    beta: float,
    shape: tuple[int, int],
    seed: int,
    n_chains: int = N_CHAINS,
    n_steps: int = N_STEPS,
    batch_size: int = 500,
) -> tuple[dict[str, np.ndarray], float]:
    """``n_chains`` independence-Metropolis chains of ``n_steps``, each started from an exact independent
    sample of the torus (in equilibrium from its first step, so the chain means are independent unbiased
    estimates whatever the autocorrelation). Returns the observables ``[chains, steps]`` and the acceptance.
    """
    theory = U1GaugeAction(U1Params(beta), Lattice(shape))

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return -theory.action(x)

    starts = sample_exact_2d(beta, shape, n_chains, make_generator(seed))
    with torch.no_grad():
        s_lp, s_lq = log_p(starts), model.log_prob(starts)
    obs: dict[str, list[np.ndarray]] = {}
    accepted = 0
    for c in range(n_chains):
        g = make_generator(seed, 1 + c)
        sampler = FlowMCMC(model, log_p, batch_size=batch_size, generator=g, chain_id=c)
        # the chain's state: the exact start (a resumed chain, in the sampler's own state format)
        state = {"kind": sampler.kind, "step": 0, "chain_id": c, "generator": g.get_state()}
        sampler.load_state_dict({**state, "x": starts[c], "log_p": s_lp[c], "log_q": s_lq[c]})
        block = sampler.run(n_steps)
        accepted += int(block.accepted.sum())
        for name, values in theory.observables(block.x).items():
            obs.setdefault(name, []).append(values.numpy())
    return {k: np.stack(v) for k, v in obs.items()}, accepted / (n_chains * n_steps)


def _check_exact(obs: dict[str, np.ndarray], beta: float, shape: tuple[int, int], record_z) -> dict[str, float]:
    """Equivalent-normal z-scores of the chain means against the exact torus values.

    The error comes from the spread of ``C`` independent chain means, so ``(mean - exact) / err`` follows a
    Student t distribution with ``C - 1`` degrees of freedom, whose tails are heavier than a Gaussian's (with
    ``C = 16``, ``|t| > 3`` happens 0.9% of the time instead of 0.27%). It is mapped to the normal z with the
    same two-sided tail probability, so that the |z| < 3 bound means what it says.
    """
    z = {}
    for name, exact in (
        ("plaquette", exact_plaquette(beta, shape)),
        ("topological_charge_sq", exact_q2(beta, shape)),
        ("topological_charge", 0.0),
    ):
        means = obs[name].mean(axis=1)  # independent chain means (exact starts)
        t = (means.mean() - exact) / (means.std(ddof=1) / math.sqrt(means.size))
        z[name] = math.copysign(float(stats.norm.isf(stats.t.sf(abs(t), means.size - 1))), t)
        record_z(name, z[name])
    return z


@pytest.mark.statistical
@pytest.mark.parametrize("shape", [(8, 8), (16, 16)])
@pytest.mark.parametrize("beta", [6.0, 8.0])
def test_prior_alone_reproduces_exact_torus_values(beta: float, shape: tuple[int, int], record_z) -> None:
    """The plaquette prior as an independence-Metropolis proposal, at couplings where HMC freezes."""
    model = FlowModel(U1PlaquettePrior(Lattice(shape), beta), [])
    obs, acceptance = flow_chains_from_exact_starts(model, beta, shape, stat_seed(80 + int(beta) + shape[0]))
    assert acceptance > 0.3, acceptance
    z = _check_exact(obs, beta, shape, record_z)
    assert all(abs(v) < 3 for v in z.values()), (z, acceptance)
    # the check has teeth: the chains resolve <Q^2> to better than 10% (about 3 independent Q per 10 steps)
    means = obs["topological_charge_sq"].mean(axis=1)
    assert means.std(ddof=1) / math.sqrt(means.size) < 0.1 * exact_q2(beta, shape)


@pytest.mark.statistical
@pytest.mark.parametrize("beta", [6.0, 8.0])
def test_flow_on_plaquette_prior_reproduces_exact_torus_values(beta: float, record_z) -> None:
    """Gauge-equivariant couplings (random, untrained weights) on top of the prior: still exact."""
    shape = (8, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        prior = U1PlaquettePrior(Lattice(shape), beta)
        model = make_u1_equivariant_flow(Lattice(shape), 8, "spline", (4,), prior=prior)
        for p in model.parameters():  # a small random perturbation of the prior: acceptance stays usable
            p.data.mul_(0.1)
    obs, acceptance = flow_chains_from_exact_starts(model, beta, shape, stat_seed(90 + int(beta)))
    assert 0.05 < acceptance, acceptance
    z = _check_exact(obs, beta, shape, record_z)
    assert all(abs(v) < 3 for v in z.values()), (z, acceptance)
