"""Tests of analyze_ensemble / format_table on a hand-written ensemble file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.signal import lfilter

from latflow.analysis import (
    DerivedObservable,
    analyze_ensemble,
    ess,
    format_table,
    gamma_method,
    gamma_method_derived,
)

N_COMMITTED = 900
N_STORED = 937  # rows >= N_COMMITTED are junk that readers must ignore
LATTICE = (4, 4)
COUPLINGS = {"m2": -4.0, "lam": 8.0}


GAMMA_KEYS = ("mean", "err", "tau_int", "tau_int_err", "n")


def _numbers(entry: dict) -> dict:
    """The Gamma-method numbers of an analysis entry (without window and warnings)."""
    return {k: entry[k] for k in GAMMA_KEYS}


def _ar1(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    return lfilter([1.0], [1.0, -a], rng.standard_normal(n))


def _dataset(group: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    return group.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), chunks=(64, *data.shape[1:]))


def _write_ensemble(path: Path, rows: dict[str, np.ndarray], *, n_committed: int, with_markov: bool = True) -> None:
    """Write an ensemble following ENSEMBLE_FORMAT.md (version 1)."""
    n_stored = len(rows["x"])
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "latflow-ensemble"
        f.attrs["format_version"] = 1
        f.attrs["latflow_version"] = "0.1.0"
        f.attrs["created_utc"] = "2024-01-01T00:00:00Z"
        f.attrs["theory"] = "phi4"
        f.attrs["couplings"] = json.dumps(COUPLINGS)
        f.attrs["lattice_shape"] = np.array(LATTICE, dtype=np.int64)
        f.attrs["sampler"] = json.dumps({"kind": "flow-mcmc", "batch_size": 64})
        f.attrs["seed"] = 7
        f.attrs["job"] = "# hand-written test ensemble\n"
        f.attrs["model_sha256"] = ""
        f.attrs["n_committed"] = n_committed
        phi = _dataset(f.require_group("fields"), "phi", rng.standard_normal((n_stored, *LATTICE)))
        raw = np.ascontiguousarray(phi[:n_committed]).astype(phi.dtype.newbyteorder("<"))
        phi.attrs["sha256"] = hashlib.sha256(raw.tobytes()).hexdigest()
        obs = f.require_group("observables")
        x = _dataset(obs, "x", rows["x"])
        x.attrs["description"] = "an AR(1) series"
        x.attrs["estimator"] = "stochastic"
        _dataset(obs, "v", rows["v"])
        if with_markov:
            markov = f.require_group("markov")
            _dataset(markov, "chain", rows["chain"])
            _dataset(markov, "step", rows["step"])
            _dataset(markov, "accepted", rows["accepted"])
        weights = f.require_group("weights")
        for name in ("log_p", "log_q", "log_w", "proposal_log_w"):
            if name in rows:
                _dataset(weights, name, rows[name])


def _chains(rng: np.random.Generator) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Two chains of different lengths and an irregular interleaving of their rows."""
    lengths = (520, N_COMMITTED - 520)
    chains = []
    for c, n in enumerate(lengths):
        x = 0.3 + _ar1(rng, n, 0.8)
        v = np.stack([x**2, _ar1(rng, n, 0.5) - 1.0], axis=1)
        log_p = -50.0 - _ar1(rng, n, 0.3)
        chains.append(
            {
                "x": x,
                "v": v,
                "chain": np.full(n, c, dtype=np.int64),
                "step": np.arange(n, dtype=np.int64),
                "accepted": rng.random(n) < 0.6 + 0.1 * c,
                "log_p": log_p,
                "log_q": log_p + 0.4 * rng.standard_normal(n) + 3.0,
                "log_w": np.zeros(n),
                "proposal_log_w": 0.4 * rng.standard_normal(n) - 3.0,
            }
        )
    order = np.argsort(rng.random(N_COMMITTED), kind="stable")
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(lengths)])[order]
    return chains, labels


def _interleave(chains: list[dict[str, np.ndarray]], labels: np.ndarray, junk: int) -> dict[str, np.ndarray]:
    """Rows in file order: each chain's rows in Markov order, chains interleaved, junk appended."""
    rows = {}
    for key in chains[0]:
        parts = [iter(ch[key]) for ch in chains]
        stacked = np.array([next(parts[c]) for c in labels])
        filler = np.full((junk, *stacked.shape[1:]), 1e6 if stacked.dtype.kind == "f" else 1)
        rows[key] = np.concatenate([stacked, filler.astype(stacked.dtype)])
    return rows


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory):
    rng = np.random.default_rng(2024)
    chains, labels = _chains(rng)
    rows = _interleave(chains, labels, N_STORED - N_COMMITTED)
    path = tmp_path_factory.mktemp("ens") / "ensemble.h5"
    _write_ensemble(path, rows, n_committed=N_COMMITTED)
    return path, chains, rows


