"""Schwinger-model flows on the plaquette prior: the fermionic training target and exactness of the samplers.

- the stochastic gradient of ``log det(D^dag D)`` (:mod:`latflow.fermions.stochastic_logdet`) agrees in
  expectation with the autograd gradient of the exact dense ``logdet`` on 4x4 (Hotelling's T^2 over the 32
  link components, and the z-score of the projection on the exact gradient), for Z2 and Gaussian noise;
- the training target (:func:`latflow.fermions.training_target.training_action`): which action each
  ``train.target`` selects, the stochastic effective action's value (``S_g``) and gradient, training steps;
- exactness: flow-MCMC with the exact determinant and the joint pseudofermion chain, each with the plaquette
  prior alone and with four gauge-equivariant couplings of small random weights on top, reproduce the
  exact-determinant plaquette, ``<Q^2>`` and chiral condensate on 4x4 at beta = 2 (the references of
  ``tests/test_pf_flow_mcmc.py``) within 3 sigma, the error from the spread of independent chains.

Seeds come from ``stat_seed``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from conftest import stat_seed
from scipy.stats import f as f_dist
from test_pf_flow_mcmc import DISPERSION, OBS, chain_observables, z_against_reference

from latflow.fermions.conditional import TriangularConditional
from latflow.fermions.stochastic_logdet import StochasticLogdetGradient
from latflow.fermions.training_target import StochasticEffectiveAction, training_action
from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.flows.model import FlowModel
from latflow.lattice import Lattice
from latflow.plaquette_prior import U1PlaquettePrior
from latflow.rng import make_generator
from latflow.samplers import FlowMCMC, PseudofermionFlowMCMC
from latflow.theories.schwinger import SchwingerModel, SchwingerParams

F64 = torch.float64
BETA = 2.0
SHAPE = (4, 4)
LAT = Lattice(SHAPE)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def plaquette_flow(n_layers: int, seed: int = 3, width: float = 0.05) -> FlowModel:
    """The plaquette prior at ``BETA``, then ``n_layers`` spline couplings with small random weights."""
    torch.manual_seed(seed)
    model = make_u1_equivariant_flow(
        LAT, n_layers, inner="spline", hidden=(8,), n_bins=8, zero_init=True, prior=U1PlaquettePrior(LAT, BETA)
    )
    with torch.no_grad():
        g = gen(seed)
        for p in model.parameters():
            p.add_(width * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------ stochastic logdet gradient
@pytest.mark.statistical
@pytest.mark.parametrize("noise", ["z2", "gaussian"])
def test_stochastic_logdet_gradient_is_unbiased(noise: str, record_z) -> None:
    """4000 single-noise estimates of ``d log det(D^dag D)/d theta`` on one 4x4 configuration at kappa = 0.25
    against autograd of the dense logdet: Hotelling's T^2 over the 32 components (p-value > 1e-3) and the
    projection on the exact gradient (|z| < 3)."""
    seed = stat_seed(71 + len(noise))
    theory = SchwingerModel(SchwingerParams(BETA, 0.25), LAT)
    theta = plaquette_flow(0).sample(1, gen(seed))[0]
    x = theta.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(theory.fermion_logdet(x).sum(), x)
    n = 4000
    est = StochasticLogdetGradient(theory.dirac, gen(seed + 1), noise=noise, tol=1e-12)
    g = est.gradient(theta.expand(n, -1, -1, -1)).reshape(n, -1).numpy()  # [n, 32]
    d = g.mean(axis=0) - exact.reshape(-1).numpy()
    cov = np.cov(g, rowvar=False)
    p = d.size
    t2 = n * d @ np.linalg.solve(cov, d)
    f = t2 * (n - p) / (p * (n - 1))  # Hotelling: F(p, n - p)
    p_value = float(f_dist.sf(f, p, n - p))
    u = exact.reshape(-1).numpy()
    u = u / np.linalg.norm(u)
    proj = g @ u
    z = float((proj.mean() - exact.reshape(-1).numpy() @ u) / (proj.std(ddof=1) / math.sqrt(n)))
    record_z("projection", z)
    rel_sd = float(proj.std(ddof=1) / np.linalg.norm(exact.numpy()))
    print(f"{noise}: T^2 p-value {p_value:.3f}, projection z {z:+.2f}, single-noise sd / |grad| {rel_sd:.2f}")
    assert p_value > 1e-3 and abs(z) < 3, (p_value, z)


def test_zero_value_term_and_effective_action() -> None:
    theory = SchwingerModel(SchwingerParams(BETA, 0.25), LAT)
    theta = plaquette_flow(0).sample(3, gen(5))[0]
    est = StochasticLogdetGradient(theory.dirac, gen(6), n_noise=2)
    x = theta.clone().requires_grad_(True)
    z = est.zero_value_term(x)
    assert z.shape == (3,) and torch.equal(z, torch.zeros(3, dtype=F64))
    assert est.last_iterations is not None and est.last_iterations.shape == (6,)
    action = StochasticEffectiveAction(theory, gen(7))
    value = action(x)
    torch.testing.assert_close(value.detach(), theory.gauge_action(theta))
    (grad,) = torch.autograd.grad(value.sum(), x)
    (grad_g,) = torch.autograd.grad(theory.gauge_action(x).sum(), x)
    assert not torch.allclose(grad, grad_g)  # the determinant's gradient is in there
    with torch.no_grad():
        torch.testing.assert_close(action(theta), theory.gauge_action(theta))


def test_training_action_choices() -> None:
    theory = SchwingerModel(SchwingerParams(BETA, 0.25), LAT)
    assert training_action(theory, "pf-flow-mcmc") == theory.gauge_action
    assert training_action(theory, "flow-mcmc") == theory.action
    assert training_action(theory, "pf-flow-mcmc", "full") == theory.action  # V = 16: exact dense
    assert training_action(theory, "flow-mcmc", "gauge") == theory.gauge_action
    theory.dense_max_volume = 8  # as if the lattice were large
    act = training_action(theory, "pf-flow-mcmc", "full", generator=gen(1))
    assert isinstance(act, StochasticEffectiveAction)
    with pytest.raises(ValueError, match="reinforce"):
        training_action(theory, "pf-flow-mcmc", "full", estimator="reinforce", generator=gen(1))
    with pytest.raises(ValueError, match="train.target"):
        training_action(theory, "pf-flow-mcmc", "fermions")
    from latflow.theories.u1 import U1GaugeAction, U1Params

    with pytest.raises(ValueError, match="fermions"):
        training_action(U1GaugeAction(U1Params(BETA), LAT), "flow-mcmc", "full")


def test_train_target_job_key() -> None:
    """``train.target`` in a job: default ``auto``, ``gauge`` / ``full`` accepted, anything else refused."""
    from pathlib import Path

    from latflow.jobs.config import JobError, load_job

    example = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "schwinger_pf_flow.toml"
    assert load_job(example).train.target == "auto"
    for target in ("gauge", "full"):
        assert load_job(example, [f"train.target={target}"]).train.target == target
    with pytest.raises(JobError, match="target"):
        load_job(example, ["train.target=fermions"])


def flat_grad(model: FlowModel) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.statistical
def test_reverse_kl_gradient_on_the_stochastic_full_target_is_unbiased(record_z) -> None:
    """The reparameterised reverse-KL gradient with respect to the flow's parameters, on ``S_g - z`` (stochastic
    determinant gradient, one Z2 vector per configuration), over 200 noise draws on a fixed batch of 8 flow
    samples, against the same gradient on the exact dense ``S_eff``: Hotelling's T^2 of the projections on the
    exact gradient and three random directions (p-value > 1e-3), and |z| < 3 along the exact gradient."""
    seed = stat_seed(91)
    theory = SchwingerModel(SchwingerParams(BETA, 0.25), LAT)
    model = plaquette_flow(2, seed=5, width=0.2)
    model.requires_grad_(True)
    theory_large = SchwingerModel(SchwingerParams(BETA, 0.25), LAT, dense_max_volume=8)
    action = training_action(theory_large, "pf-flow-mcmc", "full", generator=gen(seed))
    assert isinstance(action, StochasticEffectiveAction)

    def kl_gradient(act) -> torch.Tensor:
        model.zero_grad()
        x, log_q = model.sample(8, gen(seed + 1))  # the same batch every time
        (log_q + act(x)).mean().backward()
        return flat_grad(model).clone()

    exact = kl_gradient(theory.action)
    dirs = torch.cat([exact[None] / exact.norm(), torch.randn((3, exact.numel()), generator=gen(seed + 2), dtype=F64)])
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    n = 200
    proj = torch.stack([dirs @ kl_gradient(action) for _ in range(n)]).numpy()  # [n, 4]
    d = proj.mean(axis=0) - (dirs @ exact).numpy()
    p = d.size
    t2 = n * d @ np.linalg.solve(np.cov(proj, rowvar=False), d)
    p_value = float(f_dist.sf(t2 * (n - p) / (p * (n - 1)), p, n - p))
    z = float(d[0] / (proj[:, 0].std(ddof=1) / math.sqrt(n)))
    record_z("exact direction", z)
    rel_sd = float(proj[:, 0].std(ddof=1) / exact.norm())
    print(f"T^2 p-value {p_value:.3f}, z along the exact gradient {z:+.2f}, single-draw sd / |grad| {rel_sd:.2f}")
    assert p_value > 1e-3 and abs(z) < 3, (p_value, z)


# ------------------------------------------------------------------------------ exactness
def flow_mcmc_chain(theory: SchwingerModel, model: FlowModel, n: int, generator: torch.Generator):
    sampler = FlowMCMC(model, lambda th: -theory.action(th), batch_size=n, generator=generator)
    return sampler.run(n)


def pf_chain(theory: SchwingerModel, model: FlowModel, n: int, generator: torch.Generator):
    cond = TriangularConditional(theory.dirac, even_odd=True, dispersion=DISPERSION)
    sampler = PseudofermionFlowMCMC.for_theory(theory, model, conditional=cond, batch_size=n, generator=generator)
    return sampler.run(n)


EXACTNESS = {
    # name: (kappa, chain, couplings, steps per chain)
    "flow-mcmc-prior": (0.25, flow_mcmc_chain, 0, 200),
    "flow-mcmc-couplings": (0.25, flow_mcmc_chain, 4, 200),
    "pf-flow-mcmc-prior": (0.2, pf_chain, 0, 300),
    "pf-flow-mcmc-couplings": (0.2, pf_chain, 4, 300),
}
N_CHAINS = 24


@pytest.mark.statistical
@pytest.mark.parametrize("name", list(EXACTNESS))
def test_plaquette_prior_chains_reproduce_exact_determinant_values(name: str, record_z) -> None:
    """``N_CHAINS`` independent chains; the mean of the chain means against the reference with the error from
    their spread (combined with the reference's): |z| < 3 for plaquette, <Q^2> and condensate."""
    kappa, chain, layers, n = EXACTNESS[name]
    theory = SchwingerModel(SchwingerParams(BETA, kappa), LAT)
    model = plaquette_flow(layers)
    seed = stat_seed(300 + 7 * len(name) + layers)
    t0 = time.perf_counter()
    means = {k: [] for k in OBS}
    accepted = 0
    for c in range(N_CHAINS):
        block = chain(theory, model, n, make_generator(seed, c))
        for k, v in chain_observables(block, theory).items():
            means[k].append(float(v[n // 10 :].mean()))
        accepted += int(block.accepted.sum())
    acceptance = accepted / (N_CHAINS * n)
    z, report = z_against_reference(means, kappa, record_z)
    print(f"{name} kappa={kappa}: acceptance {acceptance:.3f}, {time.perf_counter() - t0:.1f} s", report)
    assert acceptance > 0.05, acceptance
    assert all(abs(v) < 3 for v in z.values()), report


STOCHASTIC_TARGET_JOB = """
[theory]
name = "schwinger"
beta = 2.0
kappa = 0.2
[lattice]
shape = [12, 12]
[model]
kind = "u1-equivariant"
prior = "plaquette"
n_layers = 2
hidden = [4]
[train]
steps = 4
batch_size = 2
target = "full"
checkpoint_every = 2
[sampler]
kind = "flow-mcmc"
[output]
path = "s.h5"
[run]
seed = 11
"""


def test_stochastic_target_training_resumes_bit_for_bit(tmp_path, monkeypatch) -> None:
    """Above dense_max_volume the full target draws noise vectors: from the training stream, which the
    checkpoint carries, so 2 + 2 resumed steps give the weights of 4 uninterrupted ones."""
    from latflow.jobs import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.toml").write_text(STOCHASTIC_TARGET_JOB, encoding="utf-8")
    assert cli.main(["train", "job.toml", "--out", "a.h5"]) == 0
    assert cli.main(["train", "job.toml", "--out", "b.h5", "--set", "train.steps=2"]) == 0
    assert cli.main(["train", "job.toml", "--out", "b.h5", "--resume"]) == 0
    a, b = torch.load("a.model.pt", weights_only=False), torch.load("b.model.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert any(v.abs().max() > 0 for k, v in a["model"].items() if k.endswith("weight"))
