"""Estimators over ensembles: Gamma-method errors, ESS, ensemble reports.

Imports only :mod:`latflow` I/O, numpy and scipy (never theories or jobs).
"""

from .diagnostics import ParetoTail, pareto_khat
from .ess import acceptance_rate, ess, reweighting_log_w
from .gamma import GammaResult, gamma_method, gamma_method_derived
from .multi import analyze_ensembles
from .report import AnalysisInputError, DerivedObservable, analyze_ensemble, format_table
from .resampling import ERROR_METHODS, ResampleResult, default_bin_size, resample_error
from .sectors import SectorCheck, sector_check
from .weighted import WeightedResult, weighted_estimate, weighted_estimate_derived

__all__ = [
    "GammaResult",
    "gamma_method",
    "gamma_method_derived",
    "ess",
    "reweighting_log_w",
    "acceptance_rate",
    "analyze_ensemble",
    "analyze_ensembles",
    "resample_error",
    "ResampleResult",
    "default_bin_size",
    "ERROR_METHODS",
    "format_table",
    "DerivedObservable",
    "AnalysisInputError",
    "pareto_khat",
    "ParetoTail",
    "sector_check",
    "SectorCheck",
    "weighted_estimate",
    "weighted_estimate_derived",
    "WeightedResult",
]
