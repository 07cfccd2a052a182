"""Fermion linear algebra: Dirac operators, even/odd preconditioning, Krylov solvers, exact logdet.

- :mod:`.gamma`: Euclidean gamma matrices in any dimension;
- :mod:`.wilson`: the matrix-free, batched Wilson operator for U(1) and SU(N) links;
- :mod:`.evenodd`: its even-site Schur complement ``M_hat`` (``det M_hat = det D``) and full solves;
- :mod:`.dense`: dense matrices and exact ``log det`` for small lattices;
- :mod:`.solvers`: batched CG, CGNR and BiCGStab;
- :mod:`.pseudofermions`: Nf = 2 pseudofermion heatbath, actions and forces (plain, even/odd, Hasenbusch);
- :mod:`.conditional`: gauge-covariant conditional pseudofermion flows ``phi = M(U) chi``;
- :mod:`.stochastic_logdet`: unbiased noisy gradient of ``log det(D^dag D)`` (noise vectors and CG);
- :mod:`.training_target`: the action a flow trains on for a theory with fermions (``train.target``).
"""

from .conditional import ExactConditional, ScalarConditional, TriangularConditional
from .dense import dense_matrix, logdet, logdet_normal
from .evenodd import EvenOddWilson
from .gamma import gamma5, gamma_matrices, spin_dim
from .pseudofermions import HasenbuschRatioFactor, Nf2Pseudofermions, PseudofermionFactor, heatbath
from .solvers import ConvergenceError, SolverResult, bicgstab, cg, cgnr
from .stochastic_logdet import StochasticLogdetGradient
from .training_target import StochasticEffectiveAction, training_action
from .wilson import DiracOperator, WilsonDirac, u1_links

__all__ = [
    "spin_dim",
    "gamma_matrices",
    "gamma5",
    "u1_links",
    "DiracOperator",
    "WilsonDirac",
    "EvenOddWilson",
    "dense_matrix",
    "logdet",
    "logdet_normal",
    "SolverResult",
    "ConvergenceError",
    "cg",
    "cgnr",
    "bicgstab",
    "heatbath",
    "PseudofermionFactor",
    "HasenbuschRatioFactor",
    "Nf2Pseudofermions",
    "ExactConditional",
    "ScalarConditional",
    "TriangularConditional",
    "StochasticLogdetGradient",
    "StochasticEffectiveAction",
    "training_action",
]
