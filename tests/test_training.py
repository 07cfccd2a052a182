"""Reverse-KL training: the three gradient estimators, learning-rate schedules, resume, the KL in nats.

Estimator tests average each estimator's gradient over many independent batches (independent
streams per estimator) and compare the means with z-scores from the batch-to-batch spread. Several
z-scores are tested at once, so the bound is Bonferroni-corrected: with ``m`` comparisons,
``|z| < Phi^-1(1 - alpha / (2 m))`` with family-wise false-alarm rate ``alpha = 1e-3``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stat_seed
from scipy.stats import norm
from torch import nn

from latflow.flows import FlowModel, make_affine_flow
from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.flows.layers import AffineCoupling
from latflow.jobs.config import JobError, load_job
from latflow.jobs.runner import _training_log_z
from latflow.lattice import Lattice
from latflow.priors import NormalPrior
from latflow.theories.phi4 import Phi4Params, Phi4Theory
from latflow.theories.u1 import U1GaugeAction, U1Params
from latflow.training import ESTIMATORS, ReverseKLTrainer, TrainingDivergedError, lr_factor

ALPHA = 1e-3  # family-wise false-alarm rate of each statistical test


def bonferroni_bound(m: int) -> float:
    """``|z|`` bound for ``m`` simultaneous two-sided comparisons at family-wise rate ``ALPHA``."""
    return float(norm.isf(ALPHA / (2 * m)))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_gradients(
    model: nn.Module, log_p: Callable[[torch.Tensor], torch.Tensor], estimator: str, n: int, batch: int, seed: int
) -> torch.Tensor:
    """``[n, n_params]``: the estimator's gradient on ``n`` independent batches (parameters unchanged)."""
    trainer = ReverseKLTrainer(model, log_p, batch_size=batch, lr=1e-3, generator=gen(seed), estimator=estimator)
    params = list(model.parameters())
    rows = []
    for _ in range(n):
        surrogate, _ = trainer._surrogate()
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]))
    return torch.stack(rows)


def compare_estimators(model: nn.Module, log_p: Callable, n: int, batch: int, seed: int, n_proj: int = 8) -> None:
    """All three estimators' mean gradients agree on ``n_proj`` fixed random projections."""
    n_params = sum(p.numel() for p in model.parameters())
    proj = torch.randn(n_params, n_proj, generator=gen(seed), dtype=torch.float64)
    mean, err = {}, {}
    for k, est in enumerate(ESTIMATORS):
        g = batch_gradients(model, log_p, est, n, batch, seed + 1 + k) @ proj  # [n, n_proj]
        mean[est], err[est] = g.mean(0), g.std(0) / math.sqrt(n)
    # not vacuous: the gradient is resolved well beyond the noise
    assert (mean["reparam"] / err["reparam"]).abs().max() > 10
    pairs = [("reparam", "path"), ("reparam", "reinforce"), ("path", "reinforce")]
    z = torch.stack([(mean[a] - mean[b]) / torch.sqrt(err[a] ** 2 + err[b] ** 2) for a, b in pairs])
    bound = bonferroni_bound(z.numel())
    assert z.abs().max() < bound, f"max |z| = {z.abs().max():.2f} >= {bound:.2f}:\n{z}"


@pytest.mark.statistical
def test_estimators_agree_phi4() -> None:
    """Affine flow (random weights) on 2x2 phi^4 in the double-well regime."""
    seed = stat_seed(4101)
    torch.manual_seed(seed)
    lattice = Lattice((2, 2))
    theory = Phi4Theory(Phi4Params(m2=-1.0, lam=1.0), lattice)
    model = make_affine_flow(lattice, 2, (4,), 3)
    compare_estimators(model, lambda x: -theory.action(x), n=200, batch=16, seed=seed)


@pytest.mark.statistical
def test_estimators_agree_u1() -> None:
    """Gauge-equivariant flow (random weights) on 4x4 U(1) at beta = 1."""
    seed = stat_seed(4102)
    torch.manual_seed(seed)
    lattice = Lattice((4, 4))
    theory = U1GaugeAction(U1Params(beta=1.0), lattice)
    model = make_u1_equivariant_flow(lattice, 4, "ncp", (4,), n_mix=2)
    compare_estimators(model, lambda x: -theory.action(x), n=100, batch=8, seed=seed)


