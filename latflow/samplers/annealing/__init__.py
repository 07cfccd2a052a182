"""Annealing samplers: SMC, AIS, AFT, CRAFT, particle independent Metropolis-Hastings and stochastic
normalising flows, over a small shared core (paths, schedules, kernels, resampling, weights).

They anneal populations of particles from an exactly sampled start to the target and return weighted
particles with an unbiased estimate of the partition function ``Z``; they never open files.
"""

from .aft import AFT
from .ais import AIS
from .core import AnnealResult, conditional_ess_fraction, ess_fraction, log_mean_exp, normalise_log_weights, reweight
from .craft import CRAFT
from .kernels import HMCKernel, MarkovKernel, RandomWalkMetropolis, StepSize
from .paths import AnnealingPath, CouplingPath, GeometricPath
from .pimh import PIMH
from .population import LocalPopulation, SpreadPopulation
from .resampling import RESAMPLERS, ancestor_index, multinomial, systematic
from .schedules import AdaptiveSchedule, fixed_schedule
from .smc import SMC, Transport
from .snf import SNF, Langevin
from .transport import TransportFlow, affine_transport, sun_spectral_transport, u1_equivariant_transport

__all__ = [
    "AFT",
    "AIS",
    "CRAFT",
    "TransportFlow",
    "affine_transport",
    "sun_spectral_transport",
    "u1_equivariant_transport",
    "AdaptiveSchedule",
    "AnnealResult",
    "AnnealingPath",
    "CouplingPath",
    "GeometricPath",
    "HMCKernel",
    "Langevin",
    "LocalPopulation",
    "MarkovKernel",
    "PIMH",
    "RESAMPLERS",
    "RandomWalkMetropolis",
    "SMC",
    "SNF",
    "SpreadPopulation",
    "StepSize",
    "Transport",
    "ancestor_index",
    "conditional_ess_fraction",
    "ess_fraction",
    "fixed_schedule",
    "log_mean_exp",
    "multinomial",
    "normalise_log_weights",
    "reweight",
    "systematic",
]
