"""Reading, writing and verifying ensembles: the one place that touches ensemble files.

An ensemble is one HDF5 file laid out as ``ENSEMBLE_FORMAT.md`` at the root of the latflow
repository (format version 1) describes: root attributes that make it self-describing, and
per-row datasets under ``fields/``, ``markov/``, ``weights/`` and ``observables/`` whose axis 0
is the row (one Markov step of one chain). Only rows ``< n_committed`` are part of the ensemble.
Where configurations are kept only every ``save_every`` steps (root attribute ``storage``),
``fields/*`` have their own axis 0 and ``fields/row`` gives the row of each stored configuration.

Crash safety
------------
:class:`EnsembleWriter` appends one *commit* at a time and raises ``n_committed`` only after
every row of the commit, and the sampler-state checkpoint that goes with it, has been flushed::

    1. resize every dataset and write the new rows; write the sampler state into the checkpoint
       slot that the committed state does not use;                                   -> flush
    2. ``sha256`` / ``sha256_rows`` attributes of every ``fields/*`` dataset, the checkpoint
       group's ``current`` slot;                                                        -> flush
    3. root attribute ``n_committed``.                                                  -> flush

A process killed at any instant therefore leaves a file whose rows below ``n_committed`` are intact.
A kill between flushes 2 and 3 leaves checksums that cover *more* rows than are committed; the
``sha256_rows`` attribute says how many, :func:`verify` accepts that state (the committed rows are
a prefix of the checksummed ones) and :meth:`EnsembleWriter.resume` repairs it. To keep HDF5 from
writing metadata between these points the writer disables metadata-cache evictions, every mutable
attribute is fixed-size and rewritten in place, uncompressed chunks never move, compressed
``fields/*`` datasets have one configuration per chunk (each chunk is written once, whole, and never
rewritten) and nothing is deleted while appending, so no file space is freed and reused under the
feet of the committed state.

Sampler state
-------------
The caller serialises its sampler state (RNG states included) to ``bytes``; this module stores the
blob verbatim in one of two slots, ``checkpoint/state_0`` and ``checkpoint/state_1`` (``uint8``,
attributes ``n_committed`` and ``nbytes``), alternating between commits. The current slot is the one
whose ``n_committed`` attribute equals the root ``n_committed``.

Weighted ensembles
------------------
Annealing samplers (SMC, AIS, ...) write a weighted population: one run per "chain" (``markov/chain``
is the run id, ``weights/log_w`` the particle's final log weight within its run) and one entry per run
in every ``annealing/<name>`` dataset, committed with the run's rows (``append(rows, state, runs=...)``).
The root attribute ``n_runs_committed`` is raised in step 2 with the checksums (so it may be one commit
ahead of ``n_committed``; readers clamp it to the runs whose rows are committed), together with
``log_z`` and ``log_z_err`` (:func:`combine_log_z` of the committed runs).
"""

from __future__ import annotations

from ._checkpoint import CHECKPOINT_GROUP  # noqa: F401  (a module-level name before the split)
from ._format import FORMAT_NAME, FORMAT_VERSION, REQUIRED_ATTRS, ROW_GROUPS
from ._h5 import require_hdf5_file, sha256_of_rows
from .integrity import verify
from .meta import EnsembleError, EnsembleExistsError, EnsembleMeta
from .reader import EnsembleReader
from .runs import RUN_GROUP, RUN_REQUIRED, combine_log_z
from .writer import EnsembleWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "REQUIRED_ATTRS",
    "RUN_GROUP",
    "RUN_REQUIRED",
    "ROW_GROUPS",
    "EnsembleError",
    "EnsembleExistsError",
    "EnsembleMeta",
    "EnsembleReader",
    "EnsembleWriter",
    "combine_log_z",
    "require_hdf5_file",
    "sha256_of_rows",
    "verify",
]