class SiteAffine(nn.Module):
    """``y = exp(log_a) x + b`` per site: maps ``N(0, 1)`` to ``N(b, exp(2 log_a))``, fields ``[B, *shape]``."""

    def __init__(self, log_a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.log_a = nn.Parameter(log_a.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.log_a.exp() + self.b, self.log_a.sum().expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (y - self.b) * (-self.log_a).exp(), -self.log_a.sum().expand(y.shape[0])


def gaussian_case(log_a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor, s: torch.Tensor):
    """A Gaussian flow ``N(b, e^{2 log_a})`` and the unnormalised target ``N(mu, s^2)`` per site (shape ``[4]``).

    Returns the model, ``log_p``, the exact gradient ``[log_a, b]`` of the KL and the exact KL and ``log Z``.
    """
    model = FlowModel(NormalPrior((4,)), [SiteAffine(log_a, b)])

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (((x - mu) / s) ** 2).sum(dim=1)

    a2 = (2 * log_a).exp()
    grad = torch.cat([-1 + a2 / s**2, (b - mu) / s**2])
    kl = (s.log() - log_a + (a2 + (b - mu) ** 2) / (2 * s**2) - 0.5).sum().item()
    log_z = (0.5 * math.log(2 * math.pi) + s.log()).sum().item()
    return model, log_p, grad, kl, log_z


TARGET_MU = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=torch.float64)
TARGET_S = torch.tensor([0.8, 1.2, 0.5, 1.0], dtype=torch.float64)


@pytest.mark.statistical
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_is_unbiased(estimator: str) -> None:
    """Each estimator's mean gradient equals the analytic gradient of KL(N(b, a^2) || N(mu, s^2))."""
    seed = stat_seed(4103 + ESTIMATORS.index(estimator))
    log_a = torch.tensor([0.2, -0.3, 0.1, 0.4], dtype=torch.float64)
    b = torch.tensor([0.0, 0.4, 0.2, -0.6], dtype=torch.float64)
    model, log_p, exact, _, _ = gaussian_case(log_a, b, TARGET_MU, TARGET_S)
    n = 1000
    # small batches: a baseline that included its own sample would bias REINFORCE by a factor (B - 1) / B
    g = batch_gradients(model, log_p, estimator, n, 4, seed)
    z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(n))
    bound = bonferroni_bound(z.numel())
    assert z.abs().max() < bound, f"{estimator}: max |z| = {z.abs().max():.2f} >= {bound:.2f}: {z}"
    assert (exact.abs() / (g.std(0) / math.sqrt(n))).max() > 10  # the exact gradient is resolved


def test_path_gradient_vanishes_when_q_equals_p() -> None:
    """At ``q = p`` the path gradient is zero per sample, the reparameterised one is pure noise."""
    sigma = 0.7
    lattice = Lattice((4, 4))
    torch.manual_seed(1)
    layers = [AffineCoupling(lattice.checkerboard(i % 2), (4,), 3, zero_init=True) for i in range(2)]
    model = FlowModel(NormalPrior(lattice.shape, sigma), layers).to(torch.float64)

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x / sigma).pow(2).flatten(1).sum(dim=1)

    path = batch_gradients(model, log_p, "path", 10, 16, 1)
    reparam = batch_gradients(model, log_p, "reparam", 10, 16, 2)
    reinforce = batch_gradients(model, log_p, "reinforce", 10, 16, 3)
    assert path.abs().max() < 1e-12
    assert reinforce.abs().max() < 1e-10  # log q - log p is the same constant for every sample
    assert reparam.std(0).max() > 1e-2


def test_path_gradient_has_smaller_variance_near_optimum() -> None:
    """Close to the optimum the path gradient's batch-to-batch variance is far below reparam's."""
    eps = torch.tensor([0.03, -0.02, 0.01, 0.02], dtype=torch.float64)
    model, log_p, _, _, _ = gaussian_case(TARGET_S.log() + eps, TARGET_MU - eps, TARGET_MU, TARGET_S)
    var = {est: batch_gradients(model, log_p, est, 50, 16, 7).var(0).sum().item() for est in ("path", "reparam")}
    assert var["path"] < 0.05 * var["reparam"], var


# --- learning-rate schedules and resume ------------------------------------------------------------


