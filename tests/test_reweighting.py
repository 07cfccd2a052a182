"""Reweighting in ``latflow analyze --reweight``: exact draws at one coupling, reweighted to a nearby one, against
exact values there (free phi^4: m2; 2D U(1): beta); the three ways of giving weights agree; SU(N) beta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.ensemble import EnsembleMeta, EnsembleWriter
from latflow.jobs.analyze import analyze, coupling_log_w, parse_couplings
from latflow.jobs.config import JobError
from latflow.lattice import Lattice
from latflow.theories import get_spec
from latflow.theories.phi4 import free_chi2, free_ising_energy, free_phi2
from latflow.theories.u1 import exact_plaquette

SHAPE = (4, 4)
N_DRAWS = 4000
N_CHAINS = 4


def _theory(name: str, shape: tuple[int, ...] = SHAPE, **couplings):
    spec = get_spec(name)
    return spec.build(spec.params(**couplings), Lattice(shape))


def write_draws(path: Path, name: str, couplings: dict, seed: int, log_w: np.ndarray | None = None) -> torch.Tensor:
    """Exact independent draws of the theory at ``couplings`` as an ensemble of N_CHAINS chains; returns the fields."""
    theory = _theory(name, **couplings)
    x = theory.sample_exact(N_DRAWS, torch.Generator().manual_seed(seed))
    obs = {f"observables/{k}": v.numpy() for k, v in theory.observables(x).items()}
    n = x.shape[0]
    rows = {
        f"fields/{theory.field_name}": x.numpy(),
        "markov/chain": np.arange(n) % N_CHAINS,
        "markov/step": np.arange(n) // N_CHAINS,
        "markov/accepted": np.ones(n, bool),
        "weights/log_p": -theory.action(x).numpy(),
        "weights/log_q": np.zeros(n),
        "weights/log_w": np.zeros(n) if log_w is None else log_w,
        **obs,
    }
    meta = EnsembleMeta(
        theory=name,
        couplings=couplings,
        lattice_shape=SHAPE,
        sampler={"kind": "hmc", "n_samples": n // N_CHAINS},
        seed=seed,
    )
    with EnsembleWriter.create(path, meta) as w:
        w.append(rows)
    return x


def _z(entry: dict, exact: float) -> float:
    return (entry["mean"] - exact) / entry["err"]


@pytest.mark.statistical
def test_free_field_reweighted_in_m2(tmp_path, record_z) -> None:
    """Free phi^4 drawn at m2 = 0.5, reweighted to m2 = 0.6: chi2, phi2 and the Ising energy against exact values."""
    path = tmp_path / "free.h5"
    write_draws(path, "phi4", {"m2": 0.5, "lam": 0.0}, stat_seed(4101))
    res = analyze([path], reweight=["m2=0.6"])
    rw = res["reweighting"]
    assert rw["by"] == "m2=0.6" and rw["n"] == N_DRAWS and 0.5 < rw["ess_fraction"] < 1.0
    exact = {
        "chi2": free_chi2(SHAPE, 0.6),
        "phi2": free_phi2(SHAPE, 0.6),
        "ising_energy": free_ising_energy(SHAPE, 0.6),
    }
    for name, value in exact.items():
        z = _z(res["observables"][name], value)
        record_z(name, z)
        assert abs(z) < 3, (name, res["observables"][name], value)
    # the unreweighted means are off by many errors: the test has teeth
    plain = analyze([path])["observables"]["chi2"]
    assert abs(_z(plain, exact["chi2"])) > 5


@pytest.mark.statistical
def test_u1_reweighted_in_beta(tmp_path, record_z) -> None:
    """2D U(1) drawn exactly at beta = 1.0, reweighted to beta = 1.15: the plaquette against the exact torus value."""
    path = tmp_path / "u1.h5"
    write_draws(path, "u1", {"beta": 1.0}, stat_seed(4102))
    for errors in ("gamma", "jackknife"):
        res = analyze([path], reweight=["beta=1.15"], errors=errors)
        z = _z(res["observables"]["plaquette"], exact_plaquette(1.15, SHAPE))
        record_z(f"plaquette ({errors})", z)
        assert abs(z) < 3, res["observables"]["plaquette"]
    sampled = analyze([path])["observables"]["plaquette"]
    assert abs(_z(sampled, exact_plaquette(1.15, SHAPE))) > 5


def test_three_ways_of_giving_weights_agree(tmp_path) -> None:
    """--reweight m2=..., the stored weights/log_w (same numbers) and a LOG_WEIGHT file give identical results."""
    a = tmp_path / "a.h5"
    x = write_draws(a, "phi4", {"m2": 0.5, "lam": 0.0}, 11)
    old, new = _theory("phi4", m2=0.5, lam=0.0), _theory("phi4", m2=0.55, lam=0.02)
    log_w = (old.action(x) - new.action(x)).numpy()
    b = tmp_path / "b.h5"
    write_draws(b, "phi4", {"m2": 0.5, "lam": 0.0}, 11, log_w=log_w)
    user = tmp_path / "shift.py"
    user.write_text(
        "import numpy as np\n"
        "def LOG_WEIGHT(fields, couplings):\n"
        "    phi2 = (fields**2).reshape(len(fields), -1)\n"
        "    return -(0.05 * phi2.sum(axis=1) + 0.02 * (phi2**2).sum(axis=1))\n",
        encoding="utf-8",
    )
    by_coupling = analyze([a], reweight=["m2=0.55,lam=0.02"])
    by_log_w = analyze([b], reweight=["log_w"])
    by_file = analyze([a], reweight=[str(user)])
    assert np.allclose(coupling_log_w(a, "m2=0.55,lam=0.02"), log_w, rtol=1e-12, atol=1e-12)
    for other in (by_log_w, by_file):
        for name, entry in by_coupling["observables"].items():
            assert other["observables"][name]["mean"] == pytest.approx(entry["mean"], rel=1e-9)
            assert other["observables"][name]["err"] == pytest.approx(entry["err"], rel=1e-6)
    assert not any("unweighted" in w for w in by_log_w["warnings"])
    json.dumps(by_coupling)


def test_sun_beta_weights_are_the_action_difference(tmp_path) -> None:
    """SU(2) Haar links stored at beta = 0: log w to beta = 0.3 is minus the Wilson action there."""
    path = tmp_path / "su2.h5"
    spec = {"beta": 0.0, "n": 2}
    theory = _theory("su3", (2, 2), **spec)
    x = theory.sample_exact(20, torch.Generator().manual_seed(3))
    meta = EnsembleMeta(theory="su3", couplings=spec, lattice_shape=(2, 2), sampler={"kind": "hmc"}, seed=3)
    with EnsembleWriter.create(path, meta) as w:
        w.append(
            {
                "fields/links": x.numpy(),
                "markov/chain": np.zeros(20, np.int64),
                "markov/step": np.arange(20),
                "observables/plaquette": theory.observables(x)["plaquette"].numpy(),
            }
        )
    target = _theory("su3", (2, 2), beta=0.3, n=2)
    expected = -target.action(x).numpy()
    assert np.allclose(coupling_log_w(path, "beta=0.3"), expected, rtol=1e-12, atol=1e-12)


def test_small_reweighting_ess_warns(tmp_path) -> None:
    path = tmp_path / "far.h5"
    write_draws(path, "phi4", {"m2": 0.5, "lam": 0.0}, 5)
    res = analyze([path], reweight=["m2=4.0"])
    assert res["reweighting"]["ess_fraction"] < 0.1
    assert any("reweighting ESS" in w for w in res["warnings"])


@pytest.mark.parametrize(
    ("text", "theory", "message"),
    [
        ("beta=2.1", "phi4", "KEY one of m2, lam"),
        ("m2=abc", "phi4", "finite number"),
        ("beta=2.1", "schwinger", "supported: phi4 (m2, lam), u1 (beta), su3 (beta)"),
    ],
)
def test_bad_reweighting_targets(text, theory, message) -> None:
    with pytest.raises(JobError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_couplings(text, theory, {"m2": 0.5, "lam": 0.0, "beta": 2.0})


def test_rows_without_configurations_are_left_out(tmp_path) -> None:
    """save_every = 3: only the rows with a stored configuration (fields/row) are reweighted and analysed."""
    n = 30
    phi = np.random.default_rng(0).standard_normal((n, *SHAPE))
    keep = np.arange(2, n, 3)
    meta = EnsembleMeta(
        theory="phi4",
        couplings={"m2": 0.5, "lam": 0.0},
        lattice_shape=SHAPE,
        sampler={"kind": "hmc", "n_samples": n},
        seed=1,
        storage={"save_every": 3},
    )
    path = tmp_path / "thin.h5"
    with EnsembleWriter.create(path, meta) as w:
        w.append(
            {
                "fields/phi": phi[keep],
                "fields/row": keep,
                "markov/chain": np.zeros(n, np.int64),
                "markov/step": np.arange(n),
                "observables/phi2": (phi**2).mean(axis=(1, 2)),
            }
        )
    log_w = coupling_log_w(path, "m2=0.6")
    assert np.array_equal(np.flatnonzero(np.isfinite(log_w)), keep)
    assert np.allclose(log_w[keep], -0.1 * (phi[keep] ** 2).sum(axis=(1, 2)), rtol=1e-12)
    res = analyze([path], reweight=["m2=0.6"])
    assert res["observables"]["phi2"]["n"] == keep.size
    w = np.exp(log_w[keep] - log_w[keep].max())
    phi2 = (phi[keep] ** 2).mean(axis=(1, 2))
    assert res["observables"]["phi2"]["mean"] == pytest.approx(float(np.sum(w * phi2) / np.sum(w)), rel=1e-12)
    assert any("10 of 30 rows" in line for line in res["warnings"])
