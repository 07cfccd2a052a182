"""An independent reader: HotQCD's latqcdtools (PyPI ``latqcdtools``) reads our ILDG and NERSC files.

latqcdtools' readers (``latqcdtools.interfaces.confReader.ILDGReader`` / ``NERSCReader``, constructed
with ``Ns`` and ``Nt``) need ``lx = ly = lz = Ns``; they return a ``gaugeField`` whose
``getLink(x, y, z, t, mu)`` (``mu = 0..3 = x, y, z, t``) and ``getPlaquette()`` (``<Re tr P>/3``,
our normalisation) are compared with ours. The NERSC reader also checks the header's PLAQUETTE and
LINK_TRACE itself (it raises on a mismatch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

# latqcdtools installs a process-wide numpy error handler on import that raises on underflow; keep it from
# leaking into every other test module of the run (collection imports this file before any test runs)
_NUMPY_ERR, _NUMPY_ERRCALL = np.geterr(), np.geterrcall()
pytest.importorskip("latqcdtools")

from latqcdtools.interfaces.confReader import ILDGReader, NERSCReader  # noqa: E402

np.seterr(**_NUMPY_ERR)
np.seterrcall(_NUMPY_ERRCALL)

from latflow.configio import write_configuration  # noqa: E402
from latflow.ildg import link_trace_mean  # noqa: E402
from latflow.sun import haar_sun, plaquette_mean  # noqa: E402

NT, NS = 4, 3  # time extent differs from the spatial one, so a swapped axis shows


@pytest.fixture(scope="module")
def links() -> torch.Tensor:
    """Haar-random SU(3) links ``[4, NT, NS, NS, NS, 3, 3]``."""
    return haar_sun((4, NT, NS, NS, NS), 3, torch.Generator().manual_seed(2026))


@pytest.mark.parametrize(
    ("fmt", "options", "reader"),
    [
        ("ildg", {}, ILDGReader),
        ("ildg", {"precision": 32}, ILDGReader),
        ("nersc", {}, NERSCReader),
        ("nersc", {"two_rows": True}, NERSCReader),
    ],
    ids=["ildg64", "ildg32", "nersc3x3", "nersc2rows"],
)
def test_latqcdtools_reads_our_files(tmp_path, links, fmt, options, reader):
    path = tmp_path / f"cfg.{fmt}"
    write_configuration(path, links, fmt, beta=6.0, **options)
    field = reader(Ns=NS, Nt=NT, nproc=1).readConf(str(path))
    tol = 1e-6 if options.get("precision") == 32 else 1e-13
    ours = float(plaquette_mean(links[None])[0])
    assert field.getPlaquette() == pytest.approx(ours, abs=tol)
    assert field.getLinkTrace() == pytest.approx(link_trace_mean(links), abs=tol)
    u = links.numpy()
    # file direction mu (x, y, z, t) is latflow direction (1, 2, 3, 0); site (x, y, z, t) is ours [t, x, y, z]
    for x, y, z, t in ((0, 0, 0, 0), (1, 2, 0, 3), (2, 1, 2, 1)):
        for mu, ours_mu in enumerate((1, 2, 3, 0)):
            theirs = np.asarray(field.getLink(x, y, z, t, mu))
            assert np.abs(theirs - u[ours_mu, t, x, y, z]).max() < max(tol, 1e-12) * 10