def test_lr_factor_formula() -> None:
    total, w, lr, lr_min = 21, 5, 1e-2, 1e-4
    kw = dict(total_steps=total, warmup_steps=w, lr=lr, lr_min=lr_min)
    for sched in ("constant", "cosine", "exponential"):
        assert lr_factor(0, schedule=sched, **kw) == pytest.approx(1 / 6)
        assert lr_factor(4, schedule=sched, **kw) == pytest.approx(5 / 6)
        assert lr_factor(w, schedule=sched, **kw) == pytest.approx(1.0)
    assert lr_factor(20, schedule="constant", **kw) == 1.0
    # decay over the 15 steps after warm-up: t = (k - 5) / 15
    assert lr * lr_factor(20, schedule="cosine", **kw) == pytest.approx(lr_min)
    assert lr * lr_factor(20, schedule="exponential", **kw) == pytest.approx(lr_min)
    assert lr * lr_factor(10, schedule="cosine", **kw) == pytest.approx(lr_min + (lr - lr_min) * 0.75)  # t = 1/3
    assert lr * lr_factor(10, schedule="exponential", **kw) == pytest.approx(lr * (lr_min / lr) ** (1 / 3))
    assert lr_factor(40, schedule="cosine", **kw) == lr_factor(20, schedule="cosine", **kw)  # past the end


def small_trainer(seed: int = 0, **kw) -> ReverseKLTrainer:
    torch.manual_seed(seed)
    lattice = Lattice((4, 4))
    theory = Phi4Theory(Phi4Params(m2=-1.0, lam=1.0), lattice)
    model = make_affine_flow(lattice, 2, (4,), 3)
    return ReverseKLTrainer(model, lambda x: -theory.action(x), batch_size=8, lr=1e-2, generator=gen(5), **kw)


@pytest.mark.parametrize("schedule", ["cosine", "exponential"])
def test_trainer_follows_schedule(schedule: str) -> None:
    kw = dict(lr_schedule=schedule, warmup_steps=3, lr_min=1e-4, total_steps=12)
    history = small_trainer(**kw).train(12)
    expected = [
        1e-2 * lr_factor(k, schedule=schedule, total_steps=12, warmup_steps=3, lr=1e-2, lr_min=1e-4) for k in range(12)
    ]
    np.testing.assert_allclose(history.lr, expected, rtol=1e-12)
    assert history.lr[-1] == pytest.approx(1e-4)