def test_analyze_matches_gamma_method(ensemble) -> None:
    path, chains, rows = ensemble
    v_two = DerivedObservable(("x", "v[0]"), lambda x, x2: x2 - x**2, "variance of x")
    res = analyze_ensemble(path, derived={"var_x": v_two})
    json.dumps(res)
    assert res["theory"] == "phi4"
    assert res["couplings"] == COUPLINGS
    assert res["n_committed"] == N_COMMITTED
    assert res["n_chains"] == 2
    assert set(res["observables"]) == {"x", "v[0]", "v[1]"}

    expected = {
        "x": gamma_method([ch["x"] for ch in chains]),
        "v[0]": gamma_method([ch["v"][:, 0] for ch in chains]),
        "v[1]": gamma_method([ch["v"][:, 1] for ch in chains]),
    }
    for name, ref in expected.items():
        got = res["observables"][name]
        for key, val in ref.as_dict().items():
            assert got[key] == pytest.approx(val, rel=1e-12, abs=1e-15), (name, key)
        assert got["n"] == N_COMMITTED

    ref = gamma_method_derived(lambda x, x2: x2 - x**2, [[ch["x"] for ch in chains], [ch["v"][:, 0] for ch in chains]])
    got = res["derived"]["var_x"]
    assert got["mean"] == pytest.approx(ref.mean, rel=1e-12)
    assert got["err"] == pytest.approx(ref.err, rel=1e-10)
    assert got["tau_int"] == pytest.approx(ref.tau_int, rel=1e-10)
    assert got["inputs"] == ["x", "v[0]"]

    acc = gamma_method([ch["accepted"].astype(float) for ch in chains]).as_dict()
    assert res["acceptance"] == pytest.approx(acc, rel=1e-12)
    log_w = np.concatenate([ch["proposal_log_w"] for ch in chains])
    assert res["ess"] == pytest.approx(ess(log_w), rel=1e-12)
    assert res["warnings"] == []
    # what the file says about an observable is carried along
    assert res["observables"]["x"]["description"] == "an AR(1) series"
    assert res["observables"]["x"]["estimator"] == "stochastic"
    assert "estimator" not in res["observables"]["v[0]"]


def test_rows_sorted_by_step_and_known_means(ensemble, tmp_path: Path) -> None:
    path, chains, rows = ensemble
    perm = np.random.default_rng(1).permutation(N_COMMITTED)
    shuffled = {k: np.concatenate([v[:N_COMMITTED][perm], v[N_COMMITTED:]]) for k, v in rows.items()}
    other = tmp_path / "shuffled.h5"
    _write_ensemble(other, shuffled, n_committed=N_COMMITTED)
    a, b = analyze_ensemble(path), analyze_ensemble(other)
    for name in a["observables"]:
        assert _numbers(b["observables"][name]) == pytest.approx(_numbers(a["observables"][name]), rel=1e-12)

    res = analyze_ensemble(path, known_means={"x": 0.0, "v": 1.0}, S=2.0)
    assert res["known_means"] == {"x": 0.0, "v": 1.0}
    assert res["observables"]["x"]["known_mean"] == 0.0 and res["observables"]["v[0]"]["known_mean"] == 1.0
    assert _numbers(res["observables"]["x"]) == pytest.approx(
        gamma_method([ch["x"] for ch in chains], known_mean=0.0, S=2.0).as_dict(), rel=1e-12
    )
    assert _numbers(res["observables"]["v[1]"]) == pytest.approx(
        gamma_method([ch["v"][:, 1] for ch in chains], known_mean=1.0, S=2.0).as_dict(), rel=1e-12
    )
    # a derived observable takes its inputs' known means too, also those given for a whole dataset
    var_x = DerivedObservable(("x", "v[0]"), lambda x, x2: x2 - x**2)
    res = analyze_ensemble(path, derived={"var_x": var_x}, known_means={"v": 1.0})
    ref = gamma_method_derived(
        var_x.func, [[ch["x"] for ch in chains], [ch["v"][:, 0] for ch in chains]], known_means=[None, 1.0]
    )
    assert _numbers(res["derived"]["var_x"]) == pytest.approx(ref.as_dict(), rel=1e-10)


def test_single_chain_without_markov_or_flow(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    chains, labels = _chains(rng)
    rows = _interleave(chains, labels, 0)
    rows["log_q"] = np.zeros_like(rows["log_q"])  # HMC: no proposal density
    del rows["proposal_log_w"]
    rows["log_w"] = rng.standard_normal(N_COMMITTED)  # non-trivial importance weights
    path = tmp_path / "plain.h5"
    _write_ensemble(path, rows, n_committed=N_COMMITTED, with_markov=False)
    res = analyze_ensemble(path)
    assert res["n_chains"] == 1
    assert "acceptance" not in res and "ess" not in res
    assert any("log_w" in w for w in res["warnings"])
    assert _numbers(res["observables"]["x"]) == pytest.approx(gamma_method(rows["x"]).as_dict(), rel=1e-12)


def test_format_table(ensemble) -> None:
    path, _, _ = ensemble
    res = analyze_ensemble(path, derived={"chi": DerivedObservable(("v[0]", "x"), lambda a, b: 16 * (a - b**2))})
    table = format_table(res)
    for name in ("x", "v[0]", "v[1]", "chi", "phi4", "tau_int", "acceptance", "ESS"):
        assert name in table
    assert str(N_COMMITTED) in table
    m, e = res["observables"]["x"]["mean"], res["observables"]["x"]["err"]
    assert f"{m:.8g}" in table and f"{e:.3g}" in table
    lines = table.splitlines()
    body = [ln for ln in lines if ln.startswith(("x ", "v[", "chi"))]
    assert len(body) == 4 and len({len(ln) for ln in body}) == 1  # fixed width
    assert lines[-1] == "note: stochastic estimates (noise sources; their noise is part of the error): x"
