"""latflow: normalising-flow sampling for lattice field theory.

The engine package knows no particular theory. Theories live in
:mod:`latflow.theories`, the command line and job files in :mod:`latflow.jobs`,
and estimators over ensembles in :mod:`latflow.analysis`.
"""

__version__ = "0.1.0"