def test_default_is_constant_reparam() -> None:
    trainer = small_trainer()
    assert trainer.estimator == "reparam"
    history = trainer.train(4)
    assert history.lr == [1e-2] * 4
    assert history.kl == [None] * 4


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_resume_is_bit_for_bit(tmp_path: Path, estimator: str) -> None:
    """10 steps in one go equal 5 steps, a checkpoint, a fresh trainer and 5 more."""
    kw = dict(estimator=estimator, lr_schedule="cosine", warmup_steps=3, lr_min=1e-4, total_steps=10, log_z=1.5)
    one = small_trainer(**kw)
    one.train(10)
    first = small_trainer(**kw)
    first.train(5, checkpoint_path=tmp_path / "m.pt")
    second = small_trainer(seed=99, **kw)  # other initial weights: the checkpoint must replace them
    second.load(tmp_path / "m.pt")
    assert second.step == 5
    second.train(10)
    for p, q in zip(one.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    assert one.history.as_dict() == second.history.as_dict()
    assert one.optimizer.param_groups[0]["lr"] == second.optimizer.param_groups[0]["lr"]
    assert second.history.kl[0] == pytest.approx(second.history.loss[0] + 1.5)


def test_old_checkpoint_without_schedule_loads(tmp_path: Path) -> None:
    trainer = small_trainer()
    trainer.train(3)
    state = trainer.state_dict()
    del state["scheduler"]
    state["history"] = {k: state["history"][k] for k in ("step", "loss", "ess")}
    fresh = small_trainer(lr_schedule="cosine", total_steps=10, lr_min=1e-3)
    fresh.load_state_dict(state)
    assert fresh.history.kl == [None] * 3 and len(fresh.history.lr) == 3
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-2 * lr_factor(3, schedule="cosine", total_steps=10, lr=1e-2, lr_min=1e-3)
    )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"estimator": "score"}, "unknown estimator"),
        ({"lr_schedule": "step"}, "unknown lr_schedule"),
        ({"lr_schedule": "cosine"}, "needs total_steps"),
        ({"lr_schedule": "exponential", "total_steps": 5}, "lr_min > 0"),
        ({"lr_min": 0.1}, "lr_min"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_trainer_rejects_bad_settings(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_trainer(**kw)


# --- the KL in nats ----------------------------------------------------------------------------


@pytest.mark.statistical
def test_kl_of_free_field_matches_analytic() -> None:
    """Identity flow on N(0, sigma^2 I) against the free field S = phi^T A phi: KL = loss + log Z, analytic."""
    seed = stat_seed(4110)
    sigma, batch = 0.6, 4096
    lattice = Lattice((4, 4))
    theory = Phi4Theory(Phi4Params(m2=0.5, lam=0.0), lattice)
    v = lattice.volume
    hess = torch.autograd.functional.hessian(
        lambda phi: theory.action(phi.reshape(1, *lattice.shape))[0], torch.zeros(v, dtype=torch.float64)
    )  # = 2 A, the inverse covariance of exp(-S)
    logdet = torch.linalg.slogdet(hess)[1].item()
    log_z = 0.5 * v * math.log(2 * math.pi) - 0.5 * logdet
    kl_exact = 0.5 * (sigma**2 * torch.trace(hess).item() - v - logdet - 2 * v * math.log(sigma))
    layers = [AffineCoupling(lattice.checkerboard(i % 2), (4,), 3, zero_init=True) for i in range(2)]
    model = FlowModel(NormalPrior(lattice.shape, sigma), layers).to(torch.float64)
    trainer = ReverseKLTrainer(
        model, lambda x: -theory.action(x), batch_size=batch, lr=1e-3, generator=gen(seed), log_z=log_z
    )
    m = trainer.train_step()  # metrics of the batch drawn before the update: the identity flow
    assert m.kl is not None and m.kl == pytest.approx(m.loss + log_z)
    z = (m.kl - kl_exact) / (m.loss_std / math.sqrt(batch))
    assert abs(z) < 3, f"KL {m.kl:.4f} vs exact {kl_exact:.4f}: z = {z:.2f}"
    assert kl_exact > 1  # the test has teeth: far from zero
    assert trainer.history.kl == [m.kl]


@pytest.mark.statistical
def test_kl_is_nonnegative_and_matches_gaussian() -> None:
    """Gaussian flow vs Gaussian target: the reported KL equals the analytic one within its error, >= 0."""
    seed = stat_seed(4111)
    batch = 2048
    model, log_p, _, kl_exact, log_z = gaussian_case(
        torch.tensor([0.1, 0.0, -0.2, 0.05], dtype=torch.float64),
        torch.tensor([0.2, -0.3, 0.9, 0.1], dtype=torch.float64),
        TARGET_MU,
        TARGET_S,
    )
    trainer = ReverseKLTrainer(model, log_p, batch_size=batch, lr=1e-3, generator=gen(seed), log_z=log_z)
    m = trainer.train_step()
    err = m.loss_std / math.sqrt(batch)
    assert abs(m.kl - kl_exact) / err < 3
    assert m.kl > -3 * err
    assert kl_exact > 0.05


# --- job configuration -------------------------------------------------------------------------


def test_config_new_keys_defaults_and_values(tmp_path: Path, make_job) -> None:
    t = load_job(make_job(tmp_path)).train
    assert (t.estimator, t.lr_schedule, t.warmup_steps, t.lr_min) == ("reparam", "constant", 0, 0.0)
    changes = {"train.estimator": "path", "train.lr_schedule": "cosine", "train.warmup_steps": 5, "train.lr_min": 1e-5}
    t = load_job(make_job(tmp_path, changes=changes)).train
    assert (t.estimator, t.lr_schedule, t.warmup_steps, t.lr_min) == ("path", "cosine", 5, 1e-5)


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"train.estimator": "score"}, ("'train.estimator'", "'reparam', 'path', 'reinforce'")),
        ({"train.lr_schedule": "linear"}, ("'train.lr_schedule'", "'constant', 'cosine', 'exponential'")),
        ({"train.warmup_steps": -1}, ("'train.warmup_steps'", ">= 0")),
        ({"train.warmup_steps": 1.5}, ("'train.warmup_steps'", "an integer")),
        ({"train.lr_min": -1e-4}, ("'train.lr_min'", ">= 0")),
        ({"train.lr_min": 0.01, "train.lr": 0.001}, ("'train.lr_min' = 0.01", "'train.lr' = 0.001")),
        ({"train.lr_schedule": "exponential"}, ("'train.lr_schedule' = 'exponential'", "'train.lr_min' > 0")),
        ({"train.estimator": "reinforce", "train.batch_size": 1}, ("'train.estimator'", "'train.batch_size' >= 2")),
    ],
)
def test_config_rejects_bad_values(tmp_path: Path, make_job, changes: dict, expect: tuple[str, ...]) -> None:
    path = make_job(tmp_path, changes=changes)
    with pytest.raises(JobError) as info:
        load_job(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for part in expect:
        assert part in message, message


class _Theory:
    def action(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Exact(_Theory):
    def __init__(self, log_z: float | None, volume: float | None) -> None:
        self._log_z = log_z
        if volume is not None:
            self.field_log_volume = lambda: volume

    def exact_log_z(self) -> float | None:
        return self._log_z

    def gauge_action(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_training_log_z_from_theory() -> None:
    """log Z for the trainer: exact_log_z() + field_log_volume(), None whenever either is unknown."""
    plain = _Theory()
    assert _training_log_z(plain, plain.action) is None
    unknown = _Exact(None, 0.0)
    assert _training_log_z(unknown, unknown.action) is None
    no_volume = _Exact(2.0, None)
    assert _training_log_z(no_volume, no_volume.action) is None
    known = _Exact(-3.0, 32 * math.log(2 * math.pi))
    assert _training_log_z(known, known.action) == pytest.approx(-3.0 + 32 * math.log(2 * math.pi))
    assert _training_log_z(known, known.gauge_action) is None  # another target than the theory's action


@pytest.mark.statistical
def test_kl_of_haar_flow_is_haar_log_z() -> None:
    """Identity gauge flow (q = Haar) on 2D U(1): KL(q || p) = log Z under the Haar probability measure.

    ``log q = -n_links log 2 pi`` and ``E_Haar[sum_p cos theta_p] = 0``, so ``KL = theory.exact_log_z()``
    exactly; the trainer gets ``log Z`` in its own normalisation from :func:`_training_log_z`.
    """
    seed = stat_seed(4112)
    batch = 1024
    lattice = Lattice((4, 4))
    theory = U1GaugeAction(U1Params(beta=1.0), lattice)
    log_z = _training_log_z(theory, theory.action)
    if log_z is None:
        pytest.skip("this theory offers no exact log Z")
    torch.manual_seed(seed)
    model = make_u1_equivariant_flow(lattice, 2, "ncp", (4,), n_mix=2, zero_init=True)
    trainer = ReverseKLTrainer(
        model, lambda x: -theory.action(x), batch_size=batch, lr=1e-3, generator=gen(seed), log_z=log_z
    )
    m = trainer.train_step()
    z = (m.kl - theory.exact_log_z()) / (m.loss_std / math.sqrt(batch))
    assert abs(z) < 3, f"KL {m.kl:.4f} vs log Z_Haar {theory.exact_log_z():.4f}: z = {z:.2f}"
    assert theory.exact_log_z() > 1  # not vacuous


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor-to-host reads (``item``, ``tolist``, ``bool``) that latflow's code makes inside the mode
    (not torch's own: Adam reads its CPU step counter, which is no device synchronisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__):
            caller = sys._getframe(1).f_code.co_filename
            if Path(torch.__file__).parent not in Path(caller).parents:
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_the_host_twice_whatever_the_parameter_count() -> None:
    """Loss statistics, ESS terms and the gradients' finiteness come back in one read, the parameters' finiteness in
    another: 2 reads per step for 2 and for 12 coupling layers (was 4 + 2 per parameter tensor); non-finite gradients
    and parameters still stop training with their own message."""
    theory = Phi4Theory(Phi4Params(m2=-4.0, lam=8.0), Lattice((4, 4)))
    reads = {}
    for n_layers in (2, 12):
        model = make_affine_flow(Lattice((4, 4)), n_layers=n_layers, hidden=(4,))
        trainer = ReverseKLTrainer(model, lambda x: -theory.action(x), batch_size=8, lr=1e-3, generator=gen(2))
        trainer.train_step()
        with _HostReads() as mode:
            m = trainer.train_step()
        reads[n_layers] = mode.count
        assert math.isfinite(m.loss) and 0 < m.ess <= 1
    assert reads == {2: 2, 12: 2}, reads

    model = make_affine_flow(Lattice((4, 4)), n_layers=2, hidden=(4,))
    first = next(p for p in model.parameters() if p.requires_grad)
    first.register_hook(lambda g: g * float("nan"))
    trainer = ReverseKLTrainer(model, lambda x: -theory.action(x), batch_size=8, lr=1e-3, generator=gen(2))
    with pytest.raises(TrainingDivergedError, match="gradient became non-finite at step 1"):
        trainer.train_step()
    model = make_affine_flow(Lattice((4, 4)), n_layers=2, hidden=(4,))
    trainer = ReverseKLTrainer(model, lambda x: -theory.action(x), batch_size=8, lr=1e3, generator=gen(2))
    trainer.optimizer.register_step_post_hook(lambda *_: [p.data.fill_(float("inf")) for p in model.parameters()])
    with pytest.raises(TrainingDivergedError, match="parameters became non-finite at step 1"):
        trainer.train_step()
