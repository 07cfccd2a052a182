"""Particle independent Metropolis-Hastings and stochastic normalising flows.

Reference problem: the Gaussian anneal from the prior ``N(0, 1)^D`` to the unnormalised target
``exp(-|x - mu|^2 / (2 sigma^2))``, ``D = 8``, whose ``log Z = (D/2) log(2 pi sigma^2)``, ``<x> = mu`` and
``<x^2> = mu^2 + sigma^2`` are exact; and the free scalar field (``theories/phi4.py``, ``free_log_z``).

- PIMH: chain means of ``x`` and ``x^2`` against exact (Gamma method, chains as replicas), with systems of so few
  particles that the chosen particle of a single system is visibly biased; acceptance in ``(0, 1]``; the
  ``log mean exp`` of the per-step ``log Z_hat``; rows (rejections repeat the state); ``state_dict`` round trip
  continues bit for bit.
- SNF: with identity flows and Metropolis layers the particles and weights are AIS's; ``log Z`` (``log mean exp``
  of the weights, z-score from the spread of independent batches) for Metropolis and Langevin layers, before and
  after a short training; training lowers the loss and raises the ESS; free ``phi^4`` ``log Z`` with affine
  couplings.

``log Z`` z-scores are built on the linear scale: ``Z_hat_b / Z`` of independent batches have mean 1 exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import stat_seed
from torch import nn

from latflow.analysis import gamma_method
from latflow.flows.layers import AffineCoupling
from latflow.lattice import Lattice
from latflow.priors import NormalPrior
from latflow.rng import make_generator
from latflow.samplers import SampleBlock, state_from_bytes, state_to_bytes
from latflow.samplers.annealing import (
    AIS,
    PIMH,
    SMC,
    SNF,
    AnnealResult,
    GeometricPath,
    Langevin,
    RandomWalkMetropolis,
)
from latflow.theories.phi4 import Phi4Params, Phi4Theory, free_log_z, free_phi2

F64 = torch.float64
D, MU, SIGMA = 8, 0.5, 0.8
EXACT_LOG_Z = 0.5 * D * math.log(2 * math.pi * SIGMA**2)


def gaussian_path() -> GeometricPath:
    """``N(0, 1)^D`` to ``exp(-|x - mu|^2 / (2 sigma^2))`` (unnormalised)."""
    return GeometricPath(NormalPrior((D,), 1.0), lambda x: -0.5 * ((x - MU) / SIGMA).pow(2).sum(1))


class ElementwiseAffine(nn.Module):
    """``y = x exp(s) + b`` per component (identity at initialisation); ``logJ = sum s`` ``[B]``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(shape, dtype=F64))
        self.shift = nn.Parameter(torch.zeros(shape, dtype=F64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * torch.exp(self.log_scale) + self.shift, self.log_scale.sum().expand(x.shape[0])


def z_score_log_z(log_z: torch.Tensor, exact: float) -> float:
    """z-score of ``mean(Z_hat_b / Z) = 1`` from independent batch estimates ``log_z`` ``[P]``."""
    r = torch.exp(log_z.double() - exact)
    return float((r.mean() - 1.0) / (r.std() / math.sqrt(r.numel())))


def blocks_equal(a: SampleBlock, b: SampleBlock) -> None:
    for name in SampleBlock.__dataclass_fields__:
        ta, tb = getattr(a, name), getattr(b, name)
        if ta is None or tb is None:
            assert ta is None and tb is None, name
        else:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


# --- PIMH --------------------------------------------------------------------------------------


@pytest.mark.statistical
def test_pimh_samples_the_gaussian_target(record_z):
    """16 chains x 250 steps over SMC systems of 8 particles and 3 transitions: the chains' <x> and <x^2> are
    exact within 3 sigma (Gamma method, chains as replicas), although the chosen particle of one such system
    is biased (checked on the unrecorded first systems of many chains); log mean exp of every system's
    log Z_hat is exact within 3 sigma."""
    seed = stat_seed(1101)
    n_chains, n_steps = 16, 250
    smc = SMC(gaussian_path(), RandomWalkMetropolis(0.4, 2), 3)
    pimh = PIMH(smc, 8, n_chains=n_chains, generator=make_generator(seed))
    block = pimh.run(n_steps)
    assert len(block) == n_chains * n_steps
    x = block.x.view(n_steps, n_chains, D)
    for name, obs, exact in (("x", x.mean(-1), MU), ("x^2", x.pow(2).mean(-1), MU**2 + SIGMA**2)):
        r = gamma_method(obs.T.numpy())
        z = (r.mean - exact) / r.err
        record_z(f"pimh {name}", z)
        assert abs(z) < 3, (name, r, exact)
    acc = pimh.acceptance_rate
    assert acc.shape == (n_chains,) and bool(((acc > 0) & (acc <= 1)).all()), acc
    assert 0.3 < float(acc.mean()) < 0.95, acc  # both accepts and rejects: the test has teeth
    assert float(block.accepted.double().mean()) == pytest.approx(float(acc.mean()))
    # every system's log Z_hat, accepted or not, is an independent unbiased estimate
    all_log_z = torch.cat(pimh.proposal_log_z)
    assert all_log_z.shape == ((n_steps + 1) * n_chains,)
    z = z_score_log_z(all_log_z, EXACT_LOG_Z)
    record_z("pimh log Z", z)
    assert abs(z) < 3, (pimh.log_z_estimate(), EXACT_LOG_Z)
    assert pimh.log_z_estimate() == pytest.approx(float(torch.logsumexp(all_log_z, 0) - math.log(all_log_z.numel())))
    torch.testing.assert_close(block.proposal_log_w, torch.cat(pimh.proposal_log_z[1:]).to(block.log_p))


@pytest.mark.statistical
def test_pimh_corrects_the_bias_of_small_systems(record_z):
    """The particle chosen from one system of 8 particles (the unrecorded start) has a biased <x^2>: the
    control that makes the exactness test above meaningful."""
    seed = stat_seed(1102)
    smc = SMC(gaussian_path(), RandomWalkMetropolis(0.4, 2), 3)
    pimh = PIMH(smc, 8, n_chains=8000, generator=make_generator(seed))
    pimh._start()
    assert pimh.x is not None
    x2 = pimh.x.pow(2).mean(-1).numpy()
    z = (x2.mean() - (MU**2 + SIGMA**2)) / (x2.std(ddof=1) / math.sqrt(x2.size))
    record_z("single-system <x^2> bias", z, bound=float("inf"))
    assert abs(z) > 4, (x2.mean(), z)  # measured: z ~ -8 (the particles lag behind the anneal)


def test_pimh_rows_and_resume_bit_for_bit():
    """Rows: step-major, consecutive steps per chain, chain ids, rejected rows repeat the state, log_p is the
    target's; run(7), state through bytes, a new PIMH, run(5) equals run(12); a callable sampler works."""
    path = gaussian_path()
    smc = SMC(path, RandomWalkMetropolis(0.4, 2), 3)
    ref = PIMH(smc, 8, n_chains=3, generator=make_generator(11), chain_offset=5)
    whole = ref.run(12)
    assert whole.x.shape == (36, D)
    assert torch.equal(whole.step, torch.arange(12).repeat_interleave(3))
    assert torch.equal(whole.chain, torch.tensor([5, 6, 7]).repeat(12))
    assert torch.equal(whole.log_w, torch.zeros(36, dtype=whole.log_p.dtype))
    torch.testing.assert_close(whole.log_p, path.log_target(whole.x), rtol=0, atol=1e-12)
    x = whole.x.view(12, 3, D)
    acc = whole.accepted.view(12, 3)
    assert bool(acc.any()) and not bool(acc.all())
    for s in range(1, 12):
        for c in range(3):
            if not acc[s, c]:
                assert torch.equal(x[s, c], x[s - 1, c])

    first = PIMH(smc, 8, n_chains=3, generator=make_generator(11), chain_offset=5)
    a = first.run(7)
    blob = state_to_bytes(first.state_dict())
    second = PIMH(
        lambda n, g, n_populations: smc.run(n, g, n_populations=n_populations),
        8,
        n_chains=3,
        generator=make_generator(999),
    )
    second.load_state_dict(state_from_bytes(blob))
    b = second.run(5)
    blocks_equal(SampleBlock.concat([a, b]), whole)
    assert torch.equal(second.n_accepted, ref.n_accepted) and second.n_proposed == ref.n_proposed == 12
    with pytest.raises(ValueError, match="chains"):
        PIMH(smc, 8, n_chains=2, generator=make_generator(1)).load_state_dict(first.state_dict())


# --- SNF ---------------------------------------------------------------------------------------


def test_snf_with_identity_flows_and_metropolis_is_ais():
    """Reversibility identity: Metropolis layers make log[B/F] = log gamma_k(y_k) - log gamma_k(x_k), so with
    identity flows the SNF weight telescopes into AIS's; with the same stream the particles agree bit for bit."""
    path = gaussian_path()
    kernel = RandomWalkMetropolis(0.4, 3)
    snf = SNF(path, None, kernel, 6)
    res = AIS(path, kernel, 6).run(300, make_generator(5), n_populations=2)
    x, log_w = snf.sample(600, make_generator(5))
    assert torch.equal(x, res.x)
    ais_log_w = (res.log_w + res.log_z[:, None] + math.log(300)).reshape(-1)  # unnormalised AIS weights
    torch.testing.assert_close(log_w, ais_log_w, rtol=0, atol=1e-10)
    # zero-initialised affine couplings are the identity as well (on a 1D lattice of D sites)
    lat = Lattice((D,))
    flows = [AffineCoupling(lat.checkerboard(k % 2), (4,), zero_init=True).double() for k in range(6)]
    x2, log_w2 = SNF(path, flows, kernel, 6).sample(600, make_generator(5))
    assert torch.equal(x2, x)
    torch.testing.assert_close(log_w2, log_w, rtol=0, atol=1e-12)


def _gaussian_snf(layer: str, n_blocks: int, weak: bool = False) -> SNF:
    """SNF with elementwise affine flows (identity at start); ``weak`` stochastic layers leave more to the flows."""
    if layer == "metropolis":
        stochastic = RandomWalkMetropolis(0.4, 2 if weak else 3)
    else:
        stochastic = Langevin(0.1, 1) if weak else Langevin(0.2, 2)
    return SNF(gaussian_path(), [ElementwiseAffine((D,)) for _ in range(n_blocks)], stochastic, n_blocks)


@pytest.mark.statistical
@pytest.mark.parametrize("layer", ["metropolis", "langevin"])
def test_snf_log_z_before_training(layer, record_z):
    """Untrained (identity) flows, 12 blocks: log Z from 40 batches of 500 paths within 3 sigma; the result
    is an AnnealResult with one population per batch."""
    seed = stat_seed(1110 + (layer == "langevin"))
    snf = _gaussian_snf(layer, 12)
    res = snf.run(500, make_generator(seed), n_populations=40)
    assert isinstance(res, AnnealResult) and res.log_w.shape == (40, 500) and res.x.shape == (20000, D)
    torch.testing.assert_close(torch.logsumexp(res.log_w, 1), torch.zeros(40, dtype=F64))
    torch.testing.assert_close(res.log_p, gaussian_path().log_target(res.x))
    assert len(res.acceptance) == 12 and all(0 < a <= 1 for a in res.acceptance)
    z = z_score_log_z(res.log_z, EXACT_LOG_Z)
    record_z(f"snf {layer} log Z", z)
    assert abs(z) < 3, (float(torch.logsumexp(res.log_z, 0) - math.log(40)), EXACT_LOG_Z)


@pytest.mark.statistical
@pytest.mark.parametrize("layer", ["metropolis", "langevin"])
def test_snf_training_improves_and_keeps_log_z(layer, record_z):
    """4 blocks of elementwise affine flows, weak stochastic layers: 60 Adam steps of 128 paths lower
    -mean(log w) by more than 1 (measured: 1.5-1.7, to within 0.1 of its bound -log Z) and raise the ESS
    fraction from ~0.15 to ~0.9
    (asserted: > 0.6 and at least 3x); log Z after training is exact within 3 sigma."""
    seed = stat_seed(1120 + (layer == "langevin"))
    torch.manual_seed(0)  # parameters start at zero anyway; no random initialisation
    snf = _gaussian_snf(layer, 4, weak=True)
    gen = make_generator(seed)
    before = snf.run(2000, gen)
    loss = snf.loss(64, gen)
    loss.backward()
    grads = [p.grad for p in snf.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert all(float(g.abs().max()) > 0 for g in grads), "every block's flow gets a gradient"
    for p in snf.parameters():
        p.grad = None
    history = snf.train(60, 128, 0.05, gen)
    assert len(history) == 60 and all(math.isfinite(v) for v in history)
    after = snf.run(500, gen, n_populations=40)
    loss_before, loss_after = -float(before.extra["mean_log_w"][0]), -float(after.extra["mean_log_w"].mean())
    assert loss_after < loss_before - 1.0, (loss_before, loss_after)
    assert loss_after > -EXACT_LOG_Z - 0.2  # -E log w >= -log Z (Jensen); close to it after training
    ess_before, ess_after = float(before.final_ess()[0]), float(after.final_ess().mean())
    assert ess_after > 0.6 and ess_after > 3 * ess_before, (ess_before, ess_after)
    z = z_score_log_z(after.log_z, EXACT_LOG_Z)
    record_z(f"snf {layer} trained log Z", z)
    assert abs(z) < 3, (after.log_z, EXACT_LOG_Z)


@pytest.mark.statistical
def test_snf_free_phi4_log_z(record_z):
    """Free field on 4x4, m2 = 1: prior N(0, <phi^2>) per site (the exact one-site variance, no correlations),
    4 blocks of a zero-initialised affine coupling and two Langevin steps, 30 Adam steps (ESS ~0.3 -> ~0.6);
    log Z against free_log_z within 3 sigma."""
    seed = stat_seed(1130)
    lat = Lattice((4, 4))
    theory = Phi4Theory(Phi4Params(1.0, 0.0), lat)
    prior = NormalPrior(lat.shape, math.sqrt(free_phi2(lat.shape, 1.0)))
    path = GeometricPath(prior, lambda x: -theory.action(x))
    torch.manual_seed(0)
    flows = [AffineCoupling(lat.checkerboard(k % 2), (4,), zero_init=True).double() for k in range(4)]
    snf = SNF(path, flows, Langevin(0.02, 2), 4)
    gen = make_generator(seed)
    snf.train(30, 64, 0.01, gen)
    # 30 x 1000 particles: with 20 x 500 the skew of log Z per population left z at -3.07 at one of 20 offsets
    # (mean z -0.23); at 30 x 1000 offsets 0-19 give mean -0.15, spread 0.93, largest |z| 2.42
    res = snf.run(1000, gen, n_populations=30)
    exact = free_log_z(lat.shape, 1.0)
    z = z_score_log_z(res.log_z, exact)
    record_z("snf phi4 log Z", z)
    assert abs(z) < 3, (float(torch.logsumexp(res.log_z, 0) - math.log(30)), exact)
    assert float(res.final_ess().mean()) > 0.35, res.final_ess()
