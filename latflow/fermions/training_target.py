"""The action a flow is trained on for a theory with fermions (``train.target``).

A flow for the links of a theory with dynamical fermions (the Schwinger model) can learn

- ``"gauge"``: the gauge action ``S_g`` alone. What the joint pseudofermion chain (``pf-flow-mcmc``) has always
  used: cheap, but the fermion determinant is then left entirely to the Metropolis step;
- ``"full"``: the effective action of the marginal ``S_eff = S_g - log det(D^dag D)`` (even/odd or Hasenbusch
  splittings of the sampler are irrelevant here: they factorise the same determinant). Up to the theory's
  ``dense_max_volume`` the exact dense determinant (``theory.action``, differentiable); above it
  ``S_g - z(theta)`` with ``z`` from :class:`~latflow.fermions.stochastic_logdet.StochasticLogdetGradient`:
  zero in value, an unbiased stochastic estimate of ``d log det(D^dag D)`` as gradient. With the stochastic
  estimator the *value* of the training target, hence the logged loss and batch ESS, is that of the gauge
  action only; the gradient is that of the full effective action in expectation.
- ``"auto"``: the behaviour before the key existed: ``S_g`` for ``pf-flow-mcmc``, else ``theory.action`` (for the
  Schwinger model the exact dense ``S_eff`` at every volume).

The stochastic gradient needs an estimator that differentiates the target (``reparam`` or ``path``);
``reinforce`` only evaluates it, so it trains on the exact dense determinant (small volumes) or refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from .stochastic_logdet import NoiseKind, StochasticLogdetGradient

__all__ = ["TrainTarget", "StochasticEffectiveAction", "training_action"]

TrainTarget = Literal["auto", "gauge", "full"]
TARGETS = ("auto", "gauge", "full")


class StochasticEffectiveAction:
    """``S_g(theta) - z(theta)`` ``[B]``: value ``S_g``, gradient an unbiased estimate of ``dS_eff/dtheta``.

    Parameters
    ----------
    theory
        A theory with ``gauge_action`` and ``dirac`` (:class:`latflow.theories.schwinger.SchwingerModel`).
    generator
        Random stream of the noise vectors.
    n_noise, noise, tol
        Settings of :class:`StochasticLogdetGradient`.
    """

    def __init__(
        self, theory: Any, generator: torch.Generator, *, n_noise: int = 1, noise: NoiseKind = "z2", tol: float = 1e-8
    ) -> None:
        self.theory = theory
        self.logdet_gradient = StochasticLogdetGradient(theory.dirac, generator, n_noise=n_noise, noise=noise, tol=tol)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """``S_g(theta) - z(theta)`` ``[B]`` for links ``[B, 2, L0, L1]`` (the term ``z`` only when differentiating)."""
        s_g = self.theory.gauge_action(theta)
        if not (torch.is_grad_enabled() and theta.requires_grad):
            return s_g
        return s_g - self.logdet_gradient.zero_value_term(theta)


def _has_fermions(theory: Any) -> bool:
    return hasattr(theory, "dirac") and callable(getattr(theory, "gauge_action", None))


def training_action(
    theory: Any,
    sampler_kind: str,
    target: str = "auto",
    *,
    estimator: str = "reparam",
    generator: torch.Generator | None = None,
    n_noise: int = 1,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The action ``S(x)`` ``[B]`` a flow is trained on (module notes), for ``ReverseKLTrainer(log_p = -S)``.

    Parameters
    ----------
    theory
        The job's theory; ``"gauge"`` and ``"full"`` apply to theories with ``gauge_action`` and ``dirac``.
    sampler_kind
        The job's sampler (``"pf-flow-mcmc"`` selects ``"gauge"`` under ``"auto"``).
    target
        ``"auto"``, ``"gauge"`` or ``"full"``.
    estimator
        The trainer's gradient estimator; ``"reinforce"`` cannot use the stochastic determinant gradient.
    generator
        Noise stream of the stochastic estimator (needed above the theory's ``dense_max_volume`` with ``"full"``).
    n_noise
        Noise vectors per configuration of the stochastic estimator.
    """
    if target not in TARGETS:
        raise ValueError(f"train.target must be one of {', '.join(TARGETS)}, got {target!r}")
    fermions = _has_fermions(theory)
    if target == "auto":  # the behaviour before the key existed
        return theory.gauge_action if fermions and sampler_kind == "pf-flow-mcmc" else theory.action
    if not fermions:
        raise ValueError(f"train.target = {target!r} is for theories with fermions; use 'auto'")
    if target == "gauge":
        return theory.gauge_action
    if theory.lattice.volume <= getattr(theory, "dense_max_volume", 0):
        return theory.action
    if estimator == "reinforce":
        raise ValueError(
            f"train.target = 'full' at volume {theory.lattice.volume} (> dense_max_volume = "
            f"{getattr(theory, 'dense_max_volume', 0)}) uses a stochastic determinant gradient, which the "
            "'reinforce' estimator never evaluates; use estimator 'reparam' or 'path'"
        )
    if generator is None:
        raise ValueError("the stochastic determinant gradient needs a generator for its noise")
    return StochasticEffectiveAction(theory, generator, n_noise=n_noise)
